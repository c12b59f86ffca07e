"""The certified head's int8 screen (issue 15): oneDNN's int8 product with a proven per-token bound.

Random heads whose row norms vary 10x and inputs with a few channels 30x larger than the rest (the
"massive activations" of real models): the screen's candidates always hold each row's fp32 argmax,
every other token's value lies below it, few tokens need fp32, and near-ties that int8 alone gets
wrong come out right. Where the kernel would saturate, the screen is refused and bf16 is used.
"""

from __future__ import annotations

import pytest
import torch

import slmforge.generate._int8_head as int8_head
from slmforge.generate._int8_head import Int8Screen
from slmforge.generate._torch_head import RowVectorHead, exact_argmax_only

pytestmark = pytest.mark.skipif(not hasattr(torch.ops.onednn, "qlinear_pointwise") or not int8_head._kernel_is_exact(64),
                                reason="no exact oneDNN int8 product in this torch build")


def spiky(rows: int, width: int, gen: torch.Generator) -> torch.Tensor:
    """Inputs whose channels 3, 17 and 40 are always ~30x the others."""
    x = torch.randn(rows, width, generator=gen)
    x[:, [3, 17, 40]] *= 30
    return x


def random_head(vocab: int, width: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(vocab, width, generator=gen) * torch.linspace(0.02, 0.2, vocab)[torch.randperm(vocab, generator=gen), None]


def test_candidates_hold_every_rows_fp32_argmax_and_the_rest_lie_below_it():
    gen = torch.Generator().manual_seed(0)
    weight = random_head(5000, 64, gen)
    rows = spiky(24, 64, gen)
    screen = Int8Screen.build(weight, rows[:1])
    assert screen is not None and set(screen.channels.tolist()) >= {3, 17, 40}
    for forced in (torch.tensor([], dtype=torch.long), torch.tensor([7, 4999])):
        approx, pairs = screen.candidates(rows, forced)
        exact = rows.double() @ weight.double().t()
        masked = exact.clone()
        masked[:, forced] = -torch.inf
        best = masked.max(-1)
        chosen = torch.zeros_like(approx, dtype=torch.bool)
        chosen[pairs[:, 0], pairs[:, 1]] = True
        assert chosen[torch.arange(24), best.indices].all()  # the argmax is always recomputed
        outside = (~chosen).clone()
        outside[:, forced] = False
        assert (approx.double()[outside] < best.values[:, None].expand_as(approx)[outside]).all()
        assert pairs.shape[0] < 24 * 60  # a screen: a few dozen tokens a row at most, of 5,000


def test_near_ties_int8_alone_gets_wrong_come_out_right():
    int8_wrong = 0
    for seed in range(30):
        gen = torch.Generator().manual_seed(seed)
        weight = random_head(2000, 64, gen)
        x = spiky(1, 64, gen)[0]
        top = x / x.norm() * 0.6
        weight[0], weight[1] = top, top + torch.randn(64, generator=gen) * 3e-4
        head = torch.nn.Linear(64, 2000, bias=False).requires_grad_(False)
        head.weight.data = weight
        exact = torch.nn.functional.linear(x, weight)
        forward = RowVectorHead(head)
        with exact_argmax_only():
            got = forward(x.view(1, 1, 64)).view(-1)
        assert forward._int8 is not None and int(got.argmax()) == int(exact.argmax())
        approx, _ = forward._int8.candidates(x.view(1, 64), torch.tensor([], dtype=torch.long))
        int8_wrong += int(approx.argmax() != exact.argmax())
    assert int8_wrong > 0  # a real test: the int8 product alone would have failed it


def test_a_saturating_kernel_is_refused_and_bf16_takes_over(monkeypatch):
    real = int8_head._qlinear

    def saturating(xu, packed, scales, zeros):  # what 16-bit pair sums do at the extremes
        return real(xu, packed, scales, zeros).clamp(-30000, 30000)

    monkeypatch.setattr(int8_head, "_qlinear", saturating)
    monkeypatch.setattr(int8_head, "_EXACT", {})
    gen = torch.Generator().manual_seed(1)
    head = torch.nn.Linear(64, 500, bias=False).requires_grad_(False)
    head.weight.data = random_head(500, 64, gen)
    assert Int8Screen.build(head.weight, spiky(1, 64, gen)) is None
    forward = RowVectorHead(head)
    x = spiky(3, 64, gen)
    with exact_argmax_only():
        got = forward(x)
    assert forward._int8 is None and forward._bf16 is not None
    assert torch.equal(got.argmax(-1), torch.nn.functional.linear(x, head.weight).argmax(-1))


def test_a_flat_step_takes_the_plain_fp32_product(monkeypatch):
    """Where the bound cannot rule tokens out (here: an input so small that every logit is within it),
    the step is the fp32 product itself rather than a gather of most of the head's rows."""
    import slmforge.generate._torch_head as torch_head

    monkeypatch.setattr(torch_head, "RECOMPUTE_LIMIT", 100)
    gen = torch.Generator().manual_seed(2)
    head = torch.nn.Linear(64, 3000, bias=False).requires_grad_(False)
    head.weight.data = random_head(3000, 64, gen)
    forward = RowVectorHead(head)
    x = spiky(2, 64, gen)
    with exact_argmax_only():
        forward(x)  # builds the screen on ordinary rows
        steps = forward.certified_steps
        got = forward(x * 1e-6)
    assert forward.certified_steps == steps + 2
    assert torch.equal(got, torch.nn.functional.linear(x * 1e-6, head.weight))
