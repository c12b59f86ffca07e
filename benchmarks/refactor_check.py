"""A refactoring must not cost speed: serving at 32 clients and the torch engine's decode speed, the code at
git revision REV against the working tree, in one run, alternating.

    python benchmarks/refactor_check.py --against 66f2c53^ [MODEL] [--rounds 3]

MODEL is a model folder (default quickstart/runs/sft, made by ``make demo``). REV's ``src/`` is extracted
with ``git archive`` into a temporary folder; a side runs with that folder first on ``PYTHONPATH``, so
both the server subprocess and the engine import REV's slmforge (the editable install only adds
``src/`` through a .pth file, which ``PYTHONPATH`` precedes). Each round runs, in alternating order:

- serving: ``benchmarks/serve_load.py``'s load (``run_load``: 64 streamed greedy chat completions of 64
  tokens, ``ignore_eos``) at 32 clients against a server at ``--max-batch-size 32`` and at 1;
- generation: ``benchmarks/generate_speed.py --presets micro,small --runs 3`` (TorchGenerator against
  ``model.generate``, batch 1, 128 new tokens, one torch thread).

Prints each figure's median over the rounds for REV and the working tree and their ratio, and writes
benchmarks/results/refactor_check.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import RESULTS, machine, median, save

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEFAULT_MODEL = ROOT / "quickstart/runs/sft"
CLIENTS = 32
BATCH_SIZES = {"on": 32, "off": 1}


def extract(rev: str, folder: Path) -> Path:
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "src"], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    return folder / "src"


def serving(model: Path, src: Path | None) -> dict[str, float]:
    """Tokens/s and P50 latency at 32 clients, batching on and off, for the code in ``src`` (None: ours)."""
    from slmforge.serve import parse_model_ref
    from slmforge.serve.bench import BENCH_PROMPTS, run_load, start_server

    name = parse_model_ref(str(model))[0]
    saved = os.environ.get("PYTHONPATH")
    if src is not None:
        os.environ["PYTHONPATH"] = str(src)
    out = {}
    try:
        for setting, size in BATCH_SIZES.items():
            with start_server(model, max_batch_size=size) as server:
                run_load(server.base_url, name, 1, 1, BENCH_PROMPTS, 64, extra_body={"ignore_eos": True})
                r = run_load(server.base_url, name, CLIENTS, 2 * CLIENTS, BENCH_PROMPTS, 64,
                             extra_body={"ignore_eos": True}).as_dict()
                if r["errors"]:
                    sys.exit(f"{r['errors']} requests failed against the server ({'REV' if src else 'ours'}):\n"
                             f"{server.log_tail()}")
                out[f"serve {setting} tok/s"] = r["tokens_per_s"]
                out[f"serve {setting} P50 s"] = r["latency_s"]["p50"]
            server.remove_log()
    finally:
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved
    return out


def generation(src: Path | None) -> dict[str, float]:
    env = dict(os.environ)
    if src is not None:
        env["PYTHONPATH"] = str(src)
    subprocess.run([sys.executable, str(HERE / "generate_speed.py"), "--presets", "micro,small", "--runs", "3"],
                   env=env, check=True, capture_output=True, text=True)
    rows = json.loads((RESULTS / "generate_speed.json").read_text())["results"]
    return {f"generate {r['preset']} tok/s": r["engine_tokens_per_s"] for r in rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", nargs="?", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--against", metavar="REV", required=True, help="the git revision before the change")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if not (args.model / "config.json").exists():
        parser.error(f"{args.model} is not a model folder; run `make demo` or pass one")
    samples: dict[str, dict[str, list[float]]] = {"before": {}, "after": {}}
    with tempfile.TemporaryDirectory() as tmp:
        old_src = extract(args.against, Path(tmp))
        for i in range(args.rounds):
            order = [("before", old_src), ("after", None)]
            for side, src in order if i % 2 == 0 else order[::-1]:
                figures = {**serving(args.model, src), **generation(src)}
                for key, value in figures.items():
                    samples[side].setdefault(key, []).append(value)
                print(f"  round {i + 1} {side}: " + ", ".join(f"{k} {v:.3g}" for k, v in figures.items()),
                      file=sys.stderr, flush=True)
    rows = [{"figure": key, "before": median(samples["before"][key]), "after": median(samples["after"][key])}
            for key in samples["after"]]
    for row in rows:
        row["after/before"] = round(row["after"] / row["before"], 3)
    m = machine()
    print(f"\n{args.model}: {args.against} (before) vs working tree (after), median of {args.rounds} alternated "
          f"rounds; machine: {m['cpu']}, {m['cores']} cores, load avg {os.getloadavg()[0]:.2f}\n")
    print("| figure | before | after | after/before |\n|---|---:|---:|---:|")
    for row in rows:
        print(f"| {row['figure']} | {row['before']:.3g} | {row['after']:.3g} | {row['after/before']:.3f} |")
    path = save("refactor_check", {"against": args.against, "model": str(args.model), "rounds": args.rounds,
                                    "rows": rows, "samples": samples})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
