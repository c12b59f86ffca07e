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


def line_hash(group: tuple[str, str], line: str) -> int:
    """The 64-bit key a (source, kind) group's stripped line is counted and stripped under."""
    data = f"{group[0]}\0{group[1]}\0{line}".encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


class BoilerplateCounter:
    """Lines that repeat across many prose documents of the same source and format (navigation, cookie
    notices, licence footers), counted without holding the lines: each document's distinct candidate lines
    (stripped, at least 12 characters) go to a file as (group, 64-bit hash) rows, 12 bytes each, and are
    counted with one ``numpy.unique`` at the end.

    Memory: the counting step holds 12 bytes (x ~3 while sorting) per distinct candidate line per document;
    the texts are never held. Two different lines colliding on 64 bits (odds ~n^2 / 2^65) would be counted
    as one; that is the only way the result could differ from counting the strings.
    """

    def __init__(self, path: Path, prose_kinds: set[str]) -> None:
        self.path, self.prose_kinds = path, prose_kinds
        self.totals: Counter[tuple[str, str]] = Counter()
        self._groups: dict[tuple[str, str], int] = {}
        self._f = open(path, "wb")  # noqa: SIM115 - closed by lines()

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
            rows.tofile(self._f)

    def lines(self, min_docs: int = 3, min_share: float = 0.2) -> dict[tuple[str, str], set[int]]:
        """(source, kind) -> hashes of its boilerplate lines: those in at least ``min_docs`` of the group's
        documents and in at least ``min_share`` of them."""
        self._f.close()
        rows = np.fromfile(self.path, dtype=_LINE_ROW)
        if not rows.size:
            return {}
        hashes, first, counts = np.unique(rows["h"], return_index=True, return_counts=True)
        groups = rows["g"][first]
        del rows
        out: dict[tuple[str, str], set[int]] = {}
        for group, g in self._groups.items():
            need = max(min_docs, min_share * self.totals[group])
            found = hashes[(groups == g) & (counts >= need)]
            if found.size:
                out[group] = set(found.tolist())
        return out
