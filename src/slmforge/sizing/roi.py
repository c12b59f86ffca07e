"""Owning the model vs paying an API, month by month: ``slmforge roi``.

The API costs its token prices times the volume. Owning costs the machines bought (a machine serves
``tokens_per_s x utilization`` output tokens per second, prompt tokens counting ``1 / prefill_speedup`` of an
output token; enough machines are bought for the month's volume, each replaced after
``hardware_life_months``), their power, and operations. Every price is an input with a visible default
(``roi`` and ``serve.cost`` in the project file); none is assumed silently.

Break-even: the first month whose cumulative owned cost is at most the API's. Break-even volume: the
monthly output tokens (at the input/output mix given) above which one machine's monthly cost (amortised)
is below the API's.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

from slmforge.errors import ConfigError

HOURS_PER_MONTH = 730.0
SECONDS_PER_MONTH = HOURS_PER_MONTH * 3600


@dataclass
class RoiInputs:
    api_usd_per_1m_input: float = 0.15
    api_usd_per_1m_output: float = 0.60
    monthly_input_tokens: float = 200e6
    monthly_output_tokens: float = 50e6
    growth_per_month: float = 0.05  # volume growth, compounded monthly
    tokens_per_s: float = 100.0  # output tokens a machine serves per second (`slmforge bench serve`)
    utilization: float = 0.5  # the share of that capacity usable (traffic is not flat)
    prefill_speedup: float = 10.0  # a prompt token costs 1/this of an output token's machine time
    hardware_usd: float = 2000.0  # one machine
    hardware_life_months: int = 36
    power_watts: float = 150.0  # one machine, under load
    usd_per_kwh: float = 0.15
    ops_usd_per_month: float = 100.0  # people and hosting, whatever the number of machines

    def check(self) -> None:
        """Raises: ConfigError: a value that makes the model meaningless (naming the ``roi`` key)."""
        for name in ("tokens_per_s", "utilization", "prefill_speedup", "hardware_life_months"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"roi.{name} must be > 0 (got {getattr(self, name)}).")
        if self.utilization > 1:
            raise ConfigError(f"roi.utilization is a share of capacity, at most 1 (got {self.utilization}).")


def _volume(r: RoiInputs, month: int) -> tuple[float, float]:
    g = (1 + r.growth_per_month) ** month
    return r.monthly_input_tokens * g, r.monthly_output_tokens * g


def machines_needed(r: RoiInputs, input_tokens: float, output_tokens: float) -> int:
    """Machines for a month's volume (at least one)."""
    work = output_tokens + input_tokens / r.prefill_speedup
    return max(1, math.ceil(work / (r.tokens_per_s * r.utilization * SECONDS_PER_MONTH)))


def monthly(r: RoiInputs, months: int) -> list[dict[str, float]]:
    """Per month: volume, machines, API cost, owned cost (purchases that month + power + ops), cumulative
    both."""
    r.check()
    rows, owned_machines, bought_at, cum_api, cum_owned = [], 0, [], 0.0, 0.0
    for m in range(months):
        tin, tout = _volume(r, m)
        need = machines_needed(r, tin, tout)
        purchases = sum(1 for b in bought_at if m - b == r.hardware_life_months)  # replacements
        bought_at = [b if m - b < r.hardware_life_months else m for b in bought_at]
        if need > owned_machines:
            purchases += need - owned_machines
            bought_at += [m] * (need - owned_machines)
            owned_machines = need
        power = owned_machines * r.power_watts / 1000 * HOURS_PER_MONTH * r.usd_per_kwh
        api = (tin * r.api_usd_per_1m_input + tout * r.api_usd_per_1m_output) / 1e6
        owned = purchases * r.hardware_usd + power + r.ops_usd_per_month
        cum_api += api
        cum_owned += owned
        rows.append({"month": m + 1, "input_tokens": tin, "output_tokens": tout, "machines": owned_machines,
                     "api_usd": api, "owned_usd": owned, "cumulative_api_usd": cum_api,
                     "cumulative_owned_usd": cum_owned})
    return rows


def break_even_month(rows: list[dict[str, float]]) -> int | None:
    return next((int(r["month"]) for r in rows if r["cumulative_owned_usd"] <= r["cumulative_api_usd"]), None)


def break_even_volume(r: RoiInputs) -> float | None:
    """Monthly output tokens (input tokens in the given proportion) at which one machine, amortised, costs
    what the API does; None when one machine's capacity is reached first (more volume needs more machines,
    whose cost grows with it too)."""
    per_machine = (r.hardware_usd / r.hardware_life_months + r.power_watts / 1000 * HOURS_PER_MONTH * r.usd_per_kwh
                   + r.ops_usd_per_month)
    ratio = r.monthly_input_tokens / r.monthly_output_tokens if r.monthly_output_tokens else 0.0
    usd_per_output_token = (ratio * r.api_usd_per_1m_input + r.api_usd_per_1m_output) / 1e6
    if usd_per_output_token <= 0:
        return None
    volume = per_machine / usd_per_output_token
    return volume if machines_needed(r, volume * ratio, volume) == 1 else None


SENSITIVITY = ("api_usd_per_1m_output", "monthly_output_tokens", "hardware_usd", "tokens_per_s", "growth_per_month")


def report(r: RoiInputs, years: int = 5) -> dict[str, Any]:
    """Totals at 1/3/5 years (up to ``years``), break-even month and volume, and the break-even month with each
    main assumption halved and doubled."""
    rows = monthly(r, 12 * years)
    horizons = {}
    for y in (1, 3, 5):
        if y <= years:
            last = rows[12 * y - 1]
            horizons[f"{y}y"] = {"api_usd": last["cumulative_api_usd"], "owned_usd": last["cumulative_owned_usd"],
                                 "saving_usd": last["cumulative_api_usd"] - last["cumulative_owned_usd"]}
    sensitivity = {}
    for name in SENSITIVITY:
        sensitivity[name] = {f"x{f:g}": break_even_month(monthly(replace(r, **{name: getattr(r, name) * f}),
                                                                 12 * years)) for f in (0.5, 2.0)}
    return {"inputs": asdict(r), "months": rows, "horizons": horizons, "break_even_month": break_even_month(rows),
            "break_even_output_tokens_per_month": break_even_volume(r), "sensitivity": sensitivity}


def plot(result: dict[str, Any], path: Any) -> None:
    """Cumulative API and owned cost against months, the break-even month marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["months"]
    months = [r["month"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(months, [r["cumulative_api_usd"] for r in rows], label="API")
    ax.plot(months, [r["cumulative_owned_usd"] for r in rows], label="owned")
    if result["break_even_month"]:
        ax.axvline(result["break_even_month"], color="grey", linestyle="--",
                   label=f"break-even: month {result['break_even_month']}")
    ax.set_xlabel("month")
    ax.set_ylabel("cumulative cost (USD)")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("Owned model vs API")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(result: dict[str, Any]) -> str:
    lines = ["| horizon | API | owned | saving |", "|---|---:|---:|---:|"]
    for h, v in result["horizons"].items():
        lines.append(f"| {h} | ${v['api_usd']:,.0f} | ${v['owned_usd']:,.0f} | ${v['saving_usd']:,.0f} |")
    be = result["break_even_month"]
    vol = result["break_even_output_tokens_per_month"]
    lines += ["", f"break-even: {'month ' + str(be) if be else 'not within the horizon'}; one machine pays off above "
              + (f"{vol / 1e6:,.1f}M output tokens a month" if vol else "(never below its capacity)"),
              "", "| assumption | break-even month at x0.5 | at x2 |", "|---|---:|---:|"]
    for name, v in result["sensitivity"].items():
        lines.append(f"| {name} | {v['x0.5'] or 'never'} | {v['x2'] or 'never'} |")
    return "\n".join(lines)
