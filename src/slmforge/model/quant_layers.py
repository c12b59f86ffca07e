"""Quantized replacements for ``torch.nn.Linear``, one class per storage format.

Every class keeps its quantized weight and scales as persistent buffers, so
``model.state_dict()`` holds exactly what goes to disk, and a model rebuilt with
the same classes loads it back bit for bit. Each class has ``from_linear`` (quantize
a float layer) and a constructor taking only shapes (an empty layer to load into).

Scales that are stored in float16 are rounded to float16 *before* the weights are
quantized with them, so the in-memory model and the reloaded one compute the same.

The classes sit in the model layer because loading a quantized folder
(``slmforge.model.quantized``) rebuilds them; compress/ makes them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# The smallest scale we store: keeps all-zero groups from dividing by zero.
_MIN_SCALE = 1e-6


# --------------------------------------------------------------------------- packing


def pack_int4(values: torch.Tensor) -> torch.Tensor:
    """Signed 4-bit integers in [-8, 7] -> bytes, two per byte (low nibble first), flattened."""
    flat = (values.flatten().to(torch.int16) + 8).to(torch.uint8)  # [0, 15]
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    pairs = flat.view(-1, 2)  # (N/2, 2)
    return pairs[:, 0] | (pairs[:, 1] << 4)


def unpack_int4(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of ``pack_int4``: int8 values in [-8, 7], flattened, ``numel`` long."""
    low = (packed & 0x0F).to(torch.int8)
    high = (packed >> 4).to(torch.int8)
    return torch.stack([low, high], dim=1).flatten()[:numel] - 8  # (N,)


def pack_ternary(values: torch.Tensor) -> torch.Tensor:
    """Values in {-1, 0, 1} -> bytes, four 2-bit codes per byte (lowest bits first), flattened."""
    flat = (values.flatten().to(torch.int16) + 1).to(torch.uint8)  # {0, 1, 2}
    pad = (-flat.numel()) % 4
    if pad:
        flat = torch.cat([flat, flat.new_ones(pad)])  # code 1 = value 0
    q = flat.view(-1, 4)  # (N/4, 4)
    return q[:, 0] | (q[:, 1] << 2) | (q[:, 2] << 4) | (q[:, 3] << 6)


def unpack_ternary(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of ``pack_ternary``: int8 values in {-1, 0, 1}, flattened, ``numel`` long."""
    codes = torch.stack([(packed >> s) & 0x03 for s in (0, 2, 4, 6)], dim=1)  # (N/4, 4)
    return codes.flatten()[:numel].to(torch.int8) - 1


# --------------------------------------------------------------------------- quantizers (pure functions)


def quantize_per_channel_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 with one float32 scale per output row: ``w ~ q * scale[:, None]``."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp_min(_MIN_SCALE)  # (out,)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def quantize_groupwise_int4(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int4 in groups of ``group_size`` along each row: one float16 scale per group.

    Returns ``(q, scales)`` with ``q`` int8 in [-8, 7] of shape (out, in) and scales (out, in // group_size).
    """
    out_f, in_f = weight.shape
    w = weight.detach().float().view(out_f, in_f // group_size, group_size)  # (out, G, g)
    scales = (w.abs().amax(dim=2) / 7.0).clamp_min(_MIN_SCALE).half()  # (out, G)
    q = torch.round(w / scales.float()[..., None]).clamp(-8, 7).to(torch.int8)
    return q.view(out_f, in_f), scales


def quantize_groupwise_ternary(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """BitNet b1.58: ``w ~ t * scale`` with ``t`` in {-1, 0, 1} and scale the group's mean |w| (float16)."""
    out_f, in_f = weight.shape
    w = weight.detach().float().view(out_f, in_f // group_size, group_size)  # (out, G, g)
    scales = w.abs().mean(dim=2).clamp_min(_MIN_SCALE).half()  # (out, G)
    t = torch.round(w / scales.float()[..., None]).clamp(-1, 1).to(torch.int8)
    return t.view(out_f, in_f), scales


def dequantize_groupwise(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``q`` (out, in) times its group scales (out, G) -> a float weight (out, in)."""
    out_f, in_f = q.shape
    groups = scales.shape[1]
    w = q.view(out_f, groups, in_f // groups).to(dtype) * scales.to(dtype)[..., None]  # (out, G, g)
    return w.view(out_f, in_f)


def quantize_per_token_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic symmetric int8 per row of a 2-D activation: ``x ~ q * scale[:, None]``."""
    scale = (x.abs().amax(dim=1, keepdim=True) / 127.0).clamp_min(1e-8)  # (M, 1)
    q = torch.round(x / scale).clamp(-127, 127).to(torch.int8)
    return q, scale


def int8_matmul(a: torch.Tensor, b_t: torch.Tensor) -> torch.Tensor:
    """``a @ b_t.T`` for int8 ``a`` (M, K) and ``b_t`` (N, K), accumulated exactly in int32.

    ``torch._int_mm`` runs on CPU for any shape; on CUDA it needs M > 16 and K, N multiples
    of 8, so other shapes (decoding one token) take a float path, exact while K * 127^2 < 2^24.
    """
    m, k = a.shape
    n = b_t.shape[0]
    if a.device.type == "cpu" or (m > 16 and k % 8 == 0 and n % 8 == 0):
        return torch._int_mm(a, b_t.t())
    return (a.float() @ b_t.float().t()).round().to(torch.int32)


# --------------------------------------------------------------------------- layers


class _QuantLinear(nn.Module):
    """Shared shape bookkeeping; subclasses define the buffers and ``forward``."""

    format: str = ""

    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        if bias:
            self.register_buffer("bias", torch.zeros(out_features))
        else:
            self.bias = None

    def _add_bias(self, y: torch.Tensor) -> torch.Tensor:
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def rows(self, ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Rows ``ids`` (N,) of the dequantized weight, (N, in); every format defines it."""
        raise NotImplementedError

    def describe(self) -> dict:
        """What the loader needs to rebuild an empty layer of this format (goes into quantize.json)."""
        return {"format": self.format, "in_features": self.in_features, "out_features": self.out_features,
                "bias": self.bias is not None}

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, format={self.format}"


class _PerChannelInt8Linear(_QuantLinear):
    """int8 weights with a float32 scale per output row (the two int8 formats store the same tensors)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, **_) -> None:
        super().__init__(in_features, out_features, bias)
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(out_features))

    @classmethod
    def from_linear(cls, linear: nn.Linear, **_) -> _PerChannelInt8Linear:
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None)
        layer.to(linear.weight.device)
        layer.qweight, layer.scale = quantize_per_channel_int8(linear.weight)
        if linear.bias is not None:
            layer.bias = linear.bias.detach().float().clone()
        return layer

    def rows(self, ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Rows ``ids`` (N,) of the dequantized weight, (N, in): an embedding lookup reads only these."""
        return self.qweight[ids].to(dtype) * self.scale[ids].to(dtype)[:, None]


class Int8WeightOnlyLinear(_PerChannelInt8Linear):
    """int8 weights with a float32 scale per output channel; activations stay float.

    The scale is per output row, so it factors out of the matmul: ``y = (x @ q.T) * scale``.
    """

    format = "int8_weight_only"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.qweight.to(x.dtype)) * self.scale.to(x.dtype)
        return self._add_bias(y)


class Int8DynamicLinear(_PerChannelInt8Linear):
    """W8A8: int8 weights per output channel, activations quantized to int8 per token at run
    time, an int8 x int8 -> int32 matmul, then both scales applied. SmoothQuant layers use this
    format too (their smoothing is folded into the weights and the preceding norm)."""

    format = "int8_dynamic"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).float()  # (M, K)
        xq, x_scale = quantize_per_token_int8(x2)
        acc = int8_matmul(xq, self.qweight)  # (M, N) int32
        y = acc.float() * x_scale * self.scale  # per token x per channel
        return self._add_bias(y).to(x.dtype).view(*shape[:-1], self.out_features)


class _GroupwiseLinear(_QuantLinear):
    """Packed low-bit weights with a float16 scale per group of ``group_size`` inputs; the weight
    is dequantized to the activation dtype for each forward (size, not speed, is the point on CPU).
    Subclasses name their packing: values per byte, the byte of an all-zero weight, and the
    quantize/pack/unpack functions."""

    per_byte: int
    zero_byte: int
    _quantize: staticmethod
    _pack: staticmethod
    _unpack: staticmethod

    def __init__(self, in_features: int, out_features: int, bias: bool = False, group_size: int = 64, **_) -> None:
        super().__init__(in_features, out_features, bias)
        self.group_size = group_size
        n = out_features * in_features
        size = (n + self.per_byte - 1) // self.per_byte
        self.register_buffer("qweight", torch.full((size,), self.zero_byte, dtype=torch.uint8))
        self.register_buffer("scales", torch.ones(out_features, in_features // group_size, dtype=torch.float16))

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 64, **_) -> _GroupwiseLinear:
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, group_size)
        layer.to(linear.weight.device)
        q, layer.scales = cls._quantize(linear.weight, group_size)
        layer.qweight = cls._pack(q)
        if linear.bias is not None:
            layer.bias = linear.bias.detach().float().clone()
        return layer

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        q = self._unpack(self.qweight, self.out_features * self.in_features).view(self.out_features, self.in_features)
        return dequantize_groupwise(q, self.scales, dtype)

    def rows(self, ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Rows ``ids`` (N,) of the dequantized weight, (N, in): an embedding lookup reads only these.

        Rows are whole bytes (``in_features`` is a multiple of the group size, at least 8), so the
        flat packed buffer viewed as (out, in / per_byte) gathers them without unpacking the rest.
        """
        packed = self.qweight.view(self.out_features, -1)[ids]  # (N, in / per_byte)
        q = self._unpack(packed.flatten(), ids.numel() * self.in_features).view(-1, self.in_features)  # (N, in)
        return dequantize_groupwise(q, self.scales[ids], dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._add_bias(F.linear(x, self.dequantized_weight(x.dtype)))

    def describe(self) -> dict:
        return {**super().describe(), "group_size": self.group_size}


class Int4WeightOnlyLinear(_GroupwiseLinear):
    """Group-wise symmetric int4 weights, two per byte."""

    format = "int4_weight_only"
    per_byte, zero_byte = 2, 0
    _quantize = staticmethod(quantize_groupwise_int4)
    _pack = staticmethod(pack_int4)
    _unpack = staticmethod(unpack_int4)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The same numbers as unpacking then scaling, written nibble by nibble straight into the float
        weight and scaled in place: fewer passes over memory, which matters because every forward,
        each decoded token, pays it (int4 decoding 13% faster on the quickstart model, docs/BENCHMARKS.md)."""
        w = torch.empty(self.qweight.numel(), 2, dtype=dtype, device=self.qweight.device)  # (out * in / 2, 2)
        w[:, 0] = self.qweight & 0x0F  # low nibble first, as pack_int4 writes
        w[:, 1] = self.qweight >> 4
        w = w.view(self.out_features, -1, self.group_size)  # (out, G, g)
        w.sub_(8).mul_(self.scales.to(dtype)[..., None])
        return w.view(self.out_features, self.in_features)


class TernaryLinear(_GroupwiseLinear):
    """BitNet b1.58 weights: {-1, 0, 1}, four per byte, times a float16 absmean scale per group.
    Activations stay float (a ternary kernel would replace multiplies by adds; we have none)."""

    format = "ternary"
    per_byte, zero_byte = 4, 0x55  # 0x55: four zero weights
    _quantize = staticmethod(quantize_groupwise_ternary)
    _pack = staticmethod(pack_ternary)
    _unpack = staticmethod(unpack_ternary)


class TernaryQATLinear(nn.Linear):
    """A float Linear that computes with its ternarized weight (quantization-aware training).

    The straight-through estimator: the forward pass sees ``ternary(w)``, the backward pass
    treats the rounding as the identity, so the float ``w`` keeps learning. Parameter names
    are those of ``nn.Linear``, so training checkpoints and the optimizer see a plain model.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, group_size: int) -> None:
        super().__init__(in_features, out_features, bias=bias, device="meta")  # weights come from from_linear
        self.group_size = group_size

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int) -> TernaryQATLinear:
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, group_size)
        layer.weight, layer.bias = linear.weight, linear.bias
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        t, scales = quantize_groupwise_ternary(w, self.group_size)
        w_q = dequantize_groupwise(t, scales, w.dtype)
        w_ste = w + (w_q - w).detach()  # value of w_q, gradient of w
        return F.linear(x, w_ste, self.bias)

    def to_plain(self) -> nn.Linear:
        plain = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        plain.weight, plain.bias = self.weight, self.bias
        return plain


# Storage format (as written in quantize.json) -> layer class. The loader uses only this.
LAYER_FORMATS: dict[str, type[_QuantLinear]] = {
    "int8_weight_only": Int8WeightOnlyLinear,
    "int8_dynamic": Int8DynamicLinear,
    "int4_weight_only": Int4WeightOnlyLinear,
    "ternary": TernaryLinear,
}


# --------------------------------------------------------------------------- the token embedding


class QuantizedEmbedding(nn.Module):
    """A token embedding whose (vocab, dim) table is stored in one of the linear formats above.

    The table is a quantized linear with ``out_features = vocab`` and ``in_features = dim``: its
    rows are the embedding vectors, so int8 keeps one scale per token and int4 one per group of
    ``group_size`` values of a token (as GGUF stores a Q8_0 / Q4_0 ``token_embd``). A lookup
    dequantizes only the rows it gathers. When the model ties its output head to this embedding,
    the head *is* ``table`` (the same module under two names), so the vocabulary is quantized,
    stored and read once; safetensors keeps one copy of the shared tensors on disk.

    ``embed_scale`` is the constant some architectures multiply the lookup by (Gemma: sqrt(dim)).
    """

    format = "embedding"

    def __init__(self, table: _QuantLinear, embed_scale: float = 1.0) -> None:
        super().__init__()
        self.table = table
        self.num_embeddings, self.embedding_dim = table.out_features, table.in_features
        self.embed_scale = embed_scale

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, table_format: str, group_size: int = 64) -> QuantizedEmbedding:
        """Quantize a float embedding's table into ``LAYER_FORMATS[table_format]``."""
        as_linear = nn.Linear(embedding.embedding_dim, embedding.num_embeddings, bias=False, device="meta")
        as_linear.weight = embedding.weight  # (vocab, dim): the same layout as a linear's (out, in)
        table = LAYER_FORMATS[table_format].from_linear(as_linear, group_size=group_size)
        scale = getattr(embedding, "embed_scale", None)  # Gemma3TextScaledWordEmbedding's buffer
        return cls(table, 1.0 if scale is None else float(scale))

    @classmethod
    def empty(cls, info: dict) -> QuantizedEmbedding:
        """An embedding to load into, from what ``describe`` wrote.

        Raises:
            KeyError: The table's format is unknown.
        """
        t = info["table"]
        options = {"group_size": t["group_size"]} if "group_size" in t else {}
        table = LAYER_FORMATS[t["format"]](t["in_features"], t["out_features"], t["bias"], **options)
        return cls(table, info.get("embed_scale", 1.0))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = self.table.rows(input_ids.reshape(-1))  # (B*T, dim) float32
        if self.embed_scale != 1.0:
            rows = rows * self.embed_scale
        return rows.view(*input_ids.shape, self.embedding_dim)  # (B, T, dim)

    def describe(self) -> dict:
        return {"format": self.format, "table": self.table.describe(), "embed_scale": self.embed_scale}

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, table={self.table.format}"
