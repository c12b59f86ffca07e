"""Decoding on CPU: the decoder's linear layers read from oneDNN-packed copies.

A decode step multiplies one row by every layer's weight: Gemma 3 270M has 126 such matrices, 400 MB
in fp32, between 0.6 and 5 MB each. Through ``F.linear`` (MKL) that stream runs at ~12.6 GB/s on this
AMD CPU, half of what it can read (~25 GB/s, one thread); the same products from weights packed once
for oneDNN (``torch.ops.mkldnn._reorder_linear_weight``, then ``_linear_pointwise``) take 24.0 ms
against 31.8 (column-major copies: 28.6; ``benchmarks/torch_cpu_products.py``), and took the engine
from 1.82x to 2.24x ``model.generate`` on Gemma 3 270M with the same greedy text (docs/BENCHMARKS.md,
"The torch engine on Gemma 3 270M"). It is the same fp32 product summed in another order, as with
the head's column-major twin. Several rows gain more (16 rows: 27.7 against 65.0 ms; 512 rows: 518
against 673), so every product without a gradient uses it: decode steps of one row or a batch,
prefill and scoring.

The packed copy is a twin, made at a layer's first call and again whenever its weight is changed in
place or replaced; training keeps the module's own weight, which every other path (LoRA, state
dicts, quantization) expects. The cost is one more copy of the layers in memory (+400 MB for
Gemma 3 270M). Written here because neither transformers nor PyTorch
packs weights for one-row decoding outside ``torch.compile``, whose compile took over a minute for a
smaller gain (docs/BENCHMARKS.md).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from slmforge.generate._torch_head import _version


def packing_available() -> bool:
    """Whether this torch build has oneDNN's packed fp32 linear (x86 builds do)."""
    return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


class PackedLinear:
    """The ``forward`` of a plain ``nn.Linear``: fp32 inputs that want no gradient through a
    oneDNN-packed twin of the weight, everything else through the weight itself."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        self.linear = linear
        self._key: tuple[Any, ...] | None = None
        self._packed: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.linear.weight, self.linear.bias
        if (x.dtype != torch.float32 or weight.dtype != torch.float32 or x.numel() == 0
                or (torch.is_grad_enabled() and (weight.requires_grad or x.requires_grad))):
            return F.linear(x, weight, bias)
        key = (weight.data_ptr(), _version(weight), tuple(weight.shape))
        if key != self._key or self._packed is None:
            # Packed for 16 rows: as fast as a one-row packing at one row, faster at several.
            self._packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 16)
            self._key = key
        out = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), self._packed, bias, "none", [], "")
        return out.view(*x.shape[:-1], -1)


def attach_packed_layers(model: Any) -> int:
    """Give every plain ``nn.Linear`` of the model on CPU, except its LM head (``_torch_head``'s),
    a oneDNN-packed twin for products without a gradient. Calling it again does nothing more.

    Args:
        model: A transformers causal LM, or a peft model over one.

    Returns:
        How many layers have the twin (0 where the torch build has no oneDNN).
    """
    if not packing_available():
        return 0
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    count = 0
    for module in model.modules():
        if type(module) is not torch.nn.Linear or module is head or module.weight.device.type != "cpu":
            continue
        if not isinstance(module.__dict__.get("forward"), PackedLinear):
            module.forward = PackedLinear(module)  # type: ignore[method-assign,assignment]
        count += 1
    return count
