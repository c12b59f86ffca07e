"""The one sampler of the batch engine (``serve._batch.sample_token``) and the ONNX engine
(``generate._sampling.next_tokens``): the distribution transformers' warpers define (temperature, then
top-k, then the top-p nucleus over what is left), drawn without sorting the vocabulary."""

from __future__ import annotations

import pytest
import torch

from slmforge.errors import GenerateError
from slmforge.generate import SamplingParams
from slmforge.generate._sampling import next_tokens
from slmforge.serve._batch import sample_token


def reference(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """The probabilities transformers' warpers leave, by a full sort (the ascending top-p of TopPLogitsWarper)."""
    row = logits.double() / p.temperature
    if p.top_k is not None and p.top_k < row.numel():
        row[row < torch.topk(row, p.top_k).values[-1]] = -torch.inf
    if p.top_p is not None and p.top_p < 1.0:
        ascending, order = torch.sort(row)
        remove = torch.softmax(ascending, -1).cumsum(-1) <= 1 - p.top_p
        remove[-1] = False  # the most likely token stays
        row[order[remove]] = -torch.inf
    return torch.softmax(row, -1)


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.7, top_p=0.8),
    SamplingParams(temperature=1.3, top_k=5),
    SamplingParams(temperature=1.0, top_k=10, top_p=0.5),
])
def test_draws_follow_the_warpers_distribution(params):
    logits = torch.linspace(4, -4, 40) + torch.sin(torch.arange(40.0))  # distinct, unsorted
    expected = reference(logits, params)
    rng = torch.Generator().manual_seed(0)
    n = 6000  # seeded: the same draws every run
    counts = torch.bincount(torch.tensor([sample_token(logits.clone(), params, rng) for _ in range(n)]), minlength=40)
    assert (counts[expected == 0] == 0).all()  # never outside top-k / the nucleus
    assert (counts / n - expected).abs().max() < 0.025  # ~4 standard deviations at the largest p


def test_a_wide_nucleus_in_a_large_vocabulary_grows_past_the_first_candidates():
    torch.manual_seed(0)
    logits = torch.randn(262_144) * 0.1  # nearly flat: a 0.5 nucleus holds ~130k tokens
    params = SamplingParams(temperature=1.0, top_p=0.5)
    expected = reference(logits, params)
    rng = torch.Generator().manual_seed(1)
    drawn = torch.tensor([sample_token(logits.clone(), params, rng) for _ in range(300)])
    assert (expected[drawn] > 0).all()
    assert len(set(drawn.tolist())) > 250  # spread over the nucleus, not its first 256


def test_the_same_seed_draws_the_same_tokens_and_nan_logits_are_an_error():
    logits = torch.randn(1000)
    params = SamplingParams(temperature=0.8, top_p=0.9)
    draws = [[sample_token(logits.clone(), params, g) for _ in range(20)]
             for g in (torch.Generator().manual_seed(3), torch.Generator().manual_seed(3))]
    assert draws[0] == draws[1]
    with pytest.raises(GenerateError, match="finite"):
        sample_token(torch.full((10,), float("nan")), SamplingParams(temperature=1.0), None)


def test_the_onnx_engines_rows_draw_from_the_same_distribution():
    import numpy as np

    logits = torch.linspace(4, -4, 40) + torch.sin(torch.arange(40.0))
    params = SamplingParams(temperature=0.7, top_p=0.8, repetition_penalty=1.0)
    expected = reference(logits, params).numpy()
    rows = np.tile(logits.numpy(), (3000, 1))
    drawn = next_tokens(rows, np.zeros((3000, 1), np.int64), params, np.random.default_rng(0))
    counts = np.bincount(drawn, minlength=40) / drawn.size
    assert (counts[expected == 0] == 0).all() and np.abs(counts - expected).max() < 0.03
