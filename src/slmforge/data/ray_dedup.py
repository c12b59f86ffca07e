"""Deduplication sharded over a Ray cluster (``data.engine: ray``): the decisions of ``dedup.Deduplicator``,
made with the expensive parts on the workers.

1. workers: each document's exact digest (sha256 of its normalised text) and MinHash signature, the very
   function the single-process path uses (``dedup.signature``);
2. workers, one LSH band per task (datasketch's own banding for the threshold): documents whose signatures
   agree on the whole band share a bucket, and every bucket of two or more yields its candidate pairs;
3. driver: the first-one-wins rule replayed in document order: a document is an exact duplicate of the first
   with its digest, else a near duplicate of the smallest id among the earlier *kept* documents it shares a
   bucket with at estimated Jaccard >= ``near_threshold`` (what datasketch's LSH query and our check do).

So the kept set equals the single-process one on any corpus (tests/test_ray.py checks it). The driver holds
one signature per document (``num_perm`` x 8 bytes) and its id, not the texts or their shingles: texts reach
the cluster ``FEED_CHUNK`` at a time as the data stage hands them over (``RayFeed``).
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from slmforge.config import DedupConfig
from slmforge.data.dedup import normalise_for_hash, signature
from slmforge.errors import DataError

FEED_CHUNK = 4096  # documents per ray.data.from_items call: what the driver buffers at most


def _ray() -> Any:
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as e:
        raise DataError("data.engine ray needs Ray: pip install slmforge[scale]") from e
    return ray


def start_ray(workers: int, address: str | None = None) -> Any:
    """Join ``address`` (a running cluster), or start a local one of ``workers`` CPUs once per process."""
    ray = _ray()
    if not ray.is_initialized():
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    return ray


class _Signatures:
    """Ray map_batches worker: digests and MinHash signatures of a batch of texts."""

    def __init__(self, cfg: DedupConfig) -> None:
        from datasketch import MinHash

        self.cfg = cfg
        template = MinHash(num_perm=cfg.num_perm, seed=1)  # the permutations depend on the seed only
        self.permutations, self.scheme = template.permutations, template.scheme

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        texts = [str(t) for t in batch["text"]]
        digests = [hashlib.sha256(normalise_for_hash(t).encode()).hexdigest() for t in texts]
        if self.cfg.near:
            hv = np.stack([signature(t, self.cfg, self.permutations, self.scheme) for t in texts])
        else:
            hv = np.zeros((len(texts), 1), dtype=np.uint64)
        return {"i": batch["i"], "digest": np.array(digests), "hv": hv}


class _BandPairs:
    """Ray map_batches worker: for each LSH band it is given, the candidate pairs (earlier, later) of the
    documents whose signatures agree on the whole band (datasketch's bucket rule)."""

    def __init__(self, hv: np.ndarray, index: np.ndarray, ranges: list[tuple[int, int]]) -> None:
        self.hv, self.index, self.ranges = hv, index, ranges

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        a: list[int] = []
        b: list[int] = []
        for band in batch["band"]:
            s, e = self.ranges[int(band)]
            buckets: dict[bytes, list[int]] = {}
            for row, i in enumerate(self.index):
                buckets.setdefault(self.hv[row, s:e].tobytes(), []).append(int(i))
            for members in buckets.values():
                for n, x in enumerate(members):
                    a.extend([x] * (len(members) - n - 1))
                    b.extend(members[n + 1:])
        return {"a": np.array(a, dtype=np.int64), "b": np.array(b, dtype=np.int64)}


class RayFeed:
    """Documents handed to Ray as they arrive, ``chunk`` at a time (``ray.data.from_items`` puts each chunk in
    the object store, which spills to disk when full), so the driver holds their ids, never all their texts."""

    def __init__(self, workers: int = 2, address: str | None = None, chunk: int | None = None) -> None:
        self.workers, self.address, self.chunk = workers, address, chunk or FEED_CHUNK
        self.keys: list[str] = []
        self._buffer: list[dict[str, Any]] = []
        self._parts: list[Any] = []

    def add(self, key: str, text: str) -> None:
        self._buffer.append({"i": len(self.keys), "text": text})
        self.keys.append(key)
        if len(self._buffer) >= self.chunk:
            self._flush()

    def _flush(self) -> None:
        if self._buffer:
            ray = start_ray(self.workers, self.address)
            blocks = max(1, min(len(self._buffer), self.workers * 4))
            self._parts.append(ray.data.from_items(self._buffer, override_num_blocks=blocks))
            self._buffer = []

    def dataset(self) -> Any:
        """Every document added, as one Ray dataset of ``{"i", "text"}`` rows."""
        self._flush()
        return self._parts[0].union(*self._parts[1:]) if len(self._parts) > 1 else self._parts[0]


def dedup_on_ray(items: list[tuple[str, str]], cfg: DedupConfig, workers: int = 2,
                 address: str | None = None) -> dict[str, tuple[str, str]]:
    """The documents ``(id, text)`` (in order) that ``Deduplicator`` would drop: ``{id: (reason, first id)}``.

    Raises:
        DataError: Ray is not installed.
    """
    if not items or not (cfg.exact or cfg.near):
        return {}
    feed = RayFeed(workers, address)
    for key, text in items:
        feed.add(key, text)
    return dedup_feed(feed, cfg)


def dedup_feed(feed: RayFeed, cfg: DedupConfig) -> dict[str, tuple[str, str]]:
    """``dedup_on_ray`` over the documents already handed to ``feed``."""
    if not feed.keys or not (cfg.exact or cfg.near):
        return {}
    ray = start_ray(feed.workers, feed.address)
    workers = feed.workers
    rows = feed.dataset().map_batches(_Signatures, fn_constructor_args=(cfg,), batch_format="numpy",
                                      concurrency=workers)
    got = sorted(rows.iter_rows(), key=lambda r: int(r["i"]))
    digests = [str(r["digest"]) for r in got]
    hv = np.stack([np.asarray(r["hv"], dtype=np.uint64) for r in got])
    del got
    first_of: dict[str, int] = {}
    for i, d in enumerate(digests):
        first_of.setdefault(d, i)
    exact_dup = {i for i, d in enumerate(digests) if cfg.exact and first_of[d] != i}
    neighbours: dict[int, set[int]] = {}
    if cfg.near:
        from datasketch import MinHashLSH

        ranges = MinHashLSH(threshold=cfg.near_threshold, num_perm=cfg.num_perm).hashranges
        live = np.array([i for i in range(len(feed.keys)) if i not in exact_dup], dtype=np.int64)
        bands = ray.data.from_items([{"band": b} for b in range(len(ranges))], override_num_blocks=len(ranges))
        pairs = bands.map_batches(_BandPairs, fn_constructor_args=(hv[live], live, ranges), batch_size=1,
                                  batch_format="numpy", concurrency=workers)
        for p in pairs.iter_batches(batch_format="numpy"):
            for x, y in zip(p["a"].tolist(), p["b"].tolist()):
                neighbours.setdefault(y, set()).add(x)
    return _replay(feed.keys, digests, first_of, exact_dup, neighbours, hv, cfg)


def _replay(keys: list[str], digests: list[str], first_of: dict[str, int], exact_dup: set[int],
            neighbours: dict[int, set[int]], hv: np.ndarray, cfg: DedupConfig) -> dict[str, tuple[str, str]]:
    """First one wins, in document order, as ``Deduplicator.check`` decides."""
    out: dict[str, tuple[str, str]] = {}
    inserted: set[int] = set()
    for j, key in enumerate(keys):
        if j in exact_dup:
            out[key] = ("duplicate", keys[first_of[digests[j]]])
            continue
        hits = [keys[i] for i in neighbours.get(j, ()) if i in inserted
                and np.count_nonzero(hv[i] == hv[j]) / hv.shape[1] >= cfg.near_threshold]
        if hits:
            out[key] = ("near_duplicate", min(hits))
        elif cfg.near:
            inserted.add(j)
    return out
