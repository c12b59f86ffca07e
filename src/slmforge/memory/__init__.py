"""Per-user memory: ``slmforge memory add|search|list|forget|erase|export`` and memory in the server.

    from slmforge.memory import MemoryStore, Scope, remember_conversation, context_for
    store = MemoryStore("runs/memory.sqlite", embedder)          # any object with name, dimensions, embed()
    alice = Scope.user("alice")                                   # the server takes it from the API key
    remember_conversation(store, alice, [{"role": "user", "content": "My name is Alice. I prefer tabs."}])
    store.recall(alice, "what indentation does she like?")        # relevance x recency x importance
    store.erase(alice)                                            # every row, then VACUUM

Storage and isolation: ``store.py``; extraction, windowing and prompt context: ``conversation.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from slmforge.memory.conversation import context_for, remember_conversation, rule_facts, window
from slmforge.memory.store import KINDS, Memory, MemoryStore, Scope

__all__ = ["KINDS", "Memory", "MemoryStore", "Scope", "context_for", "load_embedder", "open_store",
           "remember_conversation", "rule_facts", "window"]


class _Embedder:
    """slmforge.embed.Embedder with numpy rows, as the store wants them."""

    def __init__(self, folder: Path) -> None:
        from slmforge.embed import Embedder

        self.inner = Embedder.load(folder)
        self.name, self.dimensions = self.inner.name, self.inner.dimensions

    def embed(self, texts: list[str]) -> Any:
        import numpy as np

        return np.asarray(self.inner.embed(texts)[0], dtype=np.float32)


def load_embedder(folder: str | Path | None) -> Any:
    """A sentence-transformers folder, ``hashing[-DIM]`` (no model: tests, demos), or (None) the offline
    all-MiniLM-L6-v2 of the rag extra."""
    if isinstance(folder, str) and (folder == "hashing" or folder.startswith("hashing-")):
        from slmforge.embed import HashingEmbedder

        return HashingEmbedder(int(folder.split("-", 1)[1]) if "-" in folder else 256)
    if folder is None:
        from slmforge.embed import default_model_path

        folder = default_model_path()
    return _Embedder(Path(folder))


def open_store(cfg: Any, embedder: Any = None) -> MemoryStore:
    """The project's memory file (``memory.path``) with its embedder (``memory.embedder``)."""
    m = cfg.memory
    path = cfg.resolve(m.path) if m.path else cfg.stage_dir("memory") / "memory.sqlite"
    spec = m.embedder if m.embedder is None or m.embedder.startswith("hashing") else cfg.resolve(m.embedder)
    return MemoryStore(path, embedder or load_embedder(spec))
