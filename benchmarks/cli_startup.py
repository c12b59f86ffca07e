"""Start-up time of `slmforge --help` against a bare `python -c pass`.

    python benchmarks/cli_startup.py [--runs 15]

The issue target is under half a second: heavy imports (torch, transformers,
tokenizers) must happen inside the commands that need them.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from _common import machine, median, save


def timed(cmd: list[str], runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()
    exe = str(Path(sys.executable).parent / "slmforge")
    rows = {
        "python -c pass": timed([sys.executable, "-c", "pass"], args.runs),
        "slmforge --help": timed([exe, "--help"], args.runs),
        "slmforge tokenizer --help": timed([exe, "tokenizer", "--help"], args.runs),
        "python -c 'import torch'": timed([sys.executable, "-c", "import torch"], max(3, args.runs // 5)),
    }
    print(f"machine: {machine()['cpu']}, {machine()['cores']} cores; median of {args.runs} runs")
    base = median(rows["python -c pass"])
    for name, secs in rows.items():
        print(f"{name:<28} {median(secs) * 1000:7.0f} ms   ({median(secs) / base:4.1f}x bare python)")
    path = save("cli_startup", {name: {"median_s": round(median(s), 4), "runs": [round(x, 4) for x in s]} for name, s in rows.items()})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
