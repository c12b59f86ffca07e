"""The sensitivity bar chart."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_sensitivity(rows: list[dict[str, Any]], path: Path, method: str, budget_pct: float, predicted_pct: float) -> None:
    """One horizontal bar per layer: its perplexity change when it alone is quantized;
    layers the plan keeps in float are orange."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    height = max(3.0, 0.22 * len(rows) + 1.2)
    fig, ax = plt.subplots(figsize=(8, height), dpi=110)
    names = [r["module"] for r in rows][::-1]  # most sensitive on top
    deltas = [r["ppl_delta_pct"] for r in rows][::-1]
    colors = ["#ff7f0e" if r["plan"] == "none" else "#3b75af" for r in rows][::-1]
    ax.barh(range(len(rows)), deltas, color=colors)
    ax.set_yticks(range(len(rows)), names, fontsize=7)
    ax.axvline(0, color="black", linewidth=0.6)
    ax.set_xlabel(f"perplexity change when only this layer is {method} (%)")
    ax.set_title(f"Per-layer sensitivity: orange kept in float; predicted total {predicted_pct:.2f}% "
                 f"(budget {budget_pct:g}%)", fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
