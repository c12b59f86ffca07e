"""``slmforge sweep``: a grid or random search over config keys, each point a normal pipeline run.

    result = run_sweep(cfg, {"model.preset": ["nano", "micro"], "train.lr": [1e-3, 3e-3]},
                       metric="train.val_ppl", gate="train.val_ppl<=200")
    result["best"], result["smallest_passing"]

Stage outputs are content-addressed: a point's stage writes to ``<out>/stages/<stage>-<fingerprint>``,
the fingerprint being the stage's plan (its config section and its parents' fingerprints) as ``slmforge
run`` computes it. Points that share a stage's settings and inputs share its folder, so a sweep over
``train.lr`` prepares the data and the tokenizer once; a rerun finds every finished stage current (the
sweep resumes); each point's result is kept in ``<out>/points/<id>.json``.

A metric is ``<stage>.<key>`` in that stage's manifest metrics (``train.val_ppl``, ``sft.val_loss``,
``eval.<suite>.<metric>``...); size is the parameter count of the point's last model. The smallest point
meeting the gate is the answer to "what size reaches the target quality".
"""

from __future__ import annotations

import hashlib
import itertools
import json
import operator
import random
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from filelock import FileLock

from slmforge.artifacts import read_manifest
from slmforge.config import ProjectConfig, with_overrides
from slmforge.errors import ArtifactError, ConfigError
from slmforge.pipeline import STAGES, is_current

_OPS = {"<=": operator.le, "<": operator.lt, ">=": operator.ge, ">": operator.gt, "==": operator.eq}
_GATE = re.compile(r"^\s*([\w.\-]+)\s*(<=|>=|==|<|>)\s*(-?[\d.eE+-]+)\s*$")


def points(space: dict[str, list[Any]], mode: str = "grid", samples: int | None = None, seed: int = 0
           ) -> list[dict[str, Any]]:
    """The settings to run: every combination (``grid``), or ``samples`` of them drawn without repeats
    (``random``).

    Raises:
        ConfigError: An empty space or value list, or an unknown mode.
    """
    if not space or any(not isinstance(v, list) or not v for v in space.values()):
        raise ConfigError("A sweep needs at least one key with a non-empty list of values, e.g. train.lr=[1e-3, 3e-3].")
    combos = [dict(zip(space, values)) for values in itertools.product(*space.values())]
    if mode == "grid":
        return combos
    if mode == "random":
        return random.Random(seed).sample(combos, min(samples or len(combos), len(combos)))
    raise ConfigError(f"Unknown sweep mode {mode!r}; choose grid or random.")


def parse_gate(gate: str) -> tuple[str, Callable[[float, float], bool], float, str]:
    """``"train.val_ppl<=200"`` -> (metric, comparison, threshold, operator).

    Raises:
        ConfigError: Not ``<stage>.<key> <op> <number>``.
    """
    m = _GATE.match(gate)
    if not m:
        raise ConfigError(f"The gate {gate!r} is not <stage>.<metric> <op> <number>, e.g. train.val_ppl<=200.")
    return m.group(1), _OPS[m.group(2)], float(m.group(3)), m.group(2)


def _point_id(overrides: dict[str, Any]) -> str:
    text = json.dumps(overrides, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def _with_out(cfg: ProjectConfig, stage: str, out: str | None) -> ProjectConfig:
    section = getattr(cfg, stage)
    return cfg.model_copy(update={stage: section.model_copy(update={"out": out})})


def run_point(cfg: ProjectConfig, root: Path, command: list[str] | None = None,
              log: Callable[[str], None] | None = None) -> tuple[ProjectConfig, dict[str, str]]:
    """Run the project's stages with content-addressed outputs under ``root/stages``; returns the config with
    every stage's ``out`` set, and each stage's status ("ran", "reused", or "project": the project's own
    output, ``slmforge run``'s, is current for this point and is used as it is)."""
    status = {}
    for name in [n for n in STAGES if n in cfg.project.stages]:
        stage = STAGES[name]
        if getattr(cfg, name).out is None and is_current(cfg, name):
            status[name] = "project"
            continue
        key = stage.plan(_with_out(cfg, name, None)).fingerprint[:16]
        folder = root / "stages" / f"{name}-{key}"
        cfg = _with_out(cfg, name, str(folder))
        folder.parent.mkdir(parents=True, exist_ok=True)
        # A point running in parallel may be making the same stage: the first to hold the lock makes it,
        # the others then find it current.
        with FileLock(str(folder) + ".lock"):
            if is_current(cfg, name):
                status[name] = "reused"
                continue
            if log:
                log(f"{name}: running")
            stage.run(cfg, command, log)
        status[name] = "ran"
    return cfg, status


def metric_value(cfg: ProjectConfig, metric: str) -> float | None:
    """``<stage>.<key>...`` read from the stage's manifest metrics (nested keys by dots); None if absent."""
    stage, _, path = metric.partition(".")
    if stage not in STAGES or not path:
        raise ConfigError(f"A metric is <stage>.<key> with a stage of {', '.join(STAGES)}; got {metric!r}.")
    try:
        value: Any = read_manifest(STAGES[stage].output(cfg)).metrics
    except ArtifactError:
        return None
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return float(value) if isinstance(value, (int, float)) else None


def _size(cfg: ProjectConfig, size: str | None = None) -> float | None:
    if size:
        return metric_value(cfg, size)
    for stage in ("sft", "train"):
        if stage in cfg.project.stages:
            params = metric_value(cfg, f"{stage}.params")
            if params is not None:
                return params
    return None


def run_sweep(cfg: ProjectConfig, space: dict[str, list[Any]], metric: str = "train.val_ppl", goal: str = "min",
              gate: str | None = None, mode: str = "grid", samples: int | None = None, seed: int = 0,
              out: str | Path | None = None, command: list[str] | None = None, size: str | None = None,
              log: Callable[[str], None] | None = None, jobs: int = 1) -> dict[str, Any]:
    """Run every point of the sweep (resuming: finished stages are reused) and rank them.

    ``jobs`` > 1 runs that many points at once, in separate processes (stages they share are made once,
    under a lock); worth it where a point leaves cores or a GPU idle.

    ``size`` is the metric that measures a point's size (default: the parameters of its last model; e.g.
    ``quantize.weights_bytes`` for a sweep over quantization).

    Returns:
        ``{"points": [{"id", "overrides", "metric", "size", "seconds", "stages"}], "best", "smallest_passing",
        "metric", "goal", "gate", "size"}`` (written to ``<out>/sweep.json`` too).

    Raises:
        ConfigError: A bad space, mode, metric, gate or override value.
    """
    if goal not in ("min", "max"):
        raise ConfigError(f"goal is min or max; got {goal!r}.")
    check = parse_gate(gate) if gate else None
    root = Path(out) if out else cfg.stage_dir("sweep", None)
    todo = points(space, mode, samples, seed)
    configs = [with_overrides(cfg, [f"{k}={json.dumps(v)}" for k, v in p.items()]) for p in todo]  # all checked first
    if jobs > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = [pool.submit(_point, c.model_dump(mode="json"), str(c.base_dir), o, root, command, metric, size)
                       for o, c in zip(todo, configs)]
            rows = [f.result() for f in futures]
    else:
        rows = [_point(c, None, o, root, command, metric, size, log) for o, c in zip(todo, configs)]
    for row in rows:
        if check:
            row["passes"] = row["metric"] is not None and check[1](row["metric"], check[2])
        (root / "points").mkdir(parents=True, exist_ok=True)
        (root / "points" / f"{row['id']}.json").write_text(json.dumps(row, indent=1, default=str) + "\n")
    scored = [r for r in rows if r["metric"] is not None]
    best = (min if goal == "min" else max)(scored, key=lambda r: r["metric"]) if scored else None
    passing = [r for r in rows if r.get("passes") and r["size"] is not None]
    smallest = min(passing, key=lambda r: (r["size"], r["metric"] if goal == "min" else -r["metric"])) \
        if passing else None
    result = {"metric": metric, "goal": goal, "gate": gate, "size": size or "params", "points": rows, "best": best,
              "smallest_passing": smallest}
    root.mkdir(parents=True, exist_ok=True)
    (root / "sweep.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    return result


def _point(cfg: ProjectConfig | dict[str, Any], base_dir: str | None, overrides: dict[str, Any], root: Path,
           command: list[str] | None, metric: str, size: str | None,
           log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run one point (in this process, or in a worker given the config as a dict) and read its results."""
    if isinstance(cfg, dict):  # a worker process: rebuild the config, rooted where the project is
        cfg = ProjectConfig.model_validate(cfg).rooted_at(base_dir or ".")
    pid = _point_id(overrides)
    if log:
        log(f"point {pid}: {overrides}")
    t0 = time.monotonic()
    done_cfg, status = run_point(cfg, root, command, log)
    return {"id": pid, "overrides": overrides, "metric": metric_value(done_cfg, metric),
            "size": _size(done_cfg, size), "seconds": round(time.monotonic() - t0, 2), "stages": status}


def table(result: dict[str, Any]) -> str:
    keys = list(result["points"][0]["overrides"]) if result["points"] else []
    head = " | ".join(keys)
    lines = [f"| {head} | {result['metric']} | {result.get('size', 'params')} | seconds | stages run | gate |",
             "|" + "---|" * len(keys) + "---:|---:|---:|---|---|"]
    for r in result["points"]:
        values = " | ".join(str(r["overrides"][k]) for k in keys)
        ran = ", ".join(s for s, st in r["stages"].items() if st == "ran") or "none"
        metric = f"{r['metric']:.6g}" if r["metric"] is not None else "-"
        size = f"{r['size'] / 1e6:.2f}M" if r["size"] else "-"  # parameters or bytes, in millions
        gate = {True: "pass", False: "fail"}.get(r.get("passes"), "")
        lines.append(f"| {values} | {metric} | {size} | {r['seconds']:.1f} | {ran} | {gate} |")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: str | Path) -> None:
    """The metric against model size, one point per configuration, the gate as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in result["points"]:
        if r["metric"] is None or not r["size"]:
            continue
        ax.scatter(r["size"] / 1e6, r["metric"], color="tab:green" if r.get("passes") else "tab:blue")
        ax.annotate(", ".join(f"{v}" for v in r["overrides"].values()), (r["size"] / 1e6, r["metric"]),
                    textcoords="offset points", xytext=(3, 3), fontsize=7)
    if result["gate"]:
        _, _, threshold, _ = parse_gate(result["gate"])
        ax.axhline(threshold, color="grey", linestyle="--", label=f"gate {result['gate']}")
        ax.legend()
    ax.set_xlabel(f"{result.get('size', 'params')} (millions)")
    ax.set_ylabel(result["metric"])
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
