"""Data stage throughput and peak memory on a generated corpus at two sizes, for one or more source trees.

    python benchmarks/data_scale.py --docs 800,8000 [--runs 1] [--engine local] [--src before=/tmp/wt-before/src]
                                    [--formats text,chat] [--sort-block 65536]

The corpus: distinct English-like documents of ~4,000 characters (a "Notes" section that the chat format makes a
question/answer pair of, a PII e-mail address and a boilerplate footer each), half in JSONL shards and half in
Parquet shards of 200 documents. Each run is a fresh interpreter
running the whole stage (default config: PII, filters, exact + near dedup; ``--formats``, default text,chat) and reporting
its peak RSS (``ru_maxrss``). ``--src NAME=PATH`` runs the stage from another checkout's ``src`` (e.g. a
``git worktree`` of an older commit) beside this one (``after``), so the two are measured in the same session.
Prints a table and writes benchmarks/results/data_scale.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import machine, median, save

HERE = Path(__file__).resolve().parent
DOC_CHARS = 4_000
FOOTER = ("\n\n# Notes {i}\n\nNote {i}: see page {i} of the manual for the parts of item {i}.\n\n"
          "Write to author{i}@example.com with questions.\nCopyright 2026 The Example Project, all rights reserved.")

_CHILD = """
import json, resource, sys, time
from slmforge.config import ProjectConfig
from slmforge.data import run_data_stage
cfg = ProjectConfig()
cfg.data.sources = [sys.argv[1]]
cfg.data.engine = sys.argv[3]
cfg.data.formats = sys.argv[4].split(",")
if int(sys.argv[5]):  # hash sets sorted this many rows at a time (a tree without spill.SORT_BLOCK ignores it)
    from slmforge.data import spill
    spill.SORT_BLOCK = int(sys.argv[5])
t0 = time.perf_counter()
r = run_data_stage(cfg, out=sys.argv[2], progress=False, command=["benchmark"])
chat = r.stats["formats"].get("chat", {})
print(json.dumps({"seconds": time.perf_counter() - t0, "docs_in": r.stats["documents_in"],
                  "pairs": sum(chat.get(s, 0) for s in ("train", "val", "test")),
                  "docs_out": r.stats["documents_out"], "mb_in": r.stats["mb_in"],
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def make_corpus(folder: Path, n: int, per_shard: int = 200) -> None:
    sys.path.insert(0, str(HERE.parent / "tests"))
    from conftest import build_shard_corpus  # the generator tests/test_data_streaming.py uses too

    build_shard_corpus(folder, n, DOC_CHARS, per_shard, seed=0, footer=FOOTER)


def run_once(src: Path, corpus: Path, engine: str, formats: str, sort_block: int = 0) -> dict:
    with tempfile.TemporaryDirectory() as out:
        env = os.environ | {"PYTHONPATH": str(src), "SLMFORGE_NO_PROGRESS": "1", "HF_HUB_OFFLINE": "1"}
        done = subprocess.run([sys.executable, "-c", _CHILD, str(corpus), str(Path(out) / "data"), engine, formats,
                               str(sort_block)],
                              capture_output=True, text=True, env=env, check=False)
        if done.returncode:
            raise SystemExit(f"the data stage failed under {src}:\n{done.stderr[-2000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", default="800,8000", help="corpus sizes in documents, comma-separated")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--engine", default="local", choices=["local", "ray"])
    parser.add_argument("--formats", default="text,chat", help="data.formats, comma-separated")
    parser.add_argument("--src", action="append", default=[], help="NAME=PATH of another checkout's src folder")
    parser.add_argument("--sort-block", type=int, default=0,
                        help="rows of a hash set sorted at a time (data.spill.SORT_BLOCK); 0: the default, 4 M")
    args = parser.parse_args()
    trees = [tuple(s.split("=", 1)) for s in args.src] + [("after", str(HERE.parent / "src"))]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in (int(x) for x in args.docs.split(",")):
            corpus = Path(tmp) / f"corpus-{n}"
            make_corpus(corpus, n)
            for name, src in trees:
                got = [run_once(Path(src), corpus, args.engine, args.formats, args.sort_block) for _ in range(args.runs)]
                secs = median([g["seconds"] for g in got])
                rows.append({"code": name, "documents": n, "mb_in": got[0]["mb_in"], "kept": got[0]["docs_out"],
                             "chat_pairs": got[0]["pairs"],
                             "seconds": round(secs, 2), "documents_per_s": round(n / secs, 1),
                             "peak_rss_mb": round(median([g["peak_rss_mb"] for g in got]), 1),
                             "runs": [round(g["seconds"], 2) for g in got]})
    print(f"machine: {machine()['cpu']}, {machine()['cores']} cores; engine {args.engine}; formats {args.formats}; "
          f"sort block {args.sort_block or 'default'}; median of {args.runs}")
    print(f"{'code':<8} {'docs':>6} {'MB in':>6} {'kept':>6} {'pairs':>6} {'s':>7} {'docs/s':>7} {'peak RSS MB':>11}")
    for r in rows:
        print(f"{r['code']:<8} {r['documents']:>6} {r['mb_in']:>6.1f} {r['kept']:>6} {r['chat_pairs']:>6} "
              f"{r['seconds']:>7.2f} {r['documents_per_s']:>7.0f} {r['peak_rss_mb']:>11.1f}")
    path = save("data_scale", {"engine": args.engine, "formats": args.formats, "sort_block": args.sort_block,
                               "runs": args.runs, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
