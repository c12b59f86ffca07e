"""Sampling as transformers' ``generate`` samples, in numpy: the ONNX engine's token choice (no torch here)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from slmforge.errors import GenerateError

if TYPE_CHECKING:
    from slmforge.generate import SamplingParams


def next_tokens(logits: np.ndarray, history: np.ndarray, params: SamplingParams,
                rng: np.random.Generator) -> np.ndarray:
    """The next token of each row, chosen as transformers' ``generate`` chooses it.

    Args:
        logits: (rows, vocab) scores of the last position.
        history: (rows, T) every token so far, prompt included (for the repetition penalty).
        params: Sampling parameters.
        rng: Random numbers for sampling.

    Returns:
        (rows,) token ids.
    """
    scores = logits.astype(np.float64)  # (rows, V)
    if params.repetition_penalty != 1.0:
        for row in range(scores.shape[0]):
            seen = np.unique(history[row])
            picked = scores[row, seen]
            scores[row, seen] = np.where(picked < 0, picked * params.repetition_penalty,
                                         picked / params.repetition_penalty)
    if params.temperature == 0:
        return scores.argmax(axis=-1)
    draws = rng.random(scores.shape[0])
    return np.array([draw_token(row, params, u) for row, u in zip(scores, draws)])


def draw_token(scores: np.ndarray, params: SamplingParams, u: float) -> int:
    """The token a uniform number ``u`` in [0, 1) picks from one row of float64 scores at ``params.temperature``,
    within ``params.top_k`` and the nucleus ``params.top_p``, as transformers' warpers define them (top-p: drop a
    token when the tokens more likely than it already hold ``top_p``; the most likely is always kept).

    Sorting a 262k vocabulary took tens of ms a row, so the nucleus is found among the ``argpartition`` best
    (8x more until they hold it; a 0.9 nucleus is rarely more than a few hundred tokens), and the draw is ``u``
    against the cumulative probabilities.
    """
    x = scores / params.temperature

    def best(k: int) -> np.ndarray:  # the k largest, in descending order
        ids = np.argpartition(x, x.size - k)[x.size - k:] if k < x.size else np.arange(x.size)
        return ids[np.argsort(-x[ids], kind="stable")]

    top = x.max()
    if params.top_k is not None and params.top_k < x.size:
        ids = best(params.top_k)
        probs = np.exp(x[ids] - top)
        probs /= probs.sum()  # renormalised over the k, as the top-k warper leaves them
    elif params.top_p is not None and params.top_p < 1.0:
        total = np.exp(x - top).sum()
        k = min(256, x.size)
        while True:
            ids = best(k)
            probs = np.exp(x[ids] - top) / total
            if k == x.size or probs.sum() - probs[-1] >= params.top_p:  # the k-th is outside the nucleus
                break
            k = min(8 * k, x.size)
    else:
        ids, probs = None, np.exp(x - top)
    if params.top_p is not None and params.top_p < 1.0:
        above = np.cumsum(probs) - probs
        probs = np.where((above >= params.top_p) & (np.arange(probs.size) > 0), 0.0, probs)
    cumulative = np.cumsum(probs)
    if not np.isfinite(cumulative[-1]) or cumulative[-1] <= 0:
        raise GenerateError("No token has a finite, positive probability at this step (NaN or masked logits).")
    index = min(int(np.searchsorted(cumulative, u * cumulative[-1], side="right")), cumulative.size - 1)
    return int(ids[index]) if ids is not None else index


def logsumexp(x: np.ndarray) -> np.ndarray:
    m = x.max(axis=-1, keepdims=True)
    return m + np.log(np.exp(x - m).sum(axis=-1, keepdims=True))
