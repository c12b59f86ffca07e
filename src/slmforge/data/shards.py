"""Corpus shards read incrementally: JSONL line by line, Parquet a batch of rows at a time.

A shard of a web-scale corpus can be larger than memory, so it is never read whole: the reader holds one line
(JSONL) or one record batch (Parquet, ``pyarrow.parquet.ParquetFile.iter_batches``) at a time and yields
records as it goes. ``clean.max_file_mb`` (a guard against one huge *document*) does not apply to a shard;
each record is a document. Both data engines read sources through these readers.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

SHARD_SUFFIXES = {".jsonl", ".parquet"}
PARQUET_BATCH_ROWS = 256


def jsonl_records(path: Path) -> Iterator[tuple[str, dict[str, Any] | str]]:
    """``(where, record)`` per non-blank line, or ``(where, reason)`` for a line that is not a JSON object."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(raw.decode("utf-8", errors="replace"))
            except json.JSONDecodeError as exc:
                yield where, f"malformed JSONL line ({exc.msg})"
                continue
            yield (where, record) if isinstance(record, dict) else (where, "JSONL line is not an object")


def parquet_records(path: Path, batch_rows: int = PARQUET_BATCH_ROWS) -> Iterator[tuple[str, dict[str, Any] | str]]:
    """``(where, record)`` per row, read ``batch_rows`` rows at a time; ``(path, reason)`` when the file is not
    a readable Parquet file."""
    import pyarrow.parquet as pq

    try:
        shard = pq.ParquetFile(path)
        batches = shard.iter_batches(batch_size=batch_rows)
        row = 0
        for batch in batches:
            for record in batch.to_pylist():
                row += 1
                yield f"{path}:{row}", record
    except (OSError, ValueError) as exc:  # pyarrow.ArrowInvalid is a ValueError
        yield str(path), f"unreadable Parquet file ({str(exc).splitlines()[0][:120]})"


def shard_records(path: Path) -> Iterator[tuple[str, dict[str, Any] | str]]:
    """The records of a JSONL or Parquet shard, read incrementally."""
    return parquet_records(path) if path.suffix.lower() == ".parquet" else jsonl_records(path)
