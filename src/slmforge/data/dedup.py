"""Document-level deduplication: exact (hash of normalised text) and near
(MinHash LSH over word shingles, through ``datasketch``)."""

from __future__ import annotations

import hashlib
import re
import struct
from collections import Counter
from typing import Any

from slmforge.config import DedupConfig

_WORD = re.compile(r"\w+", re.UNICODE)


def normalise_for_hash(text: str) -> str:
    """Lower-case, whitespace-collapsed text: documents equal under this are exact duplicates."""
    return " ".join(text.lower().split())


def _hash32(data: bytes) -> int:
    # blake2b is ~3x faster than datasketch's default sha1 here and as well mixed.
    return struct.unpack("<I", hashlib.blake2b(data, digest_size=4).digest())[0]


def shingles(text: str, size: int) -> set[bytes]:
    """Word ``size``-grams of the lower-cased text (the whole text when it is shorter)."""
    words = _WORD.findall(text.lower())
    if len(words) <= size:
        return {" ".join(words).encode()}
    return {" ".join(words[i : i + size]).encode() for i in range(len(words) - size + 1)}


class Deduplicator:
    """Feed documents in order; the first of a group of duplicates is kept.

        dd = Deduplicator(cfg.dedup)
        reason = dd.check("doc-1", text)   # None, "duplicate" or "near_duplicate"
    """

    def __init__(self, cfg: DedupConfig) -> None:
        self.cfg = cfg
        self._seen: dict[str, str] = {}
        self._lsh = None
        self._hashes: dict = {}
        if cfg.near:
            from datasketch import MinHash, MinHashLSH

            self._lsh = MinHashLSH(threshold=cfg.near_threshold, num_perm=cfg.num_perm)
            # MinHash draws its permutations anew for every instance (40% of the
            # near-dedup time); they depend only on the seed, so draw them once.
            template = MinHash(num_perm=cfg.num_perm, seed=1)
            self._permutations, self._scheme = template.permutations, template.scheme
        self.duplicate_of: dict[str, str] = {}

    def check(self, key: str, text: str) -> str | None:
        """Register a document; return why it is dropped, or None to keep it."""
        if self.cfg.exact:
            digest = hashlib.sha256(normalise_for_hash(text).encode()).hexdigest()
            first = self._seen.get(digest)
            if first is not None:
                self.duplicate_of[key] = first
                return "duplicate"
            self._seen[digest] = key
        if self._lsh is not None:
            from datasketch import MinHash

            mh = MinHash(
                num_perm=self.cfg.num_perm, hashfunc=_hash32, seed=1, permutations=self._permutations, scheme=self._scheme
            )
            mh.update_batch(list(shingles(text, self.cfg.shingle_size)))
            # LSH banding only proposes candidates; confirm with the estimated Jaccard.
            hits = sorted(h for h in self._lsh.query(mh) if mh.jaccard(self._hashes[h]) >= self.cfg.near_threshold)
            if hits:
                self.duplicate_of[key] = hits[0]
                return "near_duplicate"
            self._lsh.insert(key, mh)
            self._hashes[key] = mh
        return None

    def settle(self, dropped: Counter[str], dropped_rows: list[dict[str, Any]]) -> set[str]:
        """Nothing left to decide: ``check`` decided as documents arrived (see ``ShardedDeduplicator``)."""
        return set()


def signature(text: str, cfg: DedupConfig, permutations=None, scheme=None):  # type: ignore[no-untyped-def]
    """The MinHash ``Deduplicator`` computes for ``text``: its hash values (numpy uint64, ``cfg.num_perm``)."""
    from datasketch import MinHash

    if permutations is None:
        template = MinHash(num_perm=cfg.num_perm, seed=1)
        permutations, scheme = template.permutations, template.scheme
    mh = MinHash(num_perm=cfg.num_perm, hashfunc=_hash32, seed=1, permutations=permutations, scheme=scheme)
    mh.update_batch(list(shingles(text, cfg.shingle_size)))
    return mh.hashvalues


class ShardedDeduplicator:
    """The same decisions as ``Deduplicator``, made over all documents at once on Ray (``data.engine: ray``).

    The data stage calls ``check`` in document order as it does for ``Deduplicator``; every document is
    provisionally kept. ``settle`` then computes exact digests and MinHash signatures on the Ray workers,
    finds LSH candidate pairs band by band (each band's buckets grouped on the workers), and replays the
    first-one-wins rule in document order on the driver, so the kept set equals the single-process one.
    """

    def __init__(self, cfg: DedupConfig, workers: int, address: str | None = None) -> None:
        from slmforge.data.ray_dedup import RayFeed

        self.cfg = cfg
        self._feed = RayFeed(workers, address) if cfg.exact or cfg.near else None
        self.duplicate_of: dict[str, str] = {}

    def check(self, key: str, text: str) -> str | None:
        if self._feed is not None:  # texts go to the cluster's object store in chunks, not a list here
            self._feed.add(key, text)
        return None

    def settle(self, dropped: Counter[str], dropped_rows: list[dict[str, Any]]) -> set[str]:
        """The ids of the provisionally kept documents that are duplicates after all; counts and rows updated."""
        from slmforge.data.ray_dedup import dedup_feed

        reasons = dedup_feed(self._feed, self.cfg) if self._feed is not None else {}
        for key, (reason, first) in reasons.items():
            self.duplicate_of[key] = first
            dropped[reason] += 1
            dropped_rows.append({"id": key, "reason": reason, "duplicate_of": first})
        return set(reasons)


def make_deduplicator(cfg: DedupConfig, engine: str = "local", workers: int = 2,
                      address: str | None = None) -> Deduplicator | ShardedDeduplicator:
    """The deduplicator for ``data.engine``: local (in this process, as documents arrive) or ray."""
    if engine == "ray":
        return ShardedDeduplicator(cfg, workers, address)
    return Deduplicator(cfg)
