"""Shared bits of the benchmark scripts: machine description, medians, JSON output."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "blas_env": {k: os.environ.get(k) for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")},
    }


def bandwidth_gbs(mb: int = 256, runs: int = 5) -> float:
    """Memory bandwidth of one thread, GB/s: a STREAM-like triad ``a = b + s*c`` over three float64
    arrays of ``mb`` MiB each (far larger than any cache), bytes moved / the fastest of ``runs``.

    What a batch-1 decoder that reads every weight once per token can at best approach: tokens/s
    <= bandwidth / bytes of weights (for weights that do not fit in the CPU's caches)."""
    import numpy as np

    n = mb * 1024 * 1024 // 8
    b, c = np.ones(n), np.full(n, 2.0)
    a = np.empty(n)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        np.multiply(c, 3.0, out=a)
        np.add(a, b, out=a)
        times.append(time.perf_counter() - t0)
    return 4 * n * 8 / min(times) / 1e9  # read c, write a, read a + b, write a


def median(values: list[float]) -> float:
    return statistics.median(values)


def save(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **payload}, indent=2) + "\n")
    return path
