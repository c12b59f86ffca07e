"""``slmforge reason bench``: accuracy, tokens and latency per strategy on an evaluation suite, with a plot.

Every strategy answers the same items of a ``generate`` suite (its prompt, few-shot examples, stop strings
and answer extraction); an answer is right when it equals the item's target after ``normalize_answer``.
Each strategy is compared with ``direct`` on the same items by McNemar's test (``evaluate.stats``).
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

from slmforge.errors import ReasoningError
from slmforge.reasoning import COT_CUE, STRATEGIES, Budget, extractor, run_strategy


def bench(gen: Any, suite: str, strategies: list[str], cfg: Any = None, n: int = 5, limit: int | None = None,
          budget: Budget | None = None, temperature: float = 0.7, seed: int = 0, progress: bool = True
          ) -> dict[str, Any]:
    """Run each strategy on the items of a generate suite (its prompt, stop strings and extraction).

    Raises:
        ReasoningError: An unknown strategy, or a suite that is not a generate task.
    """
    from slmforge.evaluate.suites import load_items, load_suite, render_prompt
    from slmforge.generate import SamplingParams

    spec, base = load_suite(suite)
    if spec.task != "generate":
        raise ReasoningError(f"Suite {spec.name} is a {spec.task} task; strategies answer generate suites.")
    items = load_items(spec, base, cfg)[: limit or spec.limit or None]
    prompts = [render_prompt(spec, item) for item in items]
    asked: list[Any] = [[{"role": "user", "content": p}] for p in prompts] if spec.chat else prompts
    params = SamplingParams(max_new_tokens=spec.max_new_tokens, stop=list(spec.stop), seed=seed)
    return bench_items(gen, spec.name, asked, [str(i["target"]) for i in items], strategies,
                       extractor(spec.extract.method, spec.extract.arg), params, n, budget, temperature, progress)


def bench_items(gen: Any, name: str, prompts: list[Any], targets: list[str], strategies: list[str], extract: Any,
                params: Any, n: int = 5, budget: Budget | None = None, temperature: float = 0.7,
                progress: bool = True, cue: str | None = COT_CUE) -> dict[str, Any]:
    """Run each strategy on prompts with known answers (``cue``: the step-by-step cue of the strategies
    that add one; None for a model trained to reason without it).

    Returns:
        ``{"suite", "items", "n", "rows": [{"strategy", "accuracy", "tokens_mean", "calls_mean",
        "latency_median_s", "latency_p90_s", "p_vs_direct"}], "per_item": {strategy: [bool]}}``.

    Raises:
        ReasoningError: An unknown strategy.
    """
    from slmforge._progress import progress_bar
    from slmforge.evaluate.metrics import normalize_answer
    from slmforge.evaluate.stats import mcnemar

    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown:
        raise ReasoningError(f"Unknown strategies {unknown}; choose from {', '.join(STRATEGIES)}.")
    per_item: dict[str, list[bool]] = {}
    rows = []
    with progress_bar(progress) as bar:
        for strategy in strategies:
            task = bar.add_task(f"{name} {strategy}", total=len(prompts), info="")
            right, tokens, calls, seconds = [], [], [], []
            for asked, target in zip(prompts, targets):
                t0 = time.perf_counter()
                r = run_strategy(strategy, gen, asked, n=n, params=params, budget=budget, extract=extract,
                                 temperature=temperature, cue=cue)
                seconds.append(time.perf_counter() - t0)
                right.append(r.answer is not None and normalize_answer(r.answer) == normalize_answer(target))
                tokens.append(r.tokens)
                calls.append(len(r.calls))
                bar.update(task, advance=1, info=f"acc {sum(right) / len(right):.2f}")
            per_item[strategy] = right
            rows.append({"strategy": strategy, "accuracy": sum(right) / max(len(right), 1),
                         "tokens_mean": statistics.fmean(tokens) if tokens else 0.0,
                         "calls_mean": statistics.fmean(calls) if calls else 0.0,
                         "latency_median_s": statistics.median(seconds) if seconds else 0.0,
                         "latency_p90_s": _quantile(seconds, 0.9)})
    if "direct" in per_item:
        for row in rows:
            if row["strategy"] != "direct":
                row["p_vs_direct"] = mcnemar(per_item[row["strategy"]], per_item["direct"])["p_value"]
    return {"suite": name, "items": len(prompts), "n": n, "rows": rows, "per_item": per_item}


def _quantile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def table(result: dict[str, Any]) -> str:
    """The result as a markdown table."""
    lines = [f"{result['suite']}, {result['items']} items, n={result['n']}", "",
             "| strategy | accuracy | tokens / item | calls / item | median s | p90 s | p vs direct |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        p = f"{r['p_vs_direct']:.3f}" if "p_vs_direct" in r else "-"
        lines.append(f"| {r['strategy']} | {r['accuracy']:.3f} | {r['tokens_mean']:.1f} | {r['calls_mean']:.1f} | "
                     f"{r['latency_median_s']:.3f} | {r['latency_p90_s']:.3f} | {p} |")
    return "\n".join(lines)


def save(result: dict[str, Any], out: Path) -> list[Path]:
    """``bench.json``, ``bench.md`` and ``bench.png`` (accuracy against tokens per item, one point per
    strategy, and latency beside it) in ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    (out / "bench.md").write_text(table(result) + "\n", encoding="utf-8")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for r in result["rows"]:
        ax1.scatter(r["tokens_mean"], r["accuracy"])
        ax1.annotate(r["strategy"], (r["tokens_mean"], r["accuracy"]), textcoords="offset points", xytext=(4, 4))
        ax2.scatter(r["latency_median_s"], r["accuracy"])
        ax2.annotate(r["strategy"], (r["latency_median_s"], r["accuracy"]), textcoords="offset points",
                     xytext=(4, 4))
    ax1.set_xlabel("generated tokens per item (mean)")
    ax2.set_xlabel("seconds per item (median)")
    for ax in (ax1, ax2):
        ax.set_ylabel("accuracy")
        ax.grid(alpha=0.3)
    fig.suptitle(f"{result['suite']}: accuracy vs compute per strategy ({result['items']} items)")
    fig.tight_layout()
    fig.savefig(out / "bench.png", dpi=110)
    plt.close(fig)
    return [out / "bench.json", out / "bench.md", out / "bench.png"]
