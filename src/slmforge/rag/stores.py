"""Vector stores behind one small interface: ``add(ids, vectors)``, ``delete(ids)``, ``search(vector, k)`` ->
[(id, cosine similarity)], ``ids()``, ``count()``, ``close()``.

The index's SQLite catalog (``rag/index.py``) holds the chunks, their text, spans and vectors, and decides
which chunks exist; a store is the nearest-neighbour search over those vectors. So a store may briefly hold
vectors the catalog does not know (a run killed after ``add``, before its commit: the index filters them
out and removes them on its next run), switching stores is one config key, and migrating an index is
rebuilding a store from the catalog.

- ``lancedb`` (default): embedded and persistent, in ``<index>/lancedb``.
- ``qdrant``: qdrant-client's local mode in ``<index>/qdrant``, or a server at ``rag.store_url``.
- ``faiss``: an exact inner-product index (``IndexIDMap2(IndexFlatIP)``) in ``<index>/faiss.index``.
- ``chroma``: a ``PersistentClient`` in ``<index>/chroma`` (cosine space).
"""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from slmforge.errors import ConfigError

STORES = ("lancedb", "qdrant", "faiss", "chroma")
_TABLE = "chunks"


class Store(Protocol):
    def add(self, ids: list[str], vectors: np.ndarray) -> None: ...
    def delete(self, ids: list[str]) -> None: ...
    def search(self, vector: np.ndarray, k: int) -> list[tuple[str, float]]: ...
    def ids(self) -> set[str]: ...
    def count(self) -> int: ...
    def close(self) -> None: ...


def _need(module: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"This vector store needs {module}: pip install slmforge[rag]") from None


class LanceStore:
    """LanceDB: a flat (exact) scan below ``ANN_FROM`` rows; from there an IVF-PQ index (cosine), built once
    and then kept current by ``optimize`` when a tenth of the rows are not in it yet, searched with
    ``NPROBES`` partitions and re-ranked exactly over ``REFINE`` x k candidates. Measured in
    benchmarks/rag_scale.py: a flat scan of 100k x 384 takes ~190 ms here, the index ~10 ms."""

    ANN_FROM = 50_000
    NPROBES = 24
    REFINE = 10

    def __init__(self, folder: Path, dimensions: int) -> None:
        lancedb = _need("lancedb")
        self.pa = _need("pyarrow")
        self.dimensions = dimensions
        self.db = lancedb.connect(str(folder))
        self.schema = self.pa.schema([("id", self.pa.string()),
                                      ("vector", self.pa.list_(self.pa.float32(), dimensions))])
        self.table = (self.db.open_table(_TABLE) if _TABLE in self.db.list_tables().tables
                      else self.db.create_table(_TABLE, schema=self.schema))

    def add(self, ids: list[str], vectors: np.ndarray) -> None:
        if not ids:
            return
        flat = self.pa.array(np.asarray(vectors, np.float32).reshape(-1), self.pa.float32())
        column = self.pa.FixedSizeListArray.from_arrays(flat, self.dimensions)
        rows = self.pa.Table.from_arrays([self.pa.array(ids), column], schema=self.schema)
        # an id added again (a run that died before its commit) replaces its row: an upsert on id
        self.table.merge_insert("id").when_matched_update_all().when_not_matched_insert_all().execute(rows)
        self._index()

    def _indexed(self) -> bool:
        return any(ix.name == "vector_idx" for ix in self.table.list_indices())

    def _index(self) -> None:
        n = self.table.count_rows()
        if n < self.ANN_FROM:
            return
        if not self._indexed():
            from lancedb.index import IvfPq

            self.table.create_index("vector", config=IvfPq(distance_type="cosine", num_partitions=max(8, int(n ** 0.5)),
                                                           num_sub_vectors=max(1, self.dimensions // 8)))
            return
        stats = self.table.index_stats("vector_idx")
        if stats is not None and stats.num_unindexed_rows > n // 10:
            self.table.optimize()  # folds the new rows into the index

    def delete(self, ids: list[str]) -> None:
        for i in range(0, len(ids), 500):
            quoted = ", ".join(f"'{x}'" for x in ids[i : i + 500])  # ids are hex digests: nothing to escape
            self.table.delete(f"id IN ({quoted})")

    def search(self, vector: np.ndarray, k: int) -> list[tuple[str, float]]:
        query = self.table.search(np.asarray(vector, np.float32)).distance_type("cosine").limit(k)
        if self.table.count_rows() >= self.ANN_FROM and self._indexed():
            query = query.nprobes(self.NPROBES).refine_factor(self.REFINE)
        rows = query.to_list()
        return [(r["id"], 1.0 - float(r["_distance"])) for r in rows]

    def ids(self) -> set[str]:
        return set(self.table.to_arrow().column("id").to_pylist())

    def count(self) -> int:
        return int(self.table.count_rows())

    def close(self) -> None:
        pass


def _point_id(chunk_id: str) -> str:
    return str(uuid.UUID(hex=chunk_id[:32].ljust(32, "0")))


class QdrantStore:
    def __init__(self, folder: Path, dimensions: int, url: str | None = None) -> None:
        _need("qdrant_client")
        from qdrant_client import QdrantClient, models

        self.models = models
        self.client = QdrantClient(url=url) if url else QdrantClient(path=str(folder))
        if not self.client.collection_exists(_TABLE):
            self.client.create_collection(_TABLE, vectors_config=models.VectorParams(
                size=dimensions, distance=models.Distance.COSINE))

    def add(self, ids: list[str], vectors: np.ndarray) -> None:
        if ids:
            points = [self.models.PointStruct(id=_point_id(i), vector=v.tolist(), payload={"chunk": i})
                      for i, v in zip(ids, np.asarray(vectors, np.float32))]
            self.client.upsert(_TABLE, points=points, wait=True)

    def delete(self, ids: list[str]) -> None:
        if ids:
            self.client.delete(_TABLE, points_selector=self.models.PointIdsList(
                points=[_point_id(i) for i in ids]), wait=True)

    def search(self, vector: np.ndarray, k: int) -> list[tuple[str, float]]:
        hits = self.client.query_points(_TABLE, query=np.asarray(vector, np.float32).tolist(), limit=k,
                                        with_payload=True).points
        return [(h.payload["chunk"], float(h.score)) for h in hits if h.payload]

    def ids(self) -> set[str]:
        out: set[str] = set()
        offset = None
        while True:
            points, offset = self.client.scroll(_TABLE, limit=1000, offset=offset, with_payload=True)
            out.update(p.payload["chunk"] for p in points if p.payload)
            if offset is None:
                return out

    def count(self) -> int:
        return int(self.client.count(_TABLE, exact=True).count)

    def close(self) -> None:
        self.client.close()


def _int_id(chunk_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(chunk_id.encode(), digest_size=8).digest(), "little") >> 1


class FaissStore:
    """Exact search (a flat index): FAISS's approximate indexes need training data and tuning this
    interface does not expose; at 100k x 384 a flat scan is well within interactive latency."""

    def __init__(self, folder: Path, dimensions: int) -> None:
        self.faiss = _need("faiss")
        self.file = folder / "faiss.index"
        self.names_file = folder / "faiss.ids"
        folder.mkdir(parents=True, exist_ok=True)
        if self.file.is_file():
            self.index = self.faiss.read_index(str(self.file))
            self.names = dict(line.split("\t") for line in self.names_file.read_text().split("\n") if line)
        else:
            self.index = self.faiss.IndexIDMap2(self.faiss.IndexFlatIP(dimensions))
            self.names = {}

    def _save(self) -> None:
        tmp, names_tmp = self.file.with_suffix(".index.tmp"), self.names_file.with_suffix(".ids.tmp")
        self.faiss.write_index(self.index, str(tmp))
        names_tmp.write_text("".join(f"{k}\t{v}\n" for k, v in self.names.items()))
        os.replace(names_tmp, self.names_file)
        os.replace(tmp, self.file)

    def add(self, ids: list[str], vectors: np.ndarray) -> None:
        if not ids:
            return
        self.delete(ids, save=False)
        keys = np.array([_int_id(i) for i in ids], dtype=np.int64)
        self.index.add_with_ids(np.ascontiguousarray(vectors, np.float32), keys)
        self.names.update({str(k): i for k, i in zip(keys, ids)})
        self._save()

    def delete(self, ids: list[str], save: bool = True) -> None:
        keys = np.array([_int_id(i) for i in ids], dtype=np.int64)
        if len(keys):
            self.index.remove_ids(keys)
            for k in keys:
                self.names.pop(str(k), None)
            if save:
                self._save()

    def search(self, vector: np.ndarray, k: int) -> list[tuple[str, float]]:
        if self.index.ntotal == 0:
            return []
        scores, keys = self.index.search(np.asarray(vector, np.float32).reshape(1, -1), min(k, self.index.ntotal))
        return [(self.names[str(key)], float(s)) for s, key in zip(scores[0], keys[0]) if key >= 0]

    def ids(self) -> set[str]:
        return set(self.names.values())

    def count(self) -> int:
        return int(self.index.ntotal)

    def close(self) -> None:
        pass


class ChromaStore:
    def __init__(self, folder: Path, dimensions: int) -> None:
        chromadb = _need("chromadb")
        from chromadb.config import Settings

        self.client = chromadb.PersistentClient(path=str(folder), settings=Settings(anonymized_telemetry=False))
        self.collection = self.client.get_or_create_collection(
            _TABLE, metadata={"hnsw:space": "cosine"}, embedding_function=None)

    def add(self, ids: list[str], vectors: np.ndarray) -> None:
        for i in range(0, len(ids), 4000):  # chroma caps one call's batch
            self.collection.upsert(ids=ids[i : i + 4000], embeddings=np.asarray(vectors[i : i + 4000], np.float32))

    def delete(self, ids: list[str]) -> None:
        if ids:
            self.collection.delete(ids=ids)

    def search(self, vector: np.ndarray, k: int) -> list[tuple[str, float]]:
        n = self.collection.count()
        if n == 0:
            return []
        r = self.collection.query(query_embeddings=[np.asarray(vector, np.float32)], n_results=min(k, n),
                                  include=["distances"])
        return [(i, 1.0 - float(d)) for i, d in zip(r["ids"][0], r["distances"][0])]

    def ids(self) -> set[str]:
        return set(self.collection.get(include=[])["ids"])

    def count(self) -> int:
        return int(self.collection.count())

    def close(self) -> None:
        pass


def open_store(kind: str, folder: Path, dimensions: int, url: str | None = None) -> Store:
    """The store ``kind`` keeping its files under ``folder``.

    Raises:
        ConfigError: An unknown store, or its package is not installed.
    """
    if kind == "lancedb":
        return LanceStore(folder / "lancedb", dimensions)
    if kind == "qdrant":
        return QdrantStore(folder / "qdrant", dimensions, url)
    if kind == "faiss":
        return FaissStore(folder / "faiss", dimensions)
    if kind == "chroma":
        return ChromaStore(folder / "chroma", dimensions)
    raise ConfigError(f"Unknown vector store {kind!r} (rag.store); choose one of {', '.join(STORES)}.")
