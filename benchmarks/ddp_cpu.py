"""Data-parallel pretraining on this machine's cores: one process vs two, under DDP and FSDP, same global batch.

    python benchmarks/ddp_cpu.py [--steps 40] [--preset micro] [--batch-size 8]

Trains the preset from scratch with ``slmforge train pretrain`` on the quickstart's data and tokenizer
(quickstart/runs, made by ``make demo``; when missing, the quickstart template's data and tokenizer stages
are run first in the scratch folder): in one process with all cores as torch threads, in one process with one
thread (the per-core baseline), then in two processes (one thread each, so they use the cores the first run
used): ``--nproc 2`` (torchrun, DDP) and
``--launcher accelerate --nproc 2`` with ``train.distributed.strategy`` ddp and fsdp. Prints tokens/s (median
over the steps after the first five), the loss at the last step, the validation loss and the largest loss
difference from the one-process curve; writes benchmarks/results/ddp_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import save

ROOT = Path(__file__).resolve().parent.parent
RUNS = {  # name: (extra arguments, torch threads per process given the cores)
    "1 process": ([], lambda cores: cores),
    "1 process, 1 thread": ([], lambda cores: 1),
    "2 processes, DDP (torchrun)": (["--nproc", "2"], lambda cores: max(1, cores // 2)),
    "2 processes, DDP (accelerate)": (["--launcher", "accelerate", "--nproc", "2", "--set",
                                       "train.distributed.strategy=ddp"], lambda cores: max(1, cores // 2)),
    "2 processes, FSDP (accelerate)": (["--launcher", "accelerate", "--nproc", "2", "--set",
                                        "train.distributed.strategy=fsdp"], lambda cores: max(1, cores // 2)),
}


def run(project: Path, out: str, threads: int, extra: list[str]) -> tuple[list[dict], float]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SLMFORGE_NO_PROGRESS": "1", "OMP_NUM_THREADS": str(threads)}
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-m", "slmforge", "train", "pretrain", "-c", str(project / "slmforge.yaml"),
                    "--out", str(project / out), *extra], env=env, check=True, capture_output=True)
    wall = time.monotonic() - t0
    return [json.loads(x) for x in (project / f"{out}-work" / "log.jsonl").read_text().splitlines()], wall


def inputs(qs: Path, scratch: Path) -> tuple[str, str]:
    """The quickstart's data and tokenizer folders, made in ``scratch`` from the template when missing."""
    data, tok = qs / "runs" / "data", qs / "runs" / "tokenizer"
    if (data / "manifest.json").is_file() and (tok / "manifest.json").is_file():
        return str(data), str(tok)
    from slmforge.config import ProjectConfig, load_config, render_template
    from slmforge.data import run_data_stage
    from slmforge.tokenizer import train_tokenizer

    (scratch / "slmforge.yaml").write_text(render_template("quickstart"))
    cfg: ProjectConfig = load_config(scratch / "slmforge.yaml")
    print(f"{data} is missing: running the quickstart's data and tokenizer stages in {scratch}", flush=True)
    run_data_stage(cfg, progress=False)
    train_tokenizer(cfg, progress=False)
    return str(scratch / "runs" / "data"), str(scratch / "runs" / "tokenizer")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--preset", default="micro")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--quickstart", default=str(ROOT / "quickstart"))
    args = ap.parse_args()

    from slmforge.config import dump_config, load_config, render_template

    cores = os.cpu_count() or 1
    logs: dict[str, tuple[list[dict], float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        project = Path(tmp)
        scratch = project / "inputs"
        scratch.mkdir()
        data, tok = inputs(Path(args.quickstart), scratch)
        (project / "template.yaml").write_text(render_template("quickstart"))
        cfg = load_config(project / "template.yaml")
        cfg.train.data, cfg.train.tokenizer = data, tok
        cfg.model.preset = args.preset
        t = cfg.train
        t.max_steps, t.batch_size, t.grad_accum, t.eval_every, t.save_every = args.steps, args.batch_size, 1, \
            args.steps, args.steps
        t.max_minutes, t.compile, t.precision = None, False, "fp32"
        (project / "slmforge.yaml").write_text(dump_config(cfg))
        for i, (name, (extra, threads)) in enumerate(RUNS.items()):
            logs[name] = run(project, f"run{i}", threads(cores), extra)
    one = logs["1 process"][0]
    rows = {}
    for name, (log, wall) in logs.items():
        rows[name] = {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in log[5:]),
                      "final_loss": log[-1]["loss"], "val_loss": log[-1].get("val_loss"), "wall_s": round(wall, 1),
                      "max_loss_diff": max(abs(a["loss"] - b["loss"]) for a, b in zip(one, log))}
    load = os.getloadavg()[0]
    print(f"{args.preset}, {args.steps} steps, global batch {args.batch_size} x {cfg.train.seq_len} tokens, fp32, "
          f"{cores} cores, load average {load:.1f} at the end")
    print("| run | tokens/s (median) | vs 1 process | loss at the last step | val loss | largest loss diff | wall s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    base = rows["1 process"]["tokens_per_s"]
    for name, r in rows.items():
        print(f"| {name} | {r['tokens_per_s']:,.0f} | {r['tokens_per_s'] / base:.2f}x | {r['final_loss']:.4f} | "
              f"{r['val_loss']:.4f} | {r['max_loss_diff']:.1e} | {r['wall_s']} |")
    result = {"preset": args.preset, "steps": args.steps, "batch_size": args.batch_size, "rows": rows,
              "load_average": load}
    print(f"wrote {save('ddp_cpu', result)}")


if __name__ == "__main__":
    main()
