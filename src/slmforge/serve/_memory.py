"""Memory in the server: with ``serve.memory`` on, each chat request is answered with what the server
remembers about its caller, and what the caller states about themselves is remembered.

The scope is the API key's name (``Metered.key``; ``anonymous`` on a server without keys, where every
caller shares one scope): nothing in the request body can name another user's memories. The facts come
from the last user message only (a client resending its history restates, and restatements merge).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class ServerMemory:
    store: Any  # slmforge.memory.MemoryStore
    k: int = 5
    extract: bool = True


def with_memory(memory: ServerMemory, key: str, raw: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The messages with a system message of the caller's relevant memories in front; stores what the last
    user message states."""
    from slmforge.memory import Scope, context_for, remember_conversation

    scope = Scope.user(key)
    last = next((m for m in reversed(raw) if m["role"] == "user" and isinstance(m["content"], str)), None)
    if last is None:
        return raw
    context = context_for(memory.store, scope, last["content"], memory.k)
    if memory.extract:
        remember_conversation(memory.store, scope, [last])
    return raw if context is None else [{"role": "system", "content": context}, *raw]
