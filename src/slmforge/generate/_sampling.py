"""Sampling as transformers' ``generate`` samples, in numpy: the ONNX engine's token choice (no torch here)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

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
    scores = scores / params.temperature
    if params.top_k is not None and params.top_k < scores.shape[-1]:
        kth = np.partition(scores, -params.top_k, axis=-1)[:, -params.top_k][:, None]
        scores = np.where(scores < kth, -np.inf, scores)
    if params.top_p is not None and params.top_p < 1.0:
        order = np.argsort(scores, axis=-1, kind="stable")  # ascending, as transformers' TopPLogitsWarper
        ascending = np.take_along_axis(scores, order, axis=-1)
        cumulative = np.cumsum(_softmax(ascending), axis=-1)
        remove = cumulative <= 1 - params.top_p
        remove[:, -1] = False  # always keep the most likely token
        np.put_along_axis(scores, order, np.where(remove, -np.inf, ascending), axis=-1)
    probs = _softmax(scores)
    draws = rng.random(scores.shape[0])
    return np.array([min(int(np.searchsorted(np.cumsum(p), u * p.sum())), p.size - 1) for p, u in zip(probs, draws)])


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def logsumexp(x: np.ndarray) -> np.ndarray:
    m = x.max(axis=-1, keepdims=True)
    return m + np.log(np.exp(x - m).sum(axis=-1, keepdims=True))
