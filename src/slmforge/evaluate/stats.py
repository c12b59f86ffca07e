"""Is model B really better than model A on this suite? Paired tests over per-item scores.

    from slmforge.evaluate.stats import compare
    result = compare(scores_a, scores_b)   # one score per item, same items in the same order
    result["verdict"]                      # "better" | "worse" | "no significant difference"

Every test here is paired: item i of ``a`` and item i of ``b`` are the same question,
so the noise shared by both models (easy and hard items) cancels. Binary scores
(right/wrong) use McNemar's test; other scores a sign-flip permutation test. Both come
with a bootstrap confidence interval of the mean difference, and a difference is only
called significant when the p-value and the interval agree. Only numpy and the
standard library: the binomial and the chi-square (1 degree of freedom) tails are
closed forms, so scipy is not needed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["paired_bootstrap_ci", "mcnemar", "paired_permutation_test", "compare"]

_CHUNK = 1 << 22  # resample rows x items per numpy batch: bounds memory for long suites
_EXACT_PERMUTATION_MAX = 16  # 2**16 sign patterns: enumerate them all instead of sampling
_EXACT_MCNEMAR_BELOW = 25  # discordant pairs under this: exact binomial, else chi-square


def _paired(a: Sequence[float], b: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    if len(a) != len(b):
        raise ValueError(f"a has {len(a)} scores and b {len(b)}; paired tests need one score per item from each")
    if not len(a):
        raise ValueError("no items to compare")
    return np.asarray(a, dtype=float), np.asarray(b, dtype=float)


def _chunks(n_resamples: int, n_items: int) -> list[tuple[int, int]]:
    """(first row, rows) of resample batches of at most ``_CHUNK`` elements each."""
    step = max(1, _CHUNK // n_items)
    return [(start, min(step, n_resamples - start)) for start in range(0, n_resamples, step)]


def paired_bootstrap_ci(
    a: Sequence[float], b: Sequence[float], n_resamples: int = 10_000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """Mean of ``b - a`` and its percentile bootstrap confidence interval over item resamples.

    Args:
        a: Per-item scores of the baseline.
        b: Per-item scores of the candidate, same items in the same order.
        n_resamples: Bootstrap resamples (items drawn with replacement).
        confidence: Coverage of the interval, e.g. 0.95.
        seed: Seeds the resampling; the same inputs and seed give the same interval.

    Returns:
        ``(mean_diff, low, high)``.

    Raises:
        ValueError: ``a`` and ``b`` differ in length or are empty, ``n_resamples < 1``,
            or ``confidence`` is not in (0, 1).
    """
    x, y = _paired(a, b)
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be at least 1, got {n_resamples}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be between 0 and 1, got {confidence}")
    d = y - x
    n = len(d)
    rng = np.random.default_rng(seed)
    means = np.empty(n_resamples)
    for start, rows in _chunks(n_resamples, n):
        idx = rng.integers(0, n, size=(rows, n))  # (R, N)
        means[start : start + rows] = d[idx].mean(axis=1)
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(d.mean()), float(low), float(high)


def _as_binary(values: Sequence[Any], name: str) -> np.ndarray:
    arr = np.asarray(values, dtype=float)
    if not np.isin(arr, (0.0, 1.0)).all():
        raise ValueError(f"{name} must hold only True/False or 0/1 scores for McNemar's test")
    return arr.astype(bool)


def mcnemar(a: Sequence[bool], b: Sequence[bool]) -> dict[str, Any]:
    """McNemar's test on paired right/wrong outcomes.

    Only the discordant items count: ``b01`` (a wrong, b right) and ``b10`` (a right, b wrong).
    Under the null each discordant item is a fair coin. With fewer than 25 of them the
    p-value is the exact two-sided binomial tail and ``statistic`` is min(b01, b10); from
    25 on it is the chi-square (1 d.o.f.) with continuity correction,
    ``statistic = max(|b01 - b10| - 1, 0)^2 / (b01 + b10)``.

    Args:
        a: Per-item correctness of the baseline (bool or 0/1).
        b: Per-item correctness of the candidate, same items in the same order.

    Returns:
        ``b01``, ``b10``, ``statistic``, ``p_value`` and ``method`` ("exact" or "chi2").
        No discordant items gives p_value 1.0.

    Raises:
        ValueError: Lengths differ, no items, or a score is not 0/1.
    """
    x, y = _paired(a, b)
    x, y = _as_binary(x, "a"), _as_binary(y, "b")
    b01 = int(np.sum(~x & y))
    b10 = int(np.sum(x & ~y))
    n = b01 + b10
    if n < _EXACT_MCNEMAR_BELOW:
        smaller = min(b01, b10)
        tail = sum(math.comb(n, i) for i in range(smaller + 1))  # P(X <= smaller) * 2**n, X ~ Bin(n, 1/2)
        p = min(1.0, 2 * tail / 2**n)
        return {"b01": b01, "b10": b10, "statistic": float(smaller), "p_value": p, "method": "exact"}
    statistic = max(abs(b01 - b10) - 1, 0) ** 2 / n
    p = math.erfc(math.sqrt(statistic / 2))  # chi-square survival function with 1 d.o.f.
    return {"b01": b01, "b10": b10, "statistic": statistic, "p_value": p, "method": "chi2"}


def paired_permutation_test(
    a: Sequence[float], b: Sequence[float], n_resamples: int = 10_000, seed: int = 0
) -> float:
    """Two-sided p-value for "mean(b - a) is 0", by flipping the signs of the paired differences.

    With 16 items or fewer every sign pattern is enumerated (exact); otherwise
    ``n_resamples`` random patterns give ``(1 + hits) / (1 + n_resamples)``, which never
    reports an impossible p of 0.

    Args:
        a: Per-item scores of the baseline.
        b: Per-item scores of the candidate, same items in the same order.
        n_resamples: Random sign patterns when not exact.
        seed: Seeds the sampling.

    Raises:
        ValueError: Lengths differ, no items, or ``n_resamples < 1``.
    """
    x, y = _paired(a, b)
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be at least 1, got {n_resamples}")
    d = y - x
    n = len(d)
    observed = abs(d.mean())
    threshold = observed - 1e-9 * max(1.0, observed)  # sums in another order may differ in the last bits
    if n <= _EXACT_PERMUTATION_MAX:
        patterns = np.arange(2**n)[:, None] >> np.arange(n) & 1  # (2**N, N) of 0/1
        means = np.abs((2 * patterns - 1) @ d) / n  # (2**N,)
        return float(np.mean(means >= threshold))
    rng = np.random.default_rng(seed)
    hits = 0
    for _, rows in _chunks(n_resamples, n):
        signs = 2 * rng.integers(0, 2, size=(rows, n)) - 1  # (R, N)
        hits += int(np.sum(np.abs(signs @ d) / n >= threshold))
    return (1 + hits) / (1 + n_resamples)


def compare(
    a: Sequence[float],
    b: Sequence[float],
    binary: bool | None = None,
    alpha: float = 0.05,
    *,
    n_resamples: int = 10_000,
    seed: int = 0,
) -> dict[str, Any]:
    """Compare a candidate ``b`` with a baseline ``a`` on the same items.

    Args:
        a: Per-item scores of the baseline.
        b: Per-item scores of the candidate, same items in the same order.
        binary: Whether the scores are right/wrong (McNemar's test) rather than graded
            (permutation test). ``None``: binary when every score is 0 or 1.
        alpha: Significance level; the confidence interval has coverage ``1 - alpha``.
        n_resamples: For the bootstrap and a sampled permutation test.
        seed: For the bootstrap and a sampled permutation test.

    Returns:
        ``mean_a``, ``mean_b``, ``diff`` (mean of b - a), ``ci_low``, ``ci_high``,
        ``p_value``, ``test`` ("mcnemar" or "permutation"), ``n`` (items) and ``verdict``:
        "better" or "worse" (b relative to a) when p < alpha and the interval excludes 0,
        else "no significant difference".

    Raises:
        ValueError: Lengths differ, no items, ``alpha`` not in (0, 1), or ``binary=True``
            with a score other than 0/1.
    """
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be between 0 and 1, got {alpha}")
    x, y = _paired(a, b)
    if binary is None:
        binary = bool(np.isin(x, (0.0, 1.0)).all() and np.isin(y, (0.0, 1.0)).all())
    diff, low, high = paired_bootstrap_ci(x, y, n_resamples=n_resamples, confidence=1 - alpha, seed=seed)
    if binary:
        p, test = mcnemar(x, y)["p_value"], "mcnemar"
    else:
        p, test = paired_permutation_test(x, y, n_resamples=n_resamples, seed=seed), "permutation"
    if p < alpha and low > 0:
        verdict = "better"
    elif p < alpha and high < 0:
        verdict = "worse"
    else:
        verdict = "no significant difference"
    return {
        "mean_a": float(x.mean()),
        "mean_b": float(y.mean()),
        "diff": diff,
        "ci_low": low,
        "ci_high": high,
        "p_value": p,
        "test": test,
        "n": len(x),
        "verdict": verdict,
    }
