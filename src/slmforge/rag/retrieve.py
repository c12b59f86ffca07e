"""Retrieval over an ``Index``: dense, BM25 (bm25s), hybrid by reciprocal-rank fusion, MMR, metadata
filters on every mode, and optional reranking.

    hits = retrieve(index, "How do I open a file?", mode="hybrid", k=5, where={"source": "docs/*.md"})

Every ``Hit`` carries its dense cosine similarity to the question, whatever the mode ranked it by: the
answer step compares that with ``rag.min_score`` to decide that nothing retrieved is relevant.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from slmforge.errors import RagError
from slmforge.rag.chunkers import Chunk
from slmforge.rag.index import Index

MODES = ("dense", "bm25", "hybrid")
RRF_K = 60  # the constant of Cormack et al. (2009), also LanceDB's and Elasticsearch's default
_EXACT_FILTERED = 20_000  # a filter leaving at most this many chunks is scored exactly, from the catalog


@dataclass
class Hit:
    id: str
    chunk: Chunk
    score: float  # what the mode ranked by (cosine, BM25, fused reciprocal rank, reranker score)
    dense: float  # cosine similarity between the question and the chunk


def rrf(rankings: list[list[str]], k: int = RRF_K) -> list[tuple[str, float]]:
    """Reciprocal-rank fusion: each id scores the sum of 1 / (k + rank) over the rankings it is in."""
    scores: dict[str, float] = {}
    for ranking in rankings:
        for rank, cid in enumerate(ranking, start=1):
            scores[cid] = scores.get(cid, 0.0) + 1.0 / (k + rank)
    return sorted(scores.items(), key=lambda x: -x[1])


def mmr(query: np.ndarray, vectors: np.ndarray, k: int, lam: float = 0.5) -> list[int]:
    """Maximal marginal relevance: indices of ``k`` rows, each chosen for its similarity to the query
    (weight ``lam``) minus its greatest similarity to those already chosen (weight ``1 - lam``)."""
    if len(vectors) == 0:
        return []
    rel = vectors @ query
    chosen = [int(np.argmax(rel))]
    while len(chosen) < min(k, len(vectors)):
        redundancy = (vectors @ vectors[chosen].T).max(axis=1)
        score = lam * rel - (1 - lam) * redundancy
        score[chosen] = -np.inf
        chosen.append(int(np.argmax(score)))
    return chosen


def _dense(index: Index, q: np.ndarray, n: int, allowed: set[str] | None) -> list[tuple[str, float]]:
    if allowed is not None and len(allowed) <= _EXACT_FILTERED:
        ids = sorted(allowed)
        scores = index.vectors(ids) @ q if ids else np.zeros(0)
        order = np.argsort(-scores)[:n]
        return [(ids[i], float(scores[i])) for i in order]
    want = n if allowed is None else n * 8
    hits = index.store.search(q, want + 16)  # slack: the store may hold vectors of uncommitted chunks
    known = index.chunks([h[0] for h in hits])
    return [(cid, s) for cid, s in hits if cid in known and (allowed is None or cid in allowed)][:n]


def _bm25(index: Index, query: str, n: int, allowed: set[str] | None) -> list[tuple[str, float]]:
    import bm25s

    retriever, ids = index.bm25()
    if not ids:
        return []
    tokens = bm25s.tokenize([query], stopwords="en", show_progress=False)
    if not tokens.vocab:  # only stop words: BM25 has nothing to match
        return []
    want = len(ids) if allowed is not None else min(n, len(ids))
    docs, scores = retriever.retrieve(tokens, k=want, show_progress=False, n_threads=1)
    out = [(ids[int(d)], float(s)) for d, s in zip(docs[0], scores[0]) if s > 0]
    return [(cid, s) for cid, s in out if allowed is None or cid in allowed][:n]


def _rerank(index: Index, query: str, hits: list[Hit], how: str, reranker: Any, generator: Any) -> list[Hit]:
    if how == "cross-encoder":
        if reranker is None:
            raise RagError("rag.rerank: cross-encoder needs rag.reranker, a sentence-transformers CrossEncoder folder.")
        from sentence_transformers import CrossEncoder

        model = reranker if isinstance(reranker, CrossEncoder) else CrossEncoder(str(reranker), device="cpu")
        scores = model.predict([(query, h.chunk.text) for h in hits], show_progress_bar=False)
    elif how == "generator":
        from slmforge.generate import as_engine

        if generator is None or not as_engine(generator).capabilities.loglikelihood:
            raise RagError("rag.rerank: generator needs a model whose engine scores log-likelihoods (the PyTorch "
                           "engine); use rerank: cross-encoder or none with this one.")
        # Relevance as pointwise mutual information: how much the passage raises the probability of the
        # question, so long or common questions are not favoured for their own sake.
        ll = as_engine(generator).loglikelihood(
            [(f"Passage: {h.chunk.text}\nQuestion:", f" {query}") for h in hits] + [("Question:", f" {query}")])
        scores = np.asarray(ll[:-1]) - ll[-1]
    else:
        raise RagError(f"Unknown rerank {how!r} (rag.rerank); choose none, cross-encoder or generator.")
    for h, s in zip(hits, scores):
        h.score = float(s)
    return sorted(hits, key=lambda h: -h.score)


def retrieve(
    index: Index,
    query: str,
    mode: str = "hybrid",
    k: int = 5,
    where: dict[str, Any] | None = None,
    mmr_lambda: float | None = None,
    rerank: str = "none",
    reranker: Any = None,
    generator: Any = None,
) -> list[Hit]:
    """The ``k`` chunks of ``index`` most relevant to ``query``.

    Args:
        mode: ``dense``, ``bm25`` or ``hybrid`` (both, fused by reciprocal rank).
        where: Metadata filter (``Index.filtered_ids``): ``{"source": "docs/*.md", "kind": ["md", "txt"]}``.
        mmr_lambda: Diversify the top ``k`` from a larger pool by MMR (1 = relevance only).
        rerank: ``none``, ``cross-encoder`` (``reranker``: a folder or a loaded CrossEncoder) or
            ``generator`` (the model's log-likelihood of the question given each chunk).

    Raises:
        RagError: An unknown mode, rerank or filter field.
    """
    if mode not in MODES:
        raise RagError(f"Unknown retrieval mode {mode!r} (rag.mode); choose one of {', '.join(MODES)}.")
    q = index.embedder.embed([query])[0]
    allowed = set(index.filtered_ids(where)) if where else None
    pool = max(k * 4, 20) if (mmr_lambda is not None or rerank != "none") else k
    if mode == "dense":
        ranked = _dense(index, q, pool, allowed)
    elif mode == "bm25":
        ranked = _bm25(index, query, pool, allowed)
    else:
        n = max(pool, 20)
        ranked = rrf([[c for c, _ in _dense(index, q, n, allowed)], [c for c, _ in _bm25(index, query, n, allowed)]])
        ranked = ranked[:pool]
    ids = [c for c, _ in ranked]
    chunks = index.chunks(ids)
    ids = [c for c in ids if c in chunks]
    vecs = index.vectors(ids)
    dense = vecs @ q if len(ids) else np.zeros(0)
    score = dict(ranked)
    hits = [Hit(c, chunks[c], score[c], float(d)) for c, d in zip(ids, dense)]
    if rerank != "none" and hits:
        hits = _rerank(index, query, hits, rerank, reranker, generator)
    if mmr_lambda is not None and hits:
        order = mmr(q, index.vectors([h.id for h in hits]), k, mmr_lambda)
        hits = [hits[i] for i in order]
    return hits[:k]
