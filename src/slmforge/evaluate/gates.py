"""Quality gates: ``metric op number`` rules a model must meet.

    exact_match >= 0.6                   # a metric of the (only) suite
    python-docs-qa.token_f1 >= 0.2       # suite-qualified
    ppl_delta_pct <= 1.0                 # change vs. a baseline (the parent, or --baseline)
    token_f1_delta >= -0.01

``NAME_delta`` is value - baseline and ``NAME_delta_pct`` is 100 * (value - baseline) / baseline,
available when a baseline's metrics are given. Other stages (quantize, export) call
``check_gates`` with their own metrics to refuse regressions.
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass

from slmforge.errors import EvalError, GateFailed

_OPS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt, "==": operator.eq}
_GATE = re.compile(r"^\s*([\w.@\-]+)\s*(>=|<=|==|>|<)\s*(-?[\d.]+(?:e-?\d+)?)\s*$")


@dataclass
class GateResult:
    rule: str
    metric: str
    value: float
    threshold: float
    passed: bool

    def describe(self) -> str:
        mark = "pass" if self.passed else "FAIL"
        return f"[{mark}] {self.rule}  (measured {self.metric} = {self.value:.6g})"


def parse_gate(rule: str) -> tuple[str, str, float]:
    m = _GATE.match(rule)
    if not m:
        raise EvalError(
            f"Gate {rule!r} is not of the form `metric op number` (op one of >=, <=, >, <, ==), "
            "e.g. `exact_match >= 0.6` or `ppl_delta_pct <= 1.0`."
        )
    return m.group(1), m.group(2), float(m.group(3))


def with_deltas(metrics: dict[str, float], baseline: dict[str, float] | None) -> dict[str, float]:
    """The metrics plus ``NAME_delta`` and ``NAME_delta_pct`` against a baseline."""
    out = dict(metrics)
    for name, value in (baseline or {}).items():
        if name in metrics and isinstance(value, (int, float)) and isinstance(metrics[name], (int, float)):
            out[f"{name}_delta"] = metrics[name] - value
            if value:
                out[f"{name}_delta_pct"] = 100.0 * (metrics[name] - value) / abs(value)
    return out


def _lookup(name: str, values: dict[str, float]) -> float:
    if name in values:
        return values[name]
    matches = [k for k in values if k.split(".", 1)[-1] == name]
    if len(matches) == 1:
        return values[matches[0]]
    if len(matches) > 1:
        raise EvalError(f"Gate metric {name!r} is ambiguous: {', '.join(sorted(matches))}; qualify it with the suite name.")
    raise EvalError(f"Gate metric {name!r} was not measured; measured: {', '.join(sorted(values)) or 'nothing'}.")


def check_gates(rules: list[str], metrics: dict[str, float], baseline: dict[str, float] | None = None) -> list[GateResult]:
    """Evaluate gate rules against measured metrics (and deltas vs. a baseline)."""
    values = with_deltas(metrics, baseline)
    results = []
    for rule in rules:
        name, op, threshold = parse_gate(rule)
        value = float(_lookup(name, values))
        results.append(GateResult(rule.strip(), name, value, threshold, bool(_OPS[op](value, threshold))))
    return results


def enforce(results: list[GateResult], where: str) -> None:
    """Raise GateFailed naming every failing gate and its numbers."""
    failed = [r for r in results if not r.passed]
    if failed:
        lines = "\n".join("  " + r.describe() for r in failed)
        raise GateFailed(f"{len(failed)} quality gate(s) failed for {where}:\n{lines}")
