"""Data-parallel pretraining on this machine's cores: one process vs two (torchrun, gloo), same global batch.

    python benchmarks/ddp_cpu.py [--steps 40] [--preset micro] [--batch-size 8]

Trains the preset from scratch on the quickstart's data and tokenizer (quickstart/runs, made by ``make
demo``) with ``slmforge train pretrain``: once in one process with all cores as torch threads, once with
``--nproc 2`` (one thread each, so both use the same cores). Prints tokens/s (median over the steps after
the first five) and the loss at the last step and the largest loss difference between the two curves;
writes benchmarks/results/ddp_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import save

ROOT = Path(__file__).resolve().parent.parent


def run(project: Path, out: str, threads: int, extra: list[str]) -> list[dict]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SLMFORGE_NO_PROGRESS": "1", "OMP_NUM_THREADS": str(threads)}
    subprocess.run([sys.executable, "-m", "slmforge", "train", "pretrain", "-c", str(project / "slmforge.yaml"),
                    "--out", str(project / out), *extra], env=env, check=True, capture_output=True)
    return [json.loads(x) for x in (project / f"{out}-work" / "log.jsonl").read_text().splitlines()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--preset", default="micro")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--quickstart", default=str(ROOT / "quickstart"))
    args = ap.parse_args()

    from slmforge.config import dump_config, load_config

    qs = Path(args.quickstart)
    cfg = load_config(qs / "slmforge.yaml")
    with tempfile.TemporaryDirectory() as tmp:
        project = Path(tmp)
        cfg.train.data, cfg.train.tokenizer = str(qs / "runs" / "data"), str(qs / "runs" / "tokenizer")
        cfg.model.preset = args.preset
        t = cfg.train
        t.max_steps, t.batch_size, t.grad_accum, t.eval_every, t.save_every = args.steps, args.batch_size, 1, \
            args.steps, args.steps
        t.max_minutes, t.compile, t.precision = None, False, "fp32"
        (project / "slmforge.yaml").write_text(dump_config(cfg))
        cores = os.cpu_count() or 1
        one = run(project, "one", cores, [])
        two = run(project, "two", max(1, cores // 2), ["--nproc", "2"])
    rows = {}
    for name, log in (("1 process", one), ("2 processes", two)):
        rows[name] = {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in log[5:]),
                      "final_loss": log[-1]["loss"], "val_loss": log[-1].get("val_loss")}
    diff = max(abs(a["loss"] - b["loss"]) for a, b in zip(one, two))
    print(f"{args.preset}, {args.steps} steps, global batch {args.batch_size} x {cfg.train.seq_len} tokens, fp32, "
          f"{os.cpu_count()} cores")
    print("| run | tokens/s (median) | loss at the last step | val loss |")
    print("|---|---:|---:|---:|")
    for name, r in rows.items():
        print(f"| {name} | {r['tokens_per_s']:,.0f} | {r['final_loss']:.4f} | {r['val_loss']:.4f} |")
    ratio = rows["2 processes"]["tokens_per_s"] / rows["1 process"]["tokens_per_s"]
    print(f"2 processes / 1 process: {ratio:.2f}x; largest loss difference over the curve: {diff:.2e}")
    print(f"wrote {save('ddp_cpu', {'preset': args.preset, 'steps': args.steps, 'rows': rows, 'ratio': ratio, 'max_loss_diff': diff})}")


if __name__ == "__main__":
    main()
