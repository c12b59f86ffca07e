"""What lets the data stage run on corpora larger than memory: documents spilled to disk between passes, and
boilerplate lines counted by hash on disk.

The stage reads the sources once (pass 1: read, clean, count boilerplate candidates), writing every cleaned
document to a spill file; pass 2 reads it back to strip boilerplate, scrub, filter and deduplicate, spilling
the kept documents; pass 3 reads those to split them and write each format. What stays in memory is per
document and of fixed size (an id, a dedup digest and MinHash signature, a split name, a length), never the
texts. Spill files live in a temporary folder beside the artifact (removed when the stage ends, and by the
next run of any writer of that target if the process was killed), so the previous dataset stays usable.

Spills are pickles, one record after another: the stage's own scratch files, read back only by the process
that wrote them, and pickle keeps a ``Document`` (its ``meta`` included) exactly as it was.
"""

from __future__ import annotations

import hashlib
import math
import os
import pickle
import shutil
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

# One row per distinct candidate line of a document: its group and a 64-bit hash of (group, line).
_LINE_ROW = np.dtype([("g", "<u4"), ("h", "<u8")])


class SpillWriter:
    """Records appended to a file one pickle after another (``read_spill`` gives them back in order)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.count = 0
        self._f = open(path, "wb")  # noqa: SIM115 - closed by close(), the writer outlives one block

    def write(self, record: Any) -> None:
        pickle.dump(record, self._f, protocol=pickle.HIGHEST_PROTOCOL)
        self.count += 1

    def close(self) -> None:
        self._f.close()


def read_spill(path: Path) -> Iterator[Any]:
    """The records of a spill file, one at a time."""
    with open(path, "rb") as f:
        while True:
            try:
                yield pickle.load(f)
            except EOFError:
                return


def make_spill_dir(target: Path) -> Path:
    """A scratch folder beside ``target``, named like the artifact writer's temp folders so that a killed
    run's leftovers are removed by the next writer of that target (``ArtifactWriter._remove_stale_temps``)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    path = target.parent / f".{target.name}.tmp-{os.getpid()}-spill-{uuid.uuid4().hex[:8]}"
    path.mkdir()
    return path


def remove_spill_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def stable_hash64(text: str) -> int:
    """A 64-bit hash of ``text`` that is the same in every process (Python's ``hash()`` of a str is salted
    per process), for keys that are written to disk or compared across runs."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")


def line_hash(group: tuple[str, str], line: str) -> int:
    """The 64-bit key a (source, kind) group's stripped line is counted and stripped under."""
    return stable_hash64(f"{group[0]}\0{group[1]}\0{line}")


# Rows read, and about the most sorted, at a time when a ``HashRows`` file is sorted (tests lower it).
SORT_BLOCK = 1 << 22
_MAX_BUCKET_BITS = 8  # at most 256 bucket files open at once


class HashRows:
    """Fixed-size rows (numpy records keyed by a 64-bit hash) appended to a file as they come, and read back
    sorted a bucket at a time (``buckets``): how the stage holds sets of strings too many to keep in memory,
    even as Python ints."""

    def __init__(self, path: Path, dtype: np.dtype, key: str | None = None) -> None:
        self.path, self.dtype, self.key = path, np.dtype(dtype), key
        self._f = open(path, "wb")  # noqa: SIM115 - closed by buckets(), the writer outlives one block

    def add(self, rows: np.ndarray) -> None:
        if rows.size:
            rows.astype(self.dtype, copy=False).tofile(self._f)

    def buckets(self, distinct: bool = False) -> Iterator[np.ndarray]:
        """Every row written, in buckets by the top bits of its hash (field ``key``, or the row itself), in
        bucket order, each bucket's rows in the order they were written; the file is closed first.
        ``distinct``: repeated rows may be dropped (each block's rows are made unique on the way).

        Every hash of a bucket is below every hash of the next, so sorting (or ``numpy.unique``) each bucket
        sorts the whole, while only about ``SORT_BLOCK`` rows are in memory at a time, as long as the hashes
        spread evenly: up to 256 x ``SORT_BLOCK`` rows, and a hash written n times is n rows of one bucket
        (a boilerplate line of n documents; unless ``distinct``). Written by hand: an external sort of
        fixed-size numpy records is a few lines here, and no library we depend on has one."""
        self._f.close()
        n = self.path.stat().st_size // self.dtype.itemsize
        bits = min(_MAX_BUCKET_BITS, math.ceil(math.log2(max(n / SORT_BLOCK, 1))))
        if bits == 0:
            yield np.fromfile(self.path, dtype=self.dtype)
            return
        parts = [HashRows(self.path.with_name(f"{self.path.name}.{b}"), self.dtype) for b in range(1 << bits)]
        with open(self.path, "rb") as f:
            while (block := np.fromfile(f, dtype=self.dtype, count=SORT_BLOCK)).size:
                block = np.unique(block) if distinct else block
                top = (block[self.key] if self.key else block) >> np.uint64(64 - bits)
                order = np.argsort(top, kind="stable")  # stable: rows keep their written order in a bucket
                bounds = np.searchsorted(top[order], np.arange((1 << bits) + 1, dtype=np.uint64))
                for b, part in enumerate(parts):
                    part.add(block[order[bounds[b] : bounds[b + 1]]])
        self.path.unlink()
        for part in parts:
            part._f.close()
            yield np.fromfile(part.path, dtype=self.dtype)
            part.path.unlink()


class BoilerplateCounter:
    """Lines that repeat across many prose documents of the same source and format (navigation, cookie
    notices, licence footers), counted without holding the lines: each document's distinct candidate lines
    (stripped, at least 12 characters) go to a file as (group, 64-bit hash) rows, 12 bytes each, and are
    counted with ``numpy.unique`` a bucket of hashes at a time at the end (``HashRows.buckets``).

    Memory: the counting step holds 12 bytes (x ~3 while sorting) per row of a bucket (``SORT_BLOCK`` rows);
    the texts are never held. Two different lines colliding on 64 bits (odds ~n^2 / 2^65) would be counted
    as one; that is the only way the result could differ from counting the strings.
    """

    def __init__(self, path: Path, prose_kinds: set[str]) -> None:
        self.path, self.prose_kinds = path, prose_kinds
        self.totals: Counter[tuple[str, str]] = Counter()
        self._groups: dict[tuple[str, str], int] = {}
        self._rows = HashRows(path, _LINE_ROW, key="h")

    def add(self, source: str, kind: str, text: str) -> None:
        if kind not in self.prose_kinds:
            return
        group = (source, kind)
        self.totals[group] += 1
        g = self._groups.setdefault(group, len(self._groups))
        lines = {line.strip() for line in text.split("\n") if len(line.strip()) >= 12}
        if lines:
            rows = np.empty(len(lines), dtype=_LINE_ROW)
            rows["g"] = g
            rows["h"] = [line_hash(group, line) for line in lines]
            self._rows.add(rows)

    def lines(self, min_docs: int = 3, min_share: float = 0.2) -> dict[tuple[str, str], set[int]]:
        """(source, kind) -> hashes of its boilerplate lines: those in at least ``min_docs`` of the group's
        documents and in at least ``min_share`` of them."""
        out: dict[tuple[str, str], set[int]] = {}
        for rows in self._rows.buckets():
            if not rows.size:
                continue
            hashes, first, counts = np.unique(rows["h"], return_index=True, return_counts=True)
            groups = rows["g"][first]
            del rows
            for group, g in self._groups.items():
                need = max(min_docs, min_share * self.totals[group])
                found = hashes[(groups == g) & (counts >= need)]
                if found.size:
                    out.setdefault(group, set()).update(found.tolist())
        return out


class SortedHashes:
    """A set of 64-bit hashes too large to hold as Python ints (the word 8-grams of a corpus's held-out splits):
    added in any order (to a ``HashRows`` file), sorted and deduplicated by ``freeze`` a bucket at a time
    (``HashRows.buckets``, as ``BoilerplateCounter.lines`` counts) into a file that is then read memory-mapped;
    membership by binary search (``numpy.searchsorted``).

    Memory: about ``SORT_BLOCK`` x 8 bytes (x ~2 while sorting) during ``freeze``; afterwards just the pages
    the OS keeps cached. A collision of two different keys on 64 bits (odds ~n^2 / 2^65) would count one as
    the other.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._rows = HashRows(path.with_name(path.name + ".unsorted"), np.dtype("<u8"))
        self._sorted: np.ndarray | None = None

    def add(self, hashes: np.ndarray) -> None:
        self._rows.add(hashes)

    def freeze(self) -> SortedHashes:
        """Sort what was added; nothing more can be added after this."""
        n = 0
        with open(self.path, "wb") as f:
            for bucket in self._rows.buckets(distinct=True):
                unique = np.unique(bucket)
                unique.tofile(f)
                n += unique.size
        self._rows.path.unlink(missing_ok=True)
        self._sorted = np.memmap(self.path, dtype="<u8", mode="r") if n else np.zeros(0, dtype="<u8")
        return self

    def __len__(self) -> int:
        return 0 if self._sorted is None else int(self._sorted.size)

    def count_in(self, hashes: np.ndarray) -> int:
        """How many of ``hashes`` are in the set (``freeze`` first)."""
        if self._sorted is None:
            raise RuntimeError("SortedHashes.count_in before freeze()")
        s = self._sorted
        if not s.size or not hashes.size:
            return 0
        idx = np.minimum(np.searchsorted(s, hashes), s.size - 1)
        return int(np.count_nonzero(s[idx] == hashes))
