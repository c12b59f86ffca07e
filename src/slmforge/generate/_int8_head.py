"""The certified head's int8 screen: most logits of a greedy step from an int8 copy of the LM head,
with a proven bound per token, so only the few tokens that could still be the argmax are read in fp32.

Why: a bf16 copy of Gemma 3 270M's 262,144 x 640 head still reads 335 MB a token (~20 ms here).
oneDNN's int8 product (``torch.ops.onednn.qlinear_pointwise``: uint8 activations x int8 weights,
exact int32 sums, fp32 out) reads half that: with the bound and the candidates, 8.7 ms for one row
and 20.3 for 16 (docs/BENCHMARKS.md). Its numbers are not the fp32 ones, but everything in them is
known: the weights are rounded per row (scale s_r, residual w_r - s_r q_r, whose norm is stored per
token), and the activations are rounded here, before the call, so their error e is known exactly
too. For an input x and every token r:

    |x.w_r - approx_r| <= ||e|| ||w_r|| + ||x^|| ||w_r - s_r q_r|| + c      (Cauchy-Schwarz, twice)

where x^ = x - e is what the kernel multiplies and c covers fp32 rounding after the exact int32 sum
(a few ulps of the largest possible |logit|, taken generously). Two things keep it tight on a real
model: the bound is per token (the residual norms vary 4x between rows), and the few channels where
the final hidden state is always large (Gemma's "massive activations"; 16 of 640 here, chosen from
the first rows seen) are multiplied in fp32 from a 16 x V copy instead of setting the activation
scale: on Gemma 3 270M that halves ||e||, and about a dozen tokens a step need fp32 (median 3).

Written here because no library offers a certified reduced-precision argmax. Where the oneDNN op is
missing (non-x86 builds) or fails its saturation probe (int8 kernels without VNNI may saturate
16-bit pair sums), ``Int8Screen.build`` returns None and the bf16 screen is used instead.
"""

from __future__ import annotations

from typing import Any

import torch

OUTLIER_CHANNELS = 16  # channels multiplied in fp32 (Gemma 3 270M: their mean |x| is 3-4x the rest's)
_CHUNK = 16384  # weight rows quantized at a time (float64 temporaries)


def _qlinear(xu: torch.Tensor, packed: Any, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """uint8 rows (zero point 128, scale 1) times the packed int8 weight: exact int32 sums times the row scales."""
    return torch.ops.onednn.qlinear_pointwise(xu, 1.0, 128, packed, scales, zeros, None, 1.0, 0, torch.float32,
                                              "none", [], "")


class Int8Screen:
    """An int8 copy of a head's weight, and the per-token numbers its bound needs.

    Build with ``Int8Screen.build(weight, first_rows)``; ``candidates`` then gives a step's logits
    and the (row, token) pairs that must be recomputed in fp32.
    """

    def __init__(self, weight: torch.Tensor, channels: torch.Tensor) -> None:
        self.channels = channels
        self.outlier_weight = weight.index_select(1, channels).t().contiguous()  # (k, V), fp32
        vocab = weight.shape[0]
        q = torch.empty(weight.shape, dtype=torch.int8)
        self.scales = torch.empty(vocab)
        self.norms = torch.empty(vocab, dtype=torch.float64)  # ||w_r||
        self.residuals = torch.empty(vocab, dtype=torch.float64)  # ||w_r - s_r q_r||
        for start in range(0, vocab, _CHUNK):
            w = weight[start:start + _CHUNK].double()
            scale = (w.abs().amax(1) / 127).float().clamp_min(1e-30)  # the fp32 scale the kernel uses
            rounded = torch.round(w / scale.double()[:, None]).clamp_(-127, 127)
            q[start:start + _CHUNK] = rounded.to(torch.int8)
            self.scales[start:start + _CHUNK] = scale
            self.norms[start:start + _CHUNK] = w.norm(dim=1)
            self.residuals[start:start + _CHUNK] = (w - rounded * scale.double()[:, None]).norm(dim=1)
        self.zeros = torch.zeros(vocab, dtype=torch.long)
        self.packed = torch.ops.onednn.qlinear_prepack(q, [1, weight.shape[1]])
        self.max_norm, self.max_residual = float(self.norms.max()), float(self.residuals.max())
        self.norms32, self.residuals32 = self.norms.float(), self.residuals.float()

    @classmethod
    def build(cls, weight: torch.Tensor, first_rows: torch.Tensor) -> Int8Screen | None:
        """The screen for ``weight`` (V, D), or None where oneDNN's int8 product is missing or inexact."""
        if not hasattr(torch.ops.onednn, "qlinear_pointwise") or not _kernel_is_exact(weight.shape[1]):
            return None
        k = min(OUTLIER_CHANNELS, weight.shape[1] // 4)
        channels = first_rows.abs().mean(0).topk(k).indices.sort().values
        return cls(weight, channels)

    def candidates(self, rows: torch.Tensor, forced: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Approximate logits (N, V) of ``rows`` (N, D) and the (row, token) pairs that could be a
        row's fp32 argmax. ``forced`` token ids are left out of the threshold (they may be masked
        after the head); the caller recomputes them anyway."""
        rest = rows.clone()
        rest[:, self.channels] = 0
        step = rest.abs().amax(-1).clamp_min(1e-30) / 127  # (N,) fp32
        xq = torch.round(rest / step[:, None]).clamp_(-127, 127)
        xhat = xq.double() * step.double()[:, None]  # exactly what the kernel multiplies
        err = (rest.double() - xhat).norm(dim=-1)
        size = xhat.norm(dim=-1)
        approx = _qlinear((xq + 128).to(torch.uint8), self.packed, self.scales, self.zeros)
        approx.mul_(step[:, None]).addmm_(rows.index_select(1, self.channels), self.outlier_weight)
        # fp32 rounding after the exact int32 sums, and of the fp32 outlier product: far below 2^-16
        # of the largest |logit| these rows can have.
        slack = 2.0**-16 * (rows.double().norm(dim=-1) + err + 1) * (self.max_norm + self.max_residual) + 1e-6
        high, best = best_excluding(approx, forced)
        low = high.double() - (err * self.norms[best] + size * self.residuals[best] + slack)  # <= the true max
        loose = err * self.max_norm + size * self.max_residual + slack  # every token's bound is below this
        pairs = torch.nonzero(approx >= (low - loose).float()[:, None])
        r, t = pairs[:, 0], pairs[:, 1]
        bound = err.float()[r] * self.norms32[t] + size.float()[r] * self.residuals32[t] + slack.float()[r]
        value = approx[r, t]
        lower = (value - bound).masked_fill(torch.isin(t, forced), -torch.inf)  # forced ids may be masked later
        # A better lower bound of each row's true max: the best of its candidates' own lower bounds.
        low = torch.maximum(low.float(), torch.full_like(high, -torch.inf).scatter_reduce(0, r, lower, "amax"))
        return approx, pairs[value + bound >= low[r]]


def best_excluding(approx: torch.Tensor, forced: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's largest value and its token, over tokens not in ``forced``."""
    high, best = approx.max(-1)
    if forced.numel():
        hit = torch.isin(best, forced).nonzero().view(-1)
        if hit.numel():
            others = approx[hit].index_fill_(-1, forced, -torch.inf)
            high[hit], best[hit] = others.max(-1)
    return high, best


_EXACT: dict[int, bool] = {}


def _kernel_is_exact(width: int) -> bool:
    """Whether oneDNN's int8 product gives exact int32 sums here at this width, at the extremes where
    int8 kernels without VNNI saturate 16-bit pair sums (255 x 127 + 255 x 127 > 32767)."""
    if width not in _EXACT:
        gen = torch.Generator().manual_seed(0)
        q = torch.randint(-127, 128, (64, width), generator=gen, dtype=torch.int8)
        q[0], q[1] = 127, -127
        x = torch.randint(-127, 128, (3, width), generator=gen).float()
        x[0], x[1] = 127, -127
        try:
            got = _qlinear((x + 128).to(torch.uint8), torch.ops.onednn.qlinear_prepack(q, [1, width]),
                           torch.ones(64), torch.zeros(64, dtype=torch.long))
            _EXACT[width] = bool(torch.equal(got.double(), x.double() @ q.double().t()))
        except (RuntimeError, NotImplementedError):  # the op exists but refuses these inputs: the bf16 screen
            _EXACT[width] = False
    return _EXACT[width]
