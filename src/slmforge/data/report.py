"""The data stage's human-readable report: Markdown plus a length histogram."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _table(title: str, counts: dict[str, Any]) -> list[str]:
    if not counts:
        return [f"**{title}:** none", ""]
    lines = [f"| {title} | count |", "|---|---:|"]
    lines += [f"| {k} | {v} |" for k, v in counts.items()]
    return lines + [""]


def write_report(folder: Path, stats: dict[str, Any], lengths: list[int], project: str) -> None:
    """Write ``report.md`` and ``lengths.png`` (document length histogram) into ``folder``."""
    _plot_lengths(folder / "lengths.png", lengths)
    s = stats
    md = [
        f"# Data report: {project}",
        "",
        f"{s['documents_in']} documents read from {len(s['sources'])} source(s) "
        f"({s['mb_in']} MB) -> **{s['documents_out']} kept** in {s['seconds']} s "
        f"({s['documents_per_s']} documents/s, {s['mb_per_s']} MB/s).",
        "",
        "## Splits",
        "",
        "| split | documents | characters | pre-tokens |",
        "|---|---:|---:|---:|",
    ]
    md += [f"| {k} | {v['documents']} | {v['chars']} | {v['pretokens']} |" for k, v in s["splits"].items()]
    md += ["", "Pre-tokens are words and punctuation marks (regex `\\w+|[^\\w\\s]`), before any tokenizer.", ""]
    md += ["## What was left out", ""]
    md += _table("input skipped", s["inputs_skipped"])
    md += _table("document dropped", s["dropped"])
    md += _table("cleaning", s["cleaning"])
    md += ["Every skipped input and dropped document is listed with its reason in `skipped.jsonl` and `dropped.jsonl`.", ""]
    md += ["## PII replaced", ""] + _table("type", s["pii"])
    md += ["## Outputs", ""]
    for fmt, info in s["formats"].items():
        counts = ", ".join(f"{k} {info[k]}" for k in ("train", "val", "test") if k in info)
        md.append(f"- **{fmt}**: {counts}")
        for key in ("labels", "entities", "pairs_dropped", "teacher_errors"):
            if info.get(key):
                md.append(f"  - {key}: " + ", ".join(f"{k}={v}" for k, v in list(info[key].items())[:20]))
    md += ["", "![document lengths](lengths.png)", ""]
    (folder / "report.md").write_text("\n".join(md), encoding="utf-8")


def _plot_lengths(path: Path, lengths: list[int]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=110)
    if lengths:
        lo, hi = max(min(lengths), 1), max(max(lengths), 2)
        bins = np.logspace(np.log10(lo), np.log10(hi) + 1e-9, 40) if hi > lo else 10
        ax.hist(lengths, bins=bins, color="#3b75af", edgecolor="white", linewidth=0.4)
        ax.set_xscale("log")
        ax.axvline(float(np.median(lengths)), color="#d62728", linestyle="--", label=f"median {int(np.median(lengths))}")
        ax.legend()
    ax.set_xlabel("document length (characters, log scale)")
    ax.set_ylabel("documents")
    ax.set_title(f"Kept documents: {len(lengths)}")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
