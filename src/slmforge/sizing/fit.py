"""Does a model fit, and how fast will it decode: rules over a ``Hardware`` description.

Memory, per precision (``slmforge.model.BYTES``: fp32 4, bf16 2, int8 1, int4 0.5 bytes a weight):

- inference: weights + KV cache at ``context`` tokens (bf16) + ``RUNTIME_OVERHEAD``;
- full fine-tuning (AdamW, mixed precision): 16 bytes a parameter (fp32 weights, gradients, two moments)
  + activations at ``train_seq`` tokens;
- LoRA: bf16 base weights + adapters (``LORA_SHARE`` of the parameters, trained with 16 bytes each) +
  activations;
- QLoRA: int4 base weights (with block scales: 4.5 bits) + adapters + activations; bitsandbytes needs a
  CUDA GPU, so it never fits a machine without one.

Activations follow Korthikanti et al. (2022) without recomputation (34 bytes per hidden unit per token
per layer in bf16), plus fp32 logits and their gradient. A model fits the best device that holds it: a GPU
by its memory, else the CPU by the RAM available now.

Decode speed on CPU at batch 1 reads every weight once per token, so tokens/s is at most bandwidth ÷
(weights + KV cache read per token); ``predict_decode`` gives that bound, ``measured_check`` compares it
with a real decode here.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from slmforge.errors import ModelError
from slmforge.sizing.hardware import Hardware

GB = 1024**3
RUNTIME_OVERHEAD = 0.5 * GB  # the interpreter, the runtime, buffers
LORA_SHARE = 0.01  # adapter parameters as a share of the model's (rank 8-16 on attention and MLP)
INT4_BYTES = 4.5 / 8  # 4-bit weights with one fp16 scale per 32: what NF4/Q4 files hold
PRECISIONS = ("fp32", "bf16", "int8", "int4")


@dataclass
class ModelShape:
    """What the rules need to know about a model."""

    name: str
    params: int
    layers: int
    hidden: int
    kv_heads: int
    head_dim: int
    vocab: int
    source: str  # "preset", "folder", "gguf"

    def weight_bytes(self, precision: str) -> float:
        from slmforge.model import BYTES

        return self.params * (INT4_BYTES if precision == "int4" else BYTES[precision])

    def kv_bytes(self, tokens: int) -> float:
        return 2 * self.layers * self.kv_heads * self.head_dim * tokens * 2  # keys and values, bf16

    def activation_bytes(self, tokens: int) -> float:
        return self.layers * tokens * self.hidden * 34 + tokens * self.vocab * 4 * 2


def preset_shape(preset: str, vocab: int = 8192) -> ModelShape:
    """A built-in preset (``slmforge.model.PRESETS``) at a vocabulary size."""
    from slmforge.config import ModelConfig
    from slmforge.model import estimate, resolve_architecture

    cfg = ModelConfig(preset=preset)
    a = resolve_architecture(cfg)
    return ModelShape(preset, estimate(cfg, vocab).params, a.num_layers, a.hidden_size, a.num_kv_heads, a.head_dim,
                      vocab, "preset")


def model_shape(ref: str | Path) -> ModelShape:
    """A model folder (config.json + safetensors, counted from the tensor headers) or a .gguf file.

    Raises:
        ModelError: Neither, or a file that cannot be read.
    """
    path = Path(ref).expanduser()
    if path.suffix == ".gguf":
        from slmforge.model.gguf import read_gguf_info

        info = read_gguf_info(path)
        m, arch = info.metadata, info.architecture
        hidden = int(m.get(f"{arch}.embedding_length", 0))
        heads = int(m.get(f"{arch}.attention.head_count", 1) or 1)
        head_dim = int(m.get(f"{arch}.attention.key_length", hidden // heads if heads else 0))
        return ModelShape(path.name, info.params, int(m.get(f"{arch}.block_count", 0)), hidden,
                          int(m.get(f"{arch}.attention.head_count_kv", heads)), head_dim,
                          int(m.get(f"{arch}.vocab_size", 0) or 0) or _gguf_vocab(path), "gguf")
    config = path / "config.json"
    if not config.is_file():
        raise ModelError(f"{path} is neither a model folder (no config.json) nor a .gguf file.")
    c = json.loads(config.read_text())
    c = c.get("text_config", c)
    heads = int(c.get("num_attention_heads", 1))
    hidden = int(c.get("hidden_size", 0))
    return ModelShape(path.name, _safetensors_params(path), int(c.get("num_hidden_layers", 0)), hidden,
                      int(c.get("num_key_value_heads", heads)), int(c.get("head_dim") or hidden // max(heads, 1)),
                      int(c.get("vocab_size", 0)), "folder")


def _gguf_vocab(path: Path) -> int:
    """The vocabulary size from the token embedding's shape (GGUF files seldom store it as a key)."""
    import gguf

    for tensor in gguf.GGUFReader(str(path)).tensors:
        if tensor.name == "token_embd.weight":
            return int(max(tensor.shape))
    return 0


def _safetensors_params(folder: Path) -> int:
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelError(f"{folder} has no .safetensors weights to count.")
    total = 0
    for file in files:
        with safe_open(str(file), "np") as f:
            for key in f.keys():
                total += math.prod(f.get_slice(key).get_shape())
    return total


@dataclass
class Fit:
    """Where a model fits: for inference per weight precision, and for three ways of training it. A device
    is "gpu:NAME", "cpu", or None (it does not fit)."""

    model: str
    params: int
    context: int
    inference: dict[str, dict[str, Any]]  # precision -> {"bytes", "device", "decode_tokens_per_s"}
    training: dict[str, dict[str, Any]]  # "full", "lora", "qlora" -> {"bytes", "device"}


def _device(hw: Hardware, need: float, cuda_only: bool = False) -> str | None:
    for gpu in hw.gpus:
        if (gpu.kind == "cuda" or not cuda_only) and need <= gpu.memory_bytes * 0.9:
            return f"gpu:{gpu.name}"
    if not cuda_only and need <= hw.ram_available_bytes:
        return "cpu"
    return None


def fit(shape: ModelShape, hw: Hardware, context: int = 2048, train_seq: int = 512, train_batch: int = 4) -> Fit:
    """Where ``shape`` fits on ``hw``: inference at each precision (with the CPU decode bound), training
    full, LoRA and QLoRA at ``train_seq`` x ``train_batch`` tokens a step."""
    inference = {}
    for precision in PRECISIONS:
        need = shape.weight_bytes(precision) + shape.kv_bytes(context) + RUNTIME_OVERHEAD
        inference[precision] = {"bytes": need, "device": _device(hw, need),
                                "decode_tokens_per_s": predict_decode(shape, hw, precision, context)}
    acts = shape.activation_bytes(train_seq * train_batch)
    adapters = shape.params * LORA_SHARE * 16
    needs = {"full": shape.params * 16 + acts, "lora": shape.weight_bytes("bf16") + adapters + acts,
             "qlora": shape.weight_bytes("int4") + adapters + acts}
    training = {k: {"bytes": v + RUNTIME_OVERHEAD, "device": _device(hw, v + RUNTIME_OVERHEAD, cuda_only=k == "qlora")}
                for k, v in needs.items()}
    return Fit(shape.name, shape.params, context, inference, training)


def predict_decode(shape: ModelShape, hw: Hardware, precision: str, context: int = 2048) -> float | None:
    """Tokens/s at batch 1 on CPU as bandwidth ÷ bytes read per token (weights + the KV cache at half the
    context, its mean length); None without a measured bandwidth."""
    if not hw.bandwidth_gbs:
        return None
    return hw.bandwidth_gbs * 1e9 / (shape.weight_bytes(precision) + shape.kv_bytes(context // 2))


def measured_check(hw: Hardware, preset: str = "base", tokens: int = 32) -> dict[str, Any]:
    """Decode ``tokens`` greedily with a random ``preset`` model in torch (fp32, batch 1) and compare the
    tokens/s with ``predict_decode``'s bound: the share of the bound reached."""
    import torch

    from slmforge.config import ModelConfig
    from slmforge.model import build_model

    shape = preset_shape(preset)
    model = build_model(ModelConfig(preset=preset), vocab_size=shape.vocab, special_ids={"bos": 1, "eos": 2, "pad": 0},
                        seed=0).eval()
    ids = torch.tensor([[1, 5, 6, 7, 8]])
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)  # warm up
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=0)
        measured = tokens / (time.perf_counter() - t0)
    predicted = predict_decode(shape, hw, "fp32", context=2 * (tokens + 5))
    return {"preset": preset, "params": shape.params, "measured_tokens_per_s": measured,
            "predicted_tokens_per_s": predicted,
            "share_of_bound": measured / predicted if predicted else None}


def fit_table(fits: list[Fit]) -> str:
    """Fits as a markdown table: one row per model."""
    def where(entry: dict[str, Any]) -> str:
        gb = entry["bytes"] / GB
        return f"{gb:.2f} GB, {entry['device']}" if entry["device"] else f"no ({gb:.2f} GB)"

    head = " | ".join(f"{p} inference" for p in PRECISIONS)
    lines = [f"| model | params | {head} | full FT | LoRA | QLoRA | decode tok/s bf16 / int4 (CPU bound) |",
             "|---|---:|" + "---|" * (len(PRECISIONS) + 3) + "---:|"]
    for f in fits:
        speeds = [f.inference[p]["decode_tokens_per_s"] for p in ("bf16", "int4")]
        tps = " / ".join(f"{s:.0f}" for s in speeds) if all(speeds) else "-"
        cells = " | ".join(where(f.inference[p]) for p in PRECISIONS)
        lines.append(f"| {f.model} | {f.params / 1e6:,.1f}M | {cells} | {where(f.training['full'])} | "
                     f"{where(f.training['lora'])} | {where(f.training['qlora'])} | {tps} |")
    return "\n".join(lines)


def as_dicts(fits: list[Fit]) -> list[dict[str, Any]]:
    return [asdict(f) for f in fits]
