"""A knowledge index: a SQLite catalog (documents, chunks with spans and vectors, the embedder's identity)
plus a vector store (``rag/stores.py``) and a BM25 index (bm25s) over the same chunks.

Incremental: ``update(documents)`` compares each document's content hash with the catalog's; only new
and changed documents are chunked, and a chunk whose text the catalog already holds reuses its vector,
so re-indexing an unchanged corpus embeds nothing. Documents no longer given are deleted.

Atomic: the catalog decides which chunks exist and changes in one SQLite transaction at the end of a
run. New vectors go into the store before that commit and removed ones leave it after, so a run killed
at any point leaves the previous index whole: the store may hold vectors of chunks the catalog does not
list, which searches ignore and the next run deletes. The BM25 index is rebuilt after the commit and
carries the catalog version it was built from; a stale one is rebuilt on first use.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from slmforge.errors import RagError
from slmforge.rag.chunkers import Chunk, batched_sentence_embed, chunk_document
from slmforge.rag.embedders import TextEmbedder
from slmforge.rag.stores import Store, open_store

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS docs (id TEXT PRIMARY KEY, source TEXT, title TEXT, kind TEXT, hash TEXT, text TEXT);
CREATE TABLE IF NOT EXISTS chunks (id TEXT PRIMARY KEY, doc_id TEXT NOT NULL, start INTEGER, "end" INTEGER,
    text TEXT, hash TEXT, source TEXT, title TEXT, kind TEXT, vector BLOB);
CREATE INDEX IF NOT EXISTS chunks_doc ON chunks(doc_id);
CREATE INDEX IF NOT EXISTS chunks_hash ON chunks(hash);
"""
_DIRTY = "store-dirty"  # present while the store may hold vectors the catalog does not list
_SEMANTIC_GROUP = 256  # documents whose sentences the semantic chunker embeds in one call


@dataclass
class UpdateStats:
    documents: int = 0
    added: int = 0
    changed: int = 0
    unchanged: int = 0
    deleted: int = 0
    chunks: int = 0
    embedded: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(vars(self))


@dataclass
class ChunkSettings:
    chunker: str = "recursive"
    size: int = 200
    overlap: int = 40
    percentile: float = 25.0

    def key(self) -> str:
        return json.dumps(vars(self), sort_keys=True)


def _doc_hash(doc: Any) -> str:
    return hashlib.sha256(f"{doc.path or doc.source}\x00{doc.title}\x00{doc.text}".encode(
        "utf-8", "surrogatepass")).hexdigest()[:32]


def recorded(folder: str | Path, key: str) -> Any:
    """A value an existing index's catalog records (``store``, ``embedder``, ``chunking``); None when
    there is no index there."""
    file = Path(folder) / "catalog.sqlite"
    if not file.is_file():
        return None
    db = sqlite3.connect(file)
    try:
        row = db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    finally:
        db.close()
    return json.loads(row[0]) if row else None


def open_recorded(folder: str | Path, url: str | None = None) -> Index | None:
    """An existing index with the embedder and store its catalog records, the model not loaded (for
    what needs no new vectors: counts, migration); None when there is no index there."""
    from slmforge.rag.embedders import RecordedEmbedder

    identity, store = recorded(folder, "embedder"), recorded(folder, "store")
    if identity is None or store is None:
        return None
    return Index.open(folder, RecordedEmbedder(identity), store, url)


class Index:
    """An index folder. Open with ``Index.open(folder, embedder, store)``; ``update`` with documents; read
    with ``rag.retrieve``."""

    def __init__(self, folder: Path, embedder: TextEmbedder, store_kind: str, store_url: str | None = None) -> None:
        self.folder, self.embedder = Path(folder), embedder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.folder / "catalog.sqlite", timeout=30, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.executescript(_SCHEMA)
        self._check_identity(store_kind)
        self.store_kind = store_kind
        self.store: Store = open_store(store_kind, self.folder, embedder.dimensions, store_url)
        self._bm25: Any = None

    @classmethod
    def open(cls, folder: str | Path, embedder: TextEmbedder, store: str = "lancedb",
             store_url: str | None = None) -> Index:
        return cls(Path(folder), embedder, store, store_url)

    # ------------------------------------------------------------------ identity
    def meta(self, key: str, default: Any = None) -> Any:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else default

    def _set_meta(self, key: str, value: Any) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, json.dumps(value)))

    def _check_identity(self, store_kind: str) -> None:
        mine, theirs = self.embedder.identity(), self.meta("embedder")
        if theirs is None:
            with self.db:
                self._set_meta("embedder", mine)
                self._set_meta("store", store_kind)
                self._set_meta("version", 0)
            return
        if theirs != mine:
            raise RagError(
                f"The index {self.folder} was built with the embedder {theirs} and cannot be searched with "
                f"{mine}: vectors of different models are not comparable. Use the index's embedder "
                "(rag.embedder), or index into a new folder (rag.out)."
            )
        if self.meta("store") != store_kind:
            raise RagError(
                f"The index {self.folder} keeps its vectors in {self.meta('store')}, not {store_kind}. Move it "
                f"with `slmforge rag migrate --to {store_kind}`, or set rag.store: {self.meta('store')}."
            )

    @property
    def version(self) -> int:
        return int(self.meta("version", 0))

    # ------------------------------------------------------------------ update
    def update(self, documents: Iterable[Any], settings: ChunkSettings | None = None, delete_missing: bool = True,
               progress: bool = True) -> UpdateStats:
        """Make the index hold exactly ``documents`` (data-stage ``Document``s), embedding only new text.

        Args:
            delete_missing: Delete indexed documents not given (False: only add and update).
        """
        settings = settings or ChunkSettings()
        docs = list(documents)
        stats = UpdateStats(documents=len(docs))
        rechunk_all = self.meta("chunking") != settings.key()
        known = dict(self.db.execute("SELECT id, hash FROM docs"))
        todo = []
        for d in docs:
            h = _doc_hash(d)
            if d.id not in known:
                stats.added += 1
            elif known[d.id] != h or rechunk_all:
                stats.changed += 1
            else:
                stats.unchanged += 1
                continue
            todo.append((d, h))
        given = {d.id for d in docs}
        gone = [i for i in known if i not in given] if delete_missing else []
        stats.deleted = len(gone)
        chunks = self._chunk([d for d, _ in todo], settings, progress)
        vectors = self._vectors(chunks, stats, progress)
        replaced = [d.id for d, _ in todo if d.id in known] + gone
        old_ids = [r[0] for i in replaced for r in self.db.execute("SELECT id FROM chunks WHERE doc_id = ?", (i,))]
        new_ids = {c.id for c in chunks}
        (self.folder / _DIRTY).touch()
        self.store.add([c.id for c in chunks], vectors)
        with self.db:  # the commit: one transaction
            for doc_id in replaced:
                self.db.execute("DELETE FROM chunks WHERE doc_id = ?", (doc_id,))
                self.db.execute("DELETE FROM docs WHERE id = ?", (doc_id,))
            self.db.executemany("INSERT INTO docs VALUES (?, ?, ?, ?, ?, ?)",
                                [(d.id, d.path or d.source, d.title, d.kind, h, d.text) for d, h in todo])
            self.db.executemany(
                "INSERT OR REPLACE INTO chunks VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(c.id, c.doc_id, c.start, c.end, c.text, c.hash, c.source, c.title, c.meta.get("kind", ""),
                  v.astype(np.float32).tobytes()) for c, v in zip(chunks, vectors)])
            self._set_meta("chunking", settings.key())
            if todo or gone:
                self._set_meta("version", self.version + 1)
        self.store.delete([i for i in old_ids if i not in new_ids])
        self.reconcile()
        stats.chunks = self.count()
        if todo or gone:
            self.bm25()  # rebuilt now, so the first query does not pay for it
        return stats

    def _chunk(self, docs: list[Any], s: ChunkSettings, progress: bool) -> list[Chunk]:
        from slmforge._progress import progress_bar

        embed = None
        out: list[Chunk] = []
        with progress_bar(progress and len(docs) > 50) as bar:
            task = bar.add_task("chunking", total=len(docs), info="")
            for i, d in enumerate(docs):
                if s.chunker == "semantic" and i % _SEMANTIC_GROUP == 0:  # the group's sentences in one call
                    group = [g.text for g in docs[i : i + _SEMANTIC_GROUP]]
                    embed = batched_sentence_embed(group, self.embedder.embed)
                out.extend(chunk_document(d, s.chunker, s.size, s.overlap, self.embedder.token_spans, embed,
                                          s.percentile))
                bar.update(task, advance=1, info=f"{len(out)} chunks")
        unique: dict[str, Chunk] = {c.id: c for c in out}  # identical spans of one document count once
        return list(unique.values())

    def _vectors(self, chunks: list[Chunk], stats: UpdateStats, progress: bool, batch: int = 64) -> np.ndarray:
        """Each chunk's vector: the catalog's for text it already holds, else newly embedded."""
        from slmforge._progress import progress_bar

        out = np.zeros((len(chunks), self.embedder.dimensions), np.float32)
        missing: dict[str, list[int]] = {}
        for i, c in enumerate(chunks):
            row = self.db.execute("SELECT vector FROM chunks WHERE hash = ? LIMIT 1", (c.hash,)).fetchone()
            if row:
                out[i] = np.frombuffer(row[0], np.float32)
            else:
                missing.setdefault(c.hash, []).append(i)
        texts = [chunks[ix[0]].text for ix in missing.values()]
        slots = list(missing.values())
        with progress_bar(progress and len(texts) > batch) as bar:
            task = bar.add_task("embedding", total=len(texts), info=self.embedder.name)
            for start in range(0, len(texts), batch):
                vecs = self.embedder.embed(texts[start : start + batch])
                for j, v in enumerate(vecs):
                    out[slots[start + j]] = v
                bar.update(task, advance=len(vecs))
        stats.embedded = len(texts)
        return out

    def reconcile(self) -> int:
        """Delete store vectors the catalog does not list (left by a run killed before its commit)."""
        if not (self.folder / _DIRTY).exists():
            return 0
        known = {r[0] for r in self.db.execute("SELECT id FROM chunks")}
        orphans = [i for i in self.store.ids() if i not in known]
        self.store.delete(orphans)
        missing = [i for i in known if i not in self.store.ids()] if self.store.count() < len(known) else []
        if missing:  # a store that lost vectors (e.g. deleted by hand) gets them back from the catalog
            self._restore(missing)
        (self.folder / _DIRTY).unlink()
        return len(orphans)

    def _restore(self, ids: list[str]) -> None:
        for start in range(0, len(ids), 1000):
            part = ids[start : start + 1000]
            rows = self.db.execute(f"SELECT id, vector FROM chunks WHERE id IN ({','.join('?' * len(part))})", part)
            got = list(rows)
            self.store.add([r[0] for r in got], np.stack([np.frombuffer(r[1], np.float32) for r in got]))

    # ------------------------------------------------------------------ reading
    def count(self) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM chunks").fetchone()[0])

    def documents(self) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM docs").fetchone()[0])

    def chunks(self, ids: list[str]) -> dict[str, Chunk]:
        """The catalog's chunks among ``ids`` (ids it does not list are left out)."""
        out: dict[str, Chunk] = {}
        for start in range(0, len(ids), 900):
            part = ids[start : start + 900]
            q = (f'SELECT id, doc_id, text, start, "end", source, title, kind FROM chunks '
                 f"WHERE id IN ({','.join('?' * len(part))})")
            for cid, doc, text, a, b, source, title, kind in self.db.execute(q, part):
                out[cid] = Chunk(doc, text, a, b, source, title, {"kind": kind})
        return out

    def vectors(self, ids: list[str]) -> np.ndarray:
        found = {}
        for start in range(0, len(ids), 900):
            part = ids[start : start + 900]
            for cid, blob in self.db.execute(
                    f"SELECT id, vector FROM chunks WHERE id IN ({','.join('?' * len(part))})", part):
                found[cid] = np.frombuffer(blob, np.float32)
        return np.stack([found[i] for i in ids]) if ids else np.zeros((0, self.embedder.dimensions), np.float32)

    def filtered_ids(self, where: dict[str, Any]) -> list[str]:
        """Ids of chunks whose ``source``, ``kind``, ``title`` or ``doc_id`` match (a value or a list;
        ``source`` also takes a glob such as ``docs/*.md``)."""
        clauses, args = [], []
        for field, value in where.items():
            if field not in ("source", "kind", "title", "doc_id"):
                raise RagError(f"Unknown filter field {field!r}; filter on source, kind, title or doc_id.")
            values = value if isinstance(value, list) else [value]
            op = "GLOB" if field == "source" and any(ch in str(v) for v in values for ch in "*?[") else "="
            clauses.append("(" + " OR ".join(f"{field} {op} ?" for _ in values) + ")")
            args.extend(str(v) for v in values)
        sql = "SELECT id FROM chunks" + (" WHERE " + " AND ".join(clauses) if clauses else "")
        return [r[0] for r in self.db.execute(sql, args)]

    def document_text(self, doc_id: str) -> str:
        row = self.db.execute("SELECT text FROM docs WHERE id = ?", (doc_id,)).fetchone()
        return row[0] if row else ""

    def bm25(self) -> Any:
        """The bm25s retriever over every chunk and the chunk ids in its order, rebuilt when stale."""
        version = self.version
        if self._bm25 is not None and self._bm25[0] == version:
            return self._bm25[1:]
        try:
            import bm25s
        except ImportError:
            raise RagError("BM25 and hybrid retrieval need bm25s: pip install slmforge[rag]") from None
        folder = self.folder / f"bm25-{version}"
        ids_file = folder / "chunk_ids.json"
        if ids_file.is_file():
            retriever = bm25s.BM25.load(str(folder))
            ids = json.loads(ids_file.read_text())
        else:
            rows = list(self.db.execute("SELECT id, text FROM chunks ORDER BY id"))
            ids = [r[0] for r in rows]
            retriever = bm25s.BM25()
            if rows:
                retriever.index(bm25s.tokenize([r[1] for r in rows], stopwords="en", show_progress=False),
                                show_progress=False)
            tmp = self.folder / f"bm25-{version}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            if rows:
                retriever.save(str(tmp))
            tmp.mkdir(exist_ok=True)
            (tmp / "chunk_ids.json").write_text(json.dumps(ids))
            shutil.rmtree(folder, ignore_errors=True)
            tmp.rename(folder)
            for old in self.folder.glob("bm25-*"):
                if old != folder:
                    shutil.rmtree(old, ignore_errors=True)
        self._bm25 = (version, retriever, ids)
        return retriever, ids

    # ------------------------------------------------------------------ moving
    def migrate(self, kind: str, url: str | None = None, progress: bool = True) -> None:
        """Rebuild the vectors in another store from the catalog, then switch the index to it."""
        target = open_store(kind, self.folder, self.embedder.dimensions, url)
        ids = [r[0] for r in self.db.execute("SELECT id FROM chunks")]
        for start in range(0, len(ids), 2000):
            part = ids[start : start + 2000]
            target.add(part, self.vectors(part))
        with self.db:
            self._set_meta("store", kind)
        old = self.store_kind
        self.store.close()
        self.store, self.store_kind = target, kind
        if old != kind:
            shutil.rmtree(self.folder / old, ignore_errors=True)

    def close(self) -> None:
        self.store.close()
        self.db.close()
