"""Per-user memory in one SQLite file: long-term memories (facts, preferences, summaries) with their
vectors, and each session's turns.

Isolation is enforced in the query itself: every read, search, update and delete goes through
``_where(scope)``, which binds the scope's kind and owner into ``WHERE scope = ? AND owner = ?``; no method
takes a free-form filter, so a user id that is not the caller's can never match. The organisation scope
(``Scope.org()``) is a separate owner that a user's recall reads alongside its own and never writes.

No vector database here: one user's memories are a few thousand rows at most, so the cosine similarity
is a numpy product over the rows the scoped SQL query returns, and the isolation stays one WHERE clause
instead of a second store whose filters would have to be kept in step. SQLite in WAL mode with a busy
timeout lets several threads and processes write at once without corrupting the file.
"""

from __future__ import annotations

import json
import math
import sqlite3
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from slmforge.errors import ConfigError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS memories (
    id INTEGER PRIMARY KEY AUTOINCREMENT, scope TEXT NOT NULL, owner TEXT NOT NULL, kind TEXT NOT NULL,
    subject TEXT, text TEXT NOT NULL, importance REAL NOT NULL, created REAL NOT NULL, updated REAL NOT NULL,
    superseded_by INTEGER, session TEXT, vector BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS memories_owner ON memories(scope, owner);
CREATE TABLE IF NOT EXISTS turns (
    id INTEGER PRIMARY KEY AUTOINCREMENT, scope TEXT NOT NULL, owner TEXT NOT NULL, session TEXT NOT NULL,
    role TEXT NOT NULL, content TEXT NOT NULL, created REAL NOT NULL);
CREATE INDEX IF NOT EXISTS turns_owner ON turns(scope, owner, session);
"""
KINDS = ("fact", "preference", "summary", "note")
DUPLICATE = 0.92  # cosine at or above which a new memory restates an old one


class TextEmbedder(Protocol):
    name: str
    dimensions: int

    def embed(self, texts: list[str]) -> np.ndarray: ...


@dataclass(frozen=True)
class Scope:
    """Whose memories: a user's (``Scope.user(id)``) or the organisation's (``Scope.org()``). The server
    makes it from the API key; nothing a client sends can choose it."""

    kind: str
    owner: str

    @classmethod
    def user(cls, owner: str) -> Scope:
        if not owner or not owner.strip():
            raise ConfigError("A memory scope needs a user id (--user).")
        return cls("user", owner)

    @classmethod
    def org(cls) -> Scope:
        return cls("org", "*")


@dataclass
class Memory:
    id: int
    kind: str
    text: str
    subject: str | None
    importance: float
    created: float
    updated: float
    superseded_by: int | None = None
    used: float | None = None  # when a recall last returned it (None: never)
    score: float = 0.0
    scope: str = "user"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class MemoryStore:
    """One SQLite file of memories; safe to share between threads (one connection per thread)."""

    HALF_LIFE_DAYS = 30.0  # recency halves every this many days since a memory was last updated or recalled

    def __init__(self, path: str | Path, embedder: TextEmbedder) -> None:
        self.path, self.embedder = Path(path), embedder
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        with self._db() as db:
            db.executescript(_SCHEMA)
            if "used" not in {row[1] for row in db.execute("PRAGMA table_info(memories)")}:
                db.execute("ALTER TABLE memories ADD COLUMN used REAL")  # files written before it existed
            row = db.execute("SELECT value FROM meta WHERE key = 'embedder'").fetchone()
            mine = {"name": embedder.name, "dimensions": embedder.dimensions}
            if row is None:
                db.execute("INSERT OR IGNORE INTO meta VALUES ('embedder', ?)", (json.dumps(mine),))
            elif json.loads(row[0]) != mine:
                raise ConfigError(f"The memory file {self.path} was written with the embedder {json.loads(row[0])}, "
                                  f"not {mine}: use that embedder (memory.embedder) or another file (memory.path).")

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=60, isolation_level=None)  # autocommit; BEGIN where needed
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA busy_timeout=60000")
            db.execute("PRAGMA secure_delete=ON")  # a deleted row's bytes are overwritten, not left in free pages
            self._local.db = db
        return db

    @staticmethod
    def _where(scope: Scope) -> tuple[str, tuple[str, str]]:
        """The one isolation clause: every statement on a scope's rows is built with it."""
        return "scope = ? AND owner = ?", (scope.kind, scope.owner)

    # ------------------------------------------------------------------ long-term memories
    def remember(self, scope: Scope, text: str, kind: str = "fact", importance: float = 0.5,
                 subject: str | None = None, session: str | None = None) -> int:
        """Store a memory; returns its id. A restatement (cosine >= ``DUPLICATE``) refreshes the old one; a
        newer memory about the same ``subject`` replaces the older (which stays, marked superseded)."""
        if kind not in KINDS:
            raise ConfigError(f"Unknown memory kind {kind!r}; one of {', '.join(KINDS)}.")
        vec = np.asarray(self.embedder.embed([text])[0], np.float32)
        now = time.time()
        where, args = self._where(scope)
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            rows = db.execute(f"SELECT id, vector, subject, importance FROM memories WHERE {where} AND "
                              "superseded_by IS NULL", args).fetchall()
            for mid, blob, subj, imp in rows:
                if float(np.frombuffer(blob, np.float32) @ vec) >= DUPLICATE:
                    db.execute(f"UPDATE memories SET updated = ?, importance = ? WHERE id = ? AND {where}",
                               (now, max(imp, importance), mid, *args))
                    db.execute("COMMIT")
                    return int(mid)
            cur = db.execute("INSERT INTO memories (scope, owner, kind, subject, text, importance, created, updated, "
                             "session, vector) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                             (*args, kind, subject, text, importance, now, now, session, vec.tobytes()))
            new = int(cur.lastrowid or 0)
            if subject:
                db.execute(f"UPDATE memories SET superseded_by = ? WHERE {where} AND subject = ? AND id != ? AND "
                           "superseded_by IS NULL", (new, *args, subject, new))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return new

    def _memories(self, scope: Scope, current: bool = True) -> list[tuple[Memory, np.ndarray]]:
        where, args = self._where(scope)
        sql = (f"SELECT id, kind, text, subject, importance, created, updated, superseded_by, used, vector FROM "
               f"memories WHERE {where}" + (" AND superseded_by IS NULL" if current else "") + " ORDER BY id")
        return [(Memory(*row[:9], scope=scope.kind), np.frombuffer(row[9], np.float32))
                for row in self._db().execute(sql, args)]

    def recall(self, scope: Scope, query: str, k: int = 5, include_org: bool = True,
               now: float | None = None) -> list[Memory]:
        """The ``k`` current memories scoring highest by relevance x recency x importance.

        relevance = max(0, cosine(query, memory)); recency = 0.5 ** (days since updated or last recalled /
        HALF_LIFE_DAYS); importance in [0, 1] as stored. A user's recall also reads the organisation's memories.
        The memories returned (with a score above 0) are marked used now: what keeps being useful stays fresh."""
        q = np.asarray(self.embedder.embed([query])[0], np.float32)
        now = time.time() if now is None else now
        scopes = [scope] + ([Scope.org()] if include_org and scope.kind == "user" else [])
        out = []
        for s in scopes:
            for m, v in self._memories(s):
                days = max(0.0, now - max(m.updated, m.used or 0.0)) / 86400
                m.score = max(0.0, float(v @ q)) * math.pow(0.5, days / self.HALF_LIFE_DAYS) * m.importance
                out.append(m)
        found = sorted(out, key=lambda m: -m.score)[:k]
        used = [m for m in found if m.score > 0]
        for m in used:
            m.used = now
        if used:
            self._db().executemany("UPDATE memories SET used = ? WHERE id = ?", [(now, m.id) for m in used])
        return found

    def list(self, scope: Scope, history: bool = False) -> list[Memory]:
        """The scope's memories (with ``history``, superseded ones too)."""
        return [m for m, _ in self._memories(scope, current=not history)]

    def forget(self, scope: Scope, memory_id: int) -> bool:
        """Delete one memory of the scope: its bytes are overwritten (secure_delete) and the write-ahead log,
        which still holds the page as it was, is checkpointed and truncated, so the text leaves both files."""
        where, args = self._where(scope)
        db = self._db()
        gone = db.execute(f"DELETE FROM memories WHERE id = ? AND {where}", (memory_id, *args)).rowcount > 0
        if gone:
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return gone

    # ------------------------------------------------------------------ sessions
    def add_turn(self, scope: Scope, session: str, role: str, content: str) -> None:
        self._db().execute("INSERT INTO turns (scope, owner, session, role, content, created) VALUES (?, ?, ?, ?, ?, ?)",
                           (scope.kind, scope.owner, session, role, content, time.time()))

    def turns(self, scope: Scope, session: str) -> list[dict[str, str]]:
        where, args = self._where(scope)
        return [{"role": r, "content": c} for r, c in self._db().execute(
            f"SELECT role, content FROM turns WHERE {where} AND session = ? ORDER BY id", (*args, session))]

    # ------------------------------------------------------------------ erasure and export
    def erase(self, scope: Scope) -> int:
        """Delete every memory and turn of the scope, then VACUUM so the text leaves the file. Returns rows deleted."""
        where, args = self._where(scope)
        db = self._db()
        n = db.execute(f"DELETE FROM memories WHERE {where}", args).rowcount
        n += db.execute(f"DELETE FROM turns WHERE {where}", args).rowcount
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        db.execute("VACUUM")
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return n

    def export(self, scope: Scope) -> dict[str, Any]:
        """Everything the store holds for the scope, as JSON-ready data (memories with history, sessions)."""
        where, args = self._where(scope)
        sessions: dict[str, list[dict[str, Any]]] = {}
        for session, role, content, created in self._db().execute(
                f"SELECT session, role, content, created FROM turns WHERE {where} ORDER BY id", args):
            sessions.setdefault(session, []).append({"role": role, "content": content, "created": created})
        return {"scope": scope.kind, "owner": scope.owner,
                "memories": [m.as_dict() for m in self.list(scope, history=True)], "sessions": sessions}

    def close(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None
