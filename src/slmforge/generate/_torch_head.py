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
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


class RowVectorHead:
    """The ``forward`` of an ``nn.Linear`` LM head that multiplies one-row inputs by a column-major
    twin of the weight and everything else by the weight itself.

    Args:
        linear: The head (``model.get_output_embeddings()``), a plain ``torch.nn.Linear`` on CPU.
    """

    def __init__(self, linear: torch.nn.Linear) -> None:
        self.linear = linear
        self._key: tuple[Any, ...] | None = None
        self._twin: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.linear.weight
        if x.numel() != x.shape[-1] or weight.device.type != "cpu":  # several rows: the row-major weight
            return F.linear(x, weight, self.linear.bias)
        key = (weight.data_ptr(), _version(weight), weight.dtype, tuple(weight.shape))
        if key != self._key or self._twin is None:
            self._twin = weight.detach().t().contiguous().t()  # same values, stored (in, out)
            self._key = key
        return F.linear(x, self._twin, self.linear.bias)


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
