"""The detail view of one artifact: what to show for its kind (charts as Plotly figures, evaluation rows,
data-stage statistics and dropped documents, a comparison's verdicts), built from its files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from slmforge.ui._scan import Artifact, read_jsonl

_IMAGES = (".png", ".svg")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def _figure(title: str, traces: list[dict[str, Any]], x: str, y: str, log_y: bool = False) -> dict[str, Any]:
    return {"data": traces, "layout": {"title": {"text": title}, "xaxis": {"title": {"text": x}},
                                       "yaxis": {"title": {"text": y}, **({"type": "log"} if log_y else {})},
                                       "margin": {"t": 40, "r": 10, "l": 60, "b": 40}, "hovermode": "x unified",
                                       "legend": {"orientation": "h"}}}


def training_charts(folder: Path) -> list[dict[str, Any]]:
    """Loss (and validation loss where logged) and throughput from a training run's ``log.jsonl``."""
    rows = read_jsonl(folder / "log.jsonl", limit=200000)
    train = [r for r in rows if "loss" in r and "step" in r]
    val = [r for r in rows if "val_loss" in r and "step" in r]
    charts = []
    if train:
        traces = [{"x": [r["step"] for r in train], "y": [r["loss"] for r in train], "name": "train loss",
                   "type": "scatter", "mode": "lines"}]
        if val:
            traces.append({"x": [r["step"] for r in val], "y": [r["val_loss"] for r in val], "name": "val loss",
                           "type": "scatter", "mode": "lines+markers"})
        charts.append({"id": "loss", "figure": _figure("Loss", traces, "step", "loss")})
    speed = [r for r in train if "tokens_per_s" in r]
    if speed:
        charts.append({"id": "throughput", "figure": _figure(
            "Throughput", [{"x": [r["step"] for r in speed], "y": [r["tokens_per_s"] for r in speed],
                            "name": "tokens/s", "type": "scatter", "mode": "lines"}], "step", "tokens/s")})
    return charts


def _metrics_chart(metrics: dict[str, Any]) -> dict[str, Any] | None:
    numeric = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    scores = {k: v for k, v in numeric.items() if 0 <= v <= 1}  # rates and scores share one axis
    if not scores:
        return None
    return {"id": "metrics", "figure": _figure("Scores", [{"x": list(scores), "y": list(scores.values()),
                                                           "type": "bar", "name": "score"}], "metric", "score")}


def evaluation_rows(folder: Path, suite: str | None, order: str, query: str, limit: int = 200) -> dict[str, Any]:
    """An evaluation's per-item rows for one suite: filtered by text, lowest primary score first on request."""
    results = _read_json(folder / "results.json") or {}
    suites = {name: info.get("primary") for name, info in (results.get("suites") or {}).items()
              if (folder / "items" / f"{name}.jsonl").is_file() and (folder / "items" / f"{name}.jsonl").stat().st_size}
    chosen = suite if suite in suites else next(iter(suites), None)
    rows: list[dict[str, Any]] = []
    if chosen:
        primary = suites[chosen]
        for item in read_jsonl(folder / "items" / f"{chosen}.jsonl"):
            score = (item.get("scores") or {}).get(primary)
            rows.append({"id": item.get("id"), "prompt": item.get("prompt", ""), "output": item.get("output", ""),
                         "target": item.get("target", item.get("answer_key", "")), "score": score,
                         "scores": item.get("scores") or {}})
    if query:
        q = query.lower()
        rows = [r for r in rows if q in " ".join(str(r[k]) for k in ("id", "prompt", "output", "target")).lower()]
    if order == "wrong":
        rows.sort(key=lambda r: (r["score"] is None, r["score"] if r["score"] is not None else 0))
    return {"suites": list(suites), "suite": chosen, "primary": suites.get(chosen) if chosen else None,
            "rows": rows[:limit], "total": len(rows), "order": order, "query": query}


def dataset_view(folder: Path, reason: str | None) -> dict[str, Any]:
    """The data stage's statistics, and its dropped and skipped documents (filtered by reason)."""
    stats = _read_json(folder / "stats.json") or {}
    dropped = read_jsonl(folder / "dropped.jsonl") + [{**r, "skipped": True} for r in read_jsonl(folder / "skipped.jsonl")]
    reasons: dict[str, int] = {}
    for r in dropped:
        reasons[str(r.get("reason"))] = reasons.get(str(r.get("reason")), 0) + 1
    shown = [r for r in dropped if reason in (None, "", str(r.get("reason")))]
    chart = None
    counts = stats.get("dropped") or {}
    if counts:
        chart = {"id": "dropped", "figure": _figure("Dropped documents by reason", [
            {"x": list(counts), "y": list(counts.values()), "type": "bar", "name": "documents"}], "reason", "documents")}
    return {"stats": stats, "reasons": dict(sorted(reasons.items(), key=lambda kv: -kv[1])), "reason": reason or "",
            "rows": shown[:300], "total": len(shown), "chart": chart}


def comparison_view(folder: Path) -> dict[str, Any]:
    """A comparison's verdict per suite and its per-item differences (largest first)."""
    data = _read_json(folder / "compare.json") or {}
    items = read_jsonl(folder / "items.jsonl")
    items.sort(key=lambda r: -abs(float(r.get("diff") or 0)))
    return {"a": data.get("a"), "b": data.get("b"), "suites": data.get("suites") or {}, "rows": items[:300],
            "n_items": len(items)}


def detail(artifact: Artifact, query: dict[str, str]) -> dict[str, Any]:
    """Everything the artifact page shows beyond the manifest."""
    folder, kind = artifact.path, artifact.kind
    view: dict[str, Any] = {"charts": [], "images": sorted(f for f in artifact.manifest.files if f.endswith(_IMAGES))}
    if (folder / "log.jsonl").is_file():
        view["charts"] += training_charts(folder)
    if kind == "evaluation":
        chart = _metrics_chart(artifact.manifest.metrics)
        view["charts"] += [chart] if chart else []
        view["evaluation"] = evaluation_rows(folder, query.get("suite"), query.get("order", "wrong"), query.get("q", ""))
        results = _read_json(folder / "results.json") or {}
        view["gates"] = results.get("gates") or []
    elif kind == "dataset":
        view["dataset"] = dataset_view(folder, query.get("reason"))
        view["charts"] += [view["dataset"]["chart"]] if view["dataset"]["chart"] else []
    elif kind == "comparison":
        view["comparison"] = comparison_view(folder)
    return view
