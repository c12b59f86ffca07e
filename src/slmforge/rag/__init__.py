"""Retrieval-augmented generation over your own documents: ``slmforge rag index|query|eval|info|migrate``.

    from slmforge.rag import open_index, retrieve, answer
    index = open_index(cfg)                      # the project's rag section: folder, embedder, store
    index.update(documents)                      # data-stage Documents; incremental and atomic
    hits = retrieve(index, "How do I read a file?", mode="hybrid", k=5)
    reply = answer(index, generator, "How do I read a file?")   # cited, or "not in the documents"

Layers: chunkers (``chunkers.py``) -> embedders (``embedders.py``) -> stores (``stores.py``) -> the index
(``index.py``: SQLite catalog + store + BM25) -> retrieval (``retrieve.py``) -> answers (``answer.py``)
-> evaluation (``evaluate.py``). Models are reached only through the ``Generator`` protocol and
``slmforge.embed``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from slmforge.rag.answer import NOT_IN_DOCUMENTS, Answer, answer
from slmforge.rag.chunkers import CHUNKERS, Chunk, chunk_text
from slmforge.rag.embedders import EndpointEmbedder, HashingEmbedder, LocalEmbedder, load_embedder
from slmforge.rag.index import ChunkSettings, Index, UpdateStats
from slmforge.rag.retrieve import MODES, Hit, retrieve
from slmforge.rag.stores import STORES

if TYPE_CHECKING:
    from slmforge.config import ProjectConfig

__all__ = ["CHUNKERS", "MODES", "NOT_IN_DOCUMENTS", "STORES", "Answer", "Chunk", "ChunkSettings",
           "EndpointEmbedder", "HashingEmbedder", "Hit", "Index", "LocalEmbedder", "UpdateStats", "answer",
           "chunk_settings", "chunk_text", "index_folder", "load_embedder", "open_index", "retrieve"]


def index_folder(cfg: ProjectConfig) -> Any:
    """The index folder: ``rag.out``, else ``<project.out_dir>/rag``."""
    return cfg.stage_dir("rag", cfg.rag.out)


def chunk_settings(cfg: ProjectConfig) -> ChunkSettings:
    r = cfg.rag
    return ChunkSettings(r.chunker, r.chunk_tokens, r.overlap_tokens, r.semantic_percentile)


def open_index(cfg: ProjectConfig, embedder: Any = None, store: str | None = None, create: bool = False) -> Index:
    """The project's index, opened with its configured (or the given) embedder and store.

    Raises:
        RagError: No index there (unless ``create``), or it was built with another embedder or store.
    """
    from slmforge.errors import RagError
    from slmforge.rag.index import recorded

    if not create and recorded(index_folder(cfg), "store") is None:
        raise RagError(f"No knowledge index at {index_folder(cfg)}: build it with `slmforge rag index` "
                       "(sources: rag.sources, else data.sources).")
    emb = embedder or load_embedder(cfg.rag.embedder, cfg.rag.embedder_model, cfg.resolve)
    return Index.open(index_folder(cfg), emb, store or cfg.rag.store, cfg.rag.store_url)
