"""Chain-of-thought fine-tuning on CPU: a direct-answer model vs a chain-of-thought model vs CoT with
self-consistency, on held-out arithmetic word problems of 1 to 4 steps.

    python benchmarks/cot_finetune.py [--out benchmarks/results/cot] [--threads N] [--seed 0]

Runs ``slmforge.reasoning.cot.cot_experiment`` with its defaults: two nano-preset models (same size,
same character tokenizer, same training problems, same steps and seed) trained from scratch with the
shared training loop, one to answer at once, one to write its scratchpad first; then greedy direct,
greedy CoT and CoT + self-consistency (5 samples at temperature 0.7, majority vote) on problems never
trained on, with McNemar's paired test per difficulty. Prints the table and the wall time; writes
cot_results.json, cot_table.md, cot_accuracy.png, cot_predictions.jsonl and the two model folders
(``cot-model`` is what benchmarks/reasoning_tradeoff.py loads) under --out, and
benchmarks/results/cot_finetune.json. A rerun resumes finished training from out/work.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from _common import RESULTS, machine, save


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(RESULTS / "cot"))
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch CPU threads.")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import torch

    from slmforge.reasoning.cot import cot_experiment

    torch.set_num_threads(args.threads)
    t0 = time.monotonic()
    results = cot_experiment(Path(args.out), seed=args.seed)
    wall = time.monotonic() - t0
    print((Path(args.out) / "cot_table.md").read_text())
    for kind, t in results["training"].items():
        print(f"{kind}: {t['params']:,} parameters, {t['steps']} steps in {t['seconds']:.0f} s "
              f"(final loss {t['final_loss']:.3f}{', stopped by the time limit' if t['stopped_early'] else ''})")
    m = machine()
    print(f"wall time {wall / 60:.1f} min on {m['cpu']} ({args.threads} torch threads, {m['cores']} cores)")
    path = save("cot_finetune", {"command": "python benchmarks/cot_finetune.py", "wall_s": round(wall, 1),
                                 "threads": args.threads, "results": results})
    print(f"wrote {path} and {args.out}/cot_table.md, cot_accuracy.png")


if __name__ == "__main__":
    main()
