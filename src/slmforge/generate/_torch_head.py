"""Batch-1 decoding on CPU: the LM head read in the layout the BLAS reads fastest.

Where the time of one decoded token goes (Gemma 3 270M, fp32, 2 threads, torch 2.13 with MKL,
``torch.profiler`` over ``model.generate``): ``aten::mm`` is 91% of it, and the tied 262,144 x 640
LM head alone is ~55 ms of a ~100 ms step: 671 MB at ~12 GB/s, while this machine streams ~32 GB/s.
A one-row ``F.linear`` over a row-major (out, in) weight is a transposed matrix-vector product,
which MKL runs at a third of the bandwidth on this (AMD) CPU; over the same values stored
column-major (``weight.t().contiguous().t()``) it is a plain one (x @ W^T with W^T contiguous)
and takes ~30 ms. Numerically it is the same fp32 product summed in another order (differences
~1e-4 on logits of ~20); on Gemma 3 270M, 64 greedy tokens of one prompt stayed identical.

Column-major is slower for several rows (4 rows: 223 vs 141 ms; 16 rows: 249 vs 165 ms), and the
batching engine, prefill with several sequences and scoring all pass many rows through the same
module, so the model keeps its weight as it is and the head gets a column-major twin used only
for one-row inputs: one more copy of the head in memory (671 MB for Gemma 3 270M), made on the
first one-row call and made again whenever the weight is changed in place or replaced.

Tried and not kept (docs/BENCHMARKS.md, "The torch engine on Gemma 3 270M"): twins of every
Linear (+400 MB for a gain within the noise), transformers' static cache, ``torch.compile`` of the
decode step (over a minute to compile for a small gain), OpenBLAS (numpy) matrix-vector products,
fast alone but slower inside the model (its threads and torch's OpenMP threads fight over two cores).

Greedy steps (inside ``exact_argmax_only``) go faster still without changing a token. A screen
gives every logit within a proven bound, the tokens that the bound cannot rule out of being the
argmax are recomputed in fp32 from the weight, and every other token keeps its screened value, which
lies below the recomputed maximum, so the argmax is the fp32 product's. The screen is oneDNN's int8
product where it is exact (``_int8_head``: a quarter of the bytes: 8.7 ms a row against bf16's 20.5),
else a bf16 copy of the head (half the bytes; this CPU multiplies bf16 natively: one row 26 ms
against the twin's 33, and 16 rows 39 ms against the row-major weight's 136, docs/BENCHMARKS.md),
whose bound for input x (u = 2^-8, bf16's unit roundoff; oneDNN sums bf16 products in fp32, then
rounds the sum to bf16; D = len(x)), for every row r of W, is

    |approx_r - x.w_r| <= (2u + u^2) sum_i |x_i w_ri| + fp32 summation + 2u |approx_r|
                       <= (2u + u^2 + 2 D 2^-24) ||x|| max_r ||w_r|| + 2u max_r |approx_r|
                                                                   (Cauchy-Schwarz, then the largest)

and every token within twice it of the row's best is recomputed. On Gemma 3 270M that is ~1-2
logits wide and a few tokens a row are recomputed. Written here because no library offers a
certified reduced-precision argmax.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F

from slmforge.generate._int8_head import Int8Screen, best_excluding


class RowVectorHead:
    """The ``forward`` of an ``nn.Linear`` LM head: inside ``exact_argmax_only`` the certified product
    (int8- or bf16-screened, any number of rows); otherwise one-row inputs by a column-major twin of
    the weight and everything else by the weight itself.

    Args:
        linear: The head (``model.get_output_embeddings()``), a plain ``torch.nn.Linear`` on CPU.
    """

    def __init__(self, linear: torch.nn.Linear) -> None:
        self.linear = linear
        self._key: tuple[Any, ...] | None = None
        self._twin: torch.Tensor | None = None
        self._screen_key: tuple[Any, ...] | None = None  # the weight the screens below were made from
        self._int8: Int8Screen | None = None  # made at the first certified product
        self._bf16: torch.Tensor | None = None  # instead, where the int8 screen cannot be used
        self._max_norm = 0.0  # the largest row norm of the weight
        self.certified_steps = 0  # rows multiplied in certified mode so far, and the tokens recomputed in fp32
        self.recomputed = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.linear.weight
        if weight.device.type != "cpu":
            return F.linear(x, weight, self.linear.bias)
        key = (weight.data_ptr(), _version(weight), weight.dtype, tuple(weight.shape))
        exact_ids = getattr(_mode, "exact_ids", None)
        if exact_ids is not None and weight.dtype == torch.float32 and self.linear.bias is None:
            return self._certified(x, key, exact_ids)
        if x.numel() != x.shape[-1]:  # several rows: the row-major weight
            return F.linear(x, weight, self.linear.bias)
        if key != self._key or self._twin is None:
            self._twin = weight.detach().t().contiguous().t()  # same values, stored (in, out)
            self._key = key
        return F.linear(x, self._twin, self.linear.bias)

    def _certified(self, x: torch.Tensor, key: tuple[Any, ...], exact_ids: tuple[int, ...]) -> torch.Tensor:
        """Logits whose argmax per row is the fp32 product's, with or without the ``exact_ids`` (always
        recomputed and left out of the threshold, so masking them, as transformers does to EOS before
        ``min_new_tokens``, still leaves the right argmax): the int8 screen's or bf16's values
        everywhere, fp32 wherever their bound cannot rule a token out (the module's docstring)."""
        weight = self.linear.weight.detach()
        rows = x.reshape(-1, x.shape[-1])  # (N, D)
        forced = torch.tensor(sorted({i for i in exact_ids if 0 <= i < weight.shape[0]}), dtype=torch.long)
        if key != self._screen_key:
            self._int8 = Int8Screen.build(weight, rows)  # None where oneDNN's int8 product is unusable
            self._bf16 = weight.to(torch.bfloat16) if self._int8 is None else None
            if self._bf16 is not None:  # in slices: a float64 copy of Gemma 3's head would be 1.3 GB
                self._max_norm = max(float(weight[i:i + 16384].double().norm(dim=1).max())
                                     for i in range(0, weight.shape[0], 16384))
            self._screen_key = key
        if self._int8 is not None:
            approx, pairs = self._int8.candidates(rows, forced)
        else:
            approx, pairs = self._bf16_candidates(rows, forced)
        self.certified_steps += rows.shape[0]
        if pairs.shape[0] > RECOMPUTE_LIMIT:  # a flat step: the plain product costs less than gathering the rows
            self.recomputed += rows.shape[0] * weight.shape[0]
            return F.linear(x, weight)
        if forced.numel():
            every = torch.cartesian_prod(torch.arange(rows.shape[0]), forced).view(-1, 2)
            pairs = torch.unique(torch.cat([pairs, every]), dim=0)
        exact = (rows.index_select(0, pairs[:, 0]) * weight.index_select(0, pairs[:, 1])).sum(-1)
        approx[pairs[:, 0], pairs[:, 1]] = exact
        self.recomputed += int(pairs.shape[0])
        return approx.view(*x.shape[:-1], -1)

    def _bf16_candidates(self, rows: torch.Tensor, forced: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """bf16 logits and the pairs within twice the bound of their row's best non-forced token. One
        bound per row, the largest of its tokens' (the largest row norm, the largest |logit|): looser
        than per token, but two passes over the logits instead of six."""
        assert self._bf16 is not None
        approx = F.linear(rows.to(torch.bfloat16), self._bf16).float()  # (N, V)
        low, high = torch.aminmax(approx, dim=-1)
        u = 2.0**-8
        factor = 2 * u + u * u + 2 * rows.shape[-1] * 2.0**-24
        bound = factor * self._max_norm * rows.double().norm(dim=-1).float() + 2 * u * torch.maximum(high, -low) + 1e-6
        top, _ = best_excluding(approx, forced)
        return approx, torch.nonzero(approx >= (top - 2 * bound)[:, None])  # (k, 2): row, token


# Above this many (row, token) pairs to recompute, a step takes the plain fp32 product instead: gathering
# each pair's weight row would copy more than the product reads (32,768 rows of 640 floats: 84 MB).
RECOMPUTE_LIMIT = 32768

_mode = threading.local()  # .exact_ids, per thread: streaming generates in its own thread, the server in several


@contextlib.contextmanager
def exact_argmax_only(exact_ids: tuple[int, ...] = ()) -> Iterator[None]:
    """Within this block, in this thread, head products (any number of rows) need only each row's fp32
    argmax exact: greedy decoding with nothing that reorders tokens after the head (no repetition
    penalty, no constraint mask) except masking some of ``exact_ids`` (EOS ids suppressed until
    ``min_new_tokens``). The other logits are then within ~1-2 of their fp32 value."""
    before = getattr(_mode, "exact_ids", None)
    _mode.exact_ids = tuple(exact_ids)
    try:
        yield
    finally:
        _mode.exact_ids = before


def _version(tensor: torch.Tensor) -> int | None:
    """The tensor's in-place write counter (None for inference tensors, which keep none)."""
    try:
        return tensor._version
    except RuntimeError:
        return None


def attach_row_vector_head(model: Any) -> bool:
    """Give the model's LM head a column-major twin for one-row (batch-1 decode) inputs.

    Only a plain ``torch.nn.Linear`` head on CPU gets one (not a quantized or LoRA-wrapped head,
    not CUDA, where cuBLAS has no such gap). Calling it again does nothing.

    Args:
        model: A transformers causal LM, or a peft model over one.

    Returns:
        Whether the head now has the twin.
    """
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if type(head) is not torch.nn.Linear or head.weight.device.type != "cpu":
        return False
    if not isinstance(head.__dict__.get("forward"), RowVectorHead):
        # An instance attribute: nn.Module.__call__ calls it; the class's forward stays as it is.
        head.forward = RowVectorHead(head)  # type: ignore[method-assign,assignment]
    return True
