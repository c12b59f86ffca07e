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


def test_lancedb_builds_an_ann_index_at_size_and_still_finds_the_nearest(tmp_path: Path, monkeypatch):
    from slmforge.rag.stores import LanceStore

    monkeypatch.setattr(LanceStore, "ANN_FROM", 800)
    store = LanceStore(tmp_path, DIM)
    vecs, ids = _vectors(1200, seed=3), _ids(1200)
    store.add(ids[:700], vecs[:700])
    assert not store._indexed()
    store.add(ids[700:], vecs[700:])
    assert store._indexed()
    found = sum(store.search(vecs[i], 5)[0][0] == ids[i] for i in range(0, 1200, 40))
    assert found == 30  # each stored vector is its own nearest neighbour through the index
    more = _vectors(300, seed=4)
    store.add(_ids(300, start=5000), more)  # a quarter not yet in the index: optimize folds it in
    assert store.table.index_stats("vector_idx").num_unindexed_rows == 0
    assert store.search(more[7], 1)[0][0] == _ids(300, start=5000)[7]
