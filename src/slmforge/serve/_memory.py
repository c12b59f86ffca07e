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
    window_tokens: int = 1024  # a session's turns kept whole; older ones are summarised


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


def with_session(memory: ServerMemory, key: str, session: str, raw: list[dict[str, Any]],
                 count: Any) -> list[dict[str, Any]]:
    """A request in a server-kept session: its user messages join the session's turns, and the model gets
    the request's system messages, a summary of turns older than ``memory.window_tokens`` (counted by
    ``count``), and the newest turns in full. The client sends only what is new."""
    from slmforge.memory import Scope, window

    scope = Scope.user(key)
    for m in raw:
        if m["role"] == "user" and isinstance(m["content"], str):
            memory.store.add_turn(scope, session, "user", m["content"])
    kept, summary = window(memory.store, scope, session, memory.window_tokens, count)
    system = [m for m in raw if m["role"] == "system"]
    earlier = [{"role": "system", "content": f"Earlier in this conversation: {summary}"}] if summary else []
    return [*system, *earlier, *({"role": t["role"], "content": t["content"]} for t in kept)]


def remember_reply(memory: ServerMemory, key: str, session: str, reply: Any) -> Any:
    """Keep the assistant's reply as the session's next turn: from a whole reply, or collected from a
    stream as it passes (the response is returned, its stream wrapped)."""
    from slmforge.memory import Scope

    scope = Scope.user(key)
    if isinstance(reply, dict):
        text = ((reply.get("choices") or [{}])[0].get("message") or {}).get("content") or ""
        memory.store.add_turn(scope, session, "assistant", text)
        return reply
    inner = reply.body_iterator

    async def collecting():
        import json

        said = []
        async for ev in inner:
            if isinstance(ev, str) and ev.startswith("data: {"):
                choices = json.loads(ev[6:]).get("choices") or []
                if choices:
                    said.append((choices[0].get("delta") or {}).get("content") or "")
            yield ev
        memory.store.add_turn(scope, session, "assistant", "".join(said))

    reply.body_iterator = collecting()
    return reply
