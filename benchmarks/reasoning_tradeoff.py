"""Accuracy vs tokens vs latency per test-time strategy, on held-out arithmetic with the CoT-trained model.

    python benchmarks/reasoning_tradeoff.py [MODEL] [--problems 100] [--steps 2,4] [--n 5]
                                            [--strategies direct,sc,bon,adaptive,tot]

MODEL is the chain-of-thought model ``benchmarks/cot_finetune.py`` trains (default
benchmarks/results/cot/cot-model). Problems come from ``slmforge.reasoning.cot.make_problems`` with a
seed the training never used, at each number of steps in ``--steps``; the prompt is the training format
(``Question: ...\\nAnswer:``) with no step-by-step cue (the model writes its scratchpad unasked), the answer
the last number. Strategies as ``slmforge reason bench`` runs them (``bon``: the model's log-likelihood
picks; ``tot``: step search over scratchpad lines). Prints a table per difficulty, writes
benchmarks/results/reasoning_tradeoff.json and .png (accuracy against tokens per problem).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from _common import RESULTS, save

DEFAULT_MODEL = RESULTS / "cot" / "cot-model"
HELDOUT_SEED = 7919  # not a seed the training problems use


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", nargs="?", default=str(DEFAULT_MODEL))
    ap.add_argument("--problems", type=int, default=100, help="Problems per difficulty.")
    ap.add_argument("--steps", default="2,4", help="Difficulties: operations per problem.")
    ap.add_argument("--digits", type=int, default=1, help="Digits per number (the training default).")
    ap.add_argument("--n", type=int, default=5)
    ap.add_argument("--strategies", default="direct,sc,bon,adaptive,tot")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    args = ap.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from slmforge.generate import SamplingParams, TorchGenerator
    from slmforge.reasoning import extractor
    from slmforge.reasoning.bench import bench_items, table
    from slmforge.reasoning.cot import make_problems, prompt_of

    torch.set_num_threads(os.cpu_count() or 1)
    gen = TorchGenerator.from_pretrained(Path(args.model), device="cpu")
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    params = SamplingParams(max_new_tokens=args.max_new_tokens, stop=["\nQuestion:"], seed=0)
    results = {}
    fig, ax = plt.subplots(figsize=(6, 4))
    for steps in [int(s) for s in args.steps.split(",")]:
        problems = make_problems(args.problems, steps, args.digits, HELDOUT_SEED + steps)
        prompts = [prompt_of(p["question"]) for p in problems]
        result = bench_items(gen, f"arithmetic, {steps} steps", prompts, [p["answer"] for p in problems],
                             strategies, extractor("last_number"), params, n=args.n, cue=None)
        results[steps] = result
        print(table(result), flush=True)
        print()
        xs = [r["tokens_mean"] for r in result["rows"]]
        ys = [r["accuracy"] for r in result["rows"]]
        ax.plot(xs, ys, "o-", label=f"{steps} steps")
        for r in result["rows"]:
            ax.annotate(r["strategy"], (r["tokens_mean"], r["accuracy"]), textcoords="offset points",
                        xytext=(3, 3), fontsize=8)
    ax.set_xlabel("generated tokens per problem (mean)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"{Path(args.model).name}: accuracy vs compute per strategy")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    RESULTS.mkdir(parents=True, exist_ok=True)
    fig.savefig(RESULTS / "reasoning_tradeoff.png", dpi=110)
    for r in results.values():
        r.pop("per_item", None)
    path = save("reasoning_tradeoff", {"model": args.model, "n": args.n, "results": results})
    print(f"wrote {path} and {RESULTS / 'reasoning_tradeoff.png'}")


if __name__ == "__main__":
    main()
