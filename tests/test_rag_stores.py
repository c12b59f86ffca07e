"""The vector-store contract, run against every store: LanceDB, Qdrant (local mode), FAISS and Chroma."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from slmforge.errors import ConfigError
from slmforge.rag.stores import STORES, open_store

DIM = 24


def _vectors(n: int, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=(n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _ids(n: int, start: int = 0) -> list[str]:
    return [f"{i:032x}" for i in range(start, start + n)]


@pytest.fixture(params=STORES)
def kind(request) -> str:
    return request.param


def test_nearest_neighbours_are_exact_and_scored_by_cosine(kind: str, tmp_path: Path):
    store = open_store(kind, tmp_path, DIM)
    vecs, ids = _vectors(60), _ids(60)
    store.add(ids, vecs)
    q = vecs[17] * 0.9 + vecs[3] * 0.1
    q /= np.linalg.norm(q)
    hits = store.search(q, 5)
    exact = np.argsort(-(vecs @ q))[:5]
    assert [h[0] for h in hits] == [ids[i] for i in exact]
    assert hits[0][1] == pytest.approx(float(vecs[17] @ q), abs=1e-4)
    assert store.count() == 60 and store.ids() == set(ids)
    store.close()


def test_delete_upsert_and_reopen(kind: str, tmp_path: Path):
    store = open_store(kind, tmp_path, DIM)
    vecs, ids = _vectors(20), _ids(20)
    store.add(ids, vecs)
    store.delete(ids[:5])
    store.add(ids[5:6], vecs[7:8])  # the same id again replaces its vector
    store.close()
    again = open_store(kind, tmp_path, DIM)
    assert again.count() == 15 and again.ids() == set(ids[5:])
    top = again.search(vecs[7], 2)
    assert {h[0] for h in top} == {ids[5], ids[7]}
    assert all(h[0] not in ids[:5] for h in again.search(vecs[2], 20))
    assert again.search(vecs[0], 0 + 3)  # a search asking for more than remains still answers
    again.close()


def test_an_empty_store_answers_nothing(kind: str, tmp_path: Path):
    store = open_store(kind, tmp_path, DIM)
    assert store.search(_vectors(1)[0], 3) == [] and store.count() == 0
    store.delete(_ids(2))  # deleting what is not there is not an error
    store.close()


def test_unknown_store_is_named():
    with pytest.raises(ConfigError, match="Unknown vector store 'pinecone'.*lancedb, qdrant, faiss, chroma"):
        open_store("pinecone", Path("/tmp/none"), DIM)
