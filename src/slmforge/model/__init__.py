"""Models: Llama-architecture presets, size/compute/memory estimates, building
fresh models, and loading existing ones (local folder, quantized folder, hub id, GGUF file).

    from slmforge.model import estimate, build_model
    est = estimate(cfg.model, vocab_size=8192, seq_len=256, batch_size=16)
    model = build_model(cfg.model, vocab_size=8192, special_ids={"bos": 0, "eos": 1, "pad": 2})
    assert est.params == sum(p.numel() for p in model.parameters())
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from slmforge.config import ModelConfig
from slmforge.errors import ConfigError, ModelError

__all__ = [
    "PRESETS",
    "Architecture",
    "Estimate",
    "resolve_architecture",
    "estimate",
    "build_model",
    "load_causal_lm",
    "load_tokenizer_for",
    "save_model_folder",
    "read_profiles",
    "format_estimate",
    "pick_device",
    "stop_token_ids",
]


@dataclass(frozen=True)
class Architecture:
    """The numbers that decide a Llama model's size."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


# Sizes are for an 8,192-token vocabulary with tied embeddings; the embedding
# table is a large share of the small presets, as in every small LM.
PRESETS: dict[str, Architecture] = {
    "nano": Architecture(hidden_size=64, num_layers=6, num_heads=4, num_kv_heads=2, intermediate_size=192),
    "micro": Architecture(hidden_size=192, num_layers=8, num_heads=6, num_kv_heads=2, intermediate_size=512),
    "small": Architecture(hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=4, intermediate_size=1408),
    "base": Architecture(hidden_size=768, num_layers=12, num_heads=12, num_kv_heads=4, intermediate_size=2560),
}

_ACT = {"silu": "silu", "gelu": "gelu_pytorch_tanh", "relu": "relu"}
BYTES = {"fp32": 4.0, "bf16": 2.0, "int8": 1.0, "int4": 0.5}


def resolve_architecture(cfg: ModelConfig) -> Architecture:
    """The preset's numbers, with any key set in the config taking precedence."""
    base = PRESETS.get(cfg.preset)
    if base is None:  # custom: every size key must be given
        missing = [k for k in ("hidden_size", "num_layers", "num_heads", "intermediate_size") if getattr(cfg, k) is None]
        if missing:
            raise ConfigError(f"model.preset is custom, so model.{', model.'.join(missing)} must be set.")
        base = Architecture(cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads or cfg.num_heads,
                            cfg.intermediate_size)
    arch = Architecture(
        hidden_size=cfg.hidden_size or base.hidden_size,
        num_layers=cfg.num_layers or base.num_layers,
        num_heads=cfg.num_heads or base.num_heads,
        num_kv_heads=cfg.num_kv_heads or (cfg.num_heads if cfg.num_heads else base.num_kv_heads),
        intermediate_size=cfg.intermediate_size or base.intermediate_size,
    )
    if arch.hidden_size % arch.num_heads:
        raise ConfigError(
            f"model.hidden_size ({arch.hidden_size}) must be divisible by model.num_heads ({arch.num_heads})."
        )
    if arch.num_heads % arch.num_kv_heads:
        raise ConfigError(
            f"model.num_heads ({arch.num_heads}) must be a multiple of model.num_kv_heads ({arch.num_kv_heads})."
        )
    return arch


@dataclass
class Estimate:
    """Parameters, compute and memory of a model, before building it."""

    params: int
    embedding_params: int
    flops_per_token_forward: float
    flops_per_token_train: float
    weights_bytes: dict[str, float]  # per dtype: fp32, bf16, int8, int4
    train_bytes: dict[str, float]  # per precision: weights+grads+AdamW states, activations, total
    kv_cache_bytes: dict[str, float]  # per dtype, at seq_len x batch_size
    seq_len: int
    batch_size: int
    architecture: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def estimate(cfg: ModelConfig, vocab_size: int, seq_len: int = 256, batch_size: int = 1) -> Estimate:
    """Parameters, FLOPs per token and memory for a config, computed without building it.

    The parameter count is exact for the model ``build_model`` makes (tests check it).
    Activation memory follows Korthikanti et al. (2022) for a transformer layer without
    recomputation, plus the fp32 logits, which dominate for small models with large vocabularies.
    """
    a = resolve_architecture(cfg)
    h, L, i_size, v = a.hidden_size, a.num_layers, a.intermediate_size, vocab_size
    hd = a.head_dim
    attn = h * (a.num_heads * hd) * 2 + h * (a.num_kv_heads * hd) * 2  # q, o, k, v (no biases)
    mlp = 3 * h * i_size  # gate, up, down
    norms = 2 * h
    per_layer = attn + mlp + norms
    embedding = v * h * (1 if cfg.tie_embeddings else 2)
    params = L * per_layer + h + embedding
    non_embedding = L * (attn + mlp)
    # 2 FLOPs per multiply-add; attention scores and values: 2 * 2 * L * seq * (heads * hd) per token.
    fwd = 2 * non_embedding + 2 * h * v + 4 * L * seq_len * a.num_heads * hd
    weights = {k: params * b for k, b in BYTES.items()}
    tokens = seq_len * batch_size
    act16 = L * tokens * h * (34 + 5 * a.num_heads * seq_len / h)
    logits = tokens * v * 4 * 2  # fp32 logits and their gradient
    train = {}
    for prec, act in (("fp32", act16 * 2), ("bf16", act16)):
        states = params * (4 + 4 + 8)  # fp32 weights, grads, AdamW m and v
        train[prec] = {"weights_grads_optimizer": states, "activations": act + logits, "total": states + act + logits}
    kv = {k: 2 * L * a.num_kv_heads * hd * tokens * b for k, b in BYTES.items()}
    return Estimate(
        params=int(params),
        embedding_params=int(embedding),
        flops_per_token_forward=float(fwd),
        flops_per_token_train=float(3 * fwd),
        weights_bytes=weights,
        train_bytes=train,
        kv_cache_bytes=kv,
        seq_len=seq_len,
        batch_size=batch_size,
        architecture={**asdict(a), "head_dim": hd, "vocab_size": v, "tie_embeddings": cfg.tie_embeddings},
    )


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TB"


def format_estimate(e: Estimate) -> str:
    """A human-readable table of an estimate."""
    a = e.architecture
    lines = [
        f"architecture  hidden {a['hidden_size']}, layers {a['num_layers']}, heads {a['num_heads']} "
        f"(kv {a['num_kv_heads']}), mlp {a['intermediate_size']}, vocab {a['vocab_size']}",
        f"parameters    {e.params:,} ({e.embedding_params:,} in embeddings)",
        f"FLOPs/token   {e.flops_per_token_forward / 1e6:,.1f} M forward, {e.flops_per_token_train / 1e6:,.1f} M training"
        f" (at seq {e.seq_len})",
        "",
        f"{'memory':<34}{'fp32':>12}{'bf16':>12}{'int8':>12}{'int4':>12}",
        f"{'weights':<34}" + "".join(f"{_fmt_bytes(e.weights_bytes[k]):>12}" for k in BYTES),
        f"{f'KV cache (seq {e.seq_len} x batch {e.batch_size})':<34}"
        + "".join(f"{_fmt_bytes(e.kv_cache_bytes[k]):>12}" for k in BYTES),
        f"{'training: weights+grads+AdamW':<34}"
        + "".join(f"{_fmt_bytes(e.train_bytes[k]['weights_grads_optimizer']):>12}" for k in ("fp32", "bf16")),
        f"{f'training: activations (b={e.batch_size})':<34}"
        + "".join(f"{_fmt_bytes(e.train_bytes[k]['activations']):>12}" for k in ("fp32", "bf16")),
        f"{'training: total':<34}" + "".join(f"{_fmt_bytes(e.train_bytes[k]['total']):>12}" for k in ("fp32", "bf16")),
    ]
    return "\n".join(lines)


def build_model(cfg: ModelConfig, vocab_size: int, special_ids: dict[str, int] | None = None, seed: int = 0):
    """A freshly initialised ``LlamaForCausalLM`` for the config.

    Args:
        cfg: The ``model`` section.
        vocab_size: Rows of the embedding table (the tokenizer's ``len``).
        special_ids: ``bos``/``eos``/``pad`` token ids written into the model config.
        seed: Initialisation seed.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    a = resolve_architecture(cfg)
    ids = special_ids or {}
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=a.hidden_size,
        intermediate_size=a.intermediate_size,
        num_hidden_layers=a.num_layers,
        num_attention_heads=a.num_heads,
        num_key_value_heads=a.num_kv_heads,
        hidden_act=_ACT[cfg.activation],
        max_position_embeddings=cfg.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        tie_word_embeddings=cfg.tie_embeddings,
        bos_token_id=ids.get("bos"),
        eos_token_id=ids.get("eos"),
        pad_token_id=ids.get("pad"),
        attention_bias=False,
        mlp_bias=False,
        rms_norm_eps=1e-5,
        initializer_range=0.02,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    if cfg.norm == "layernorm":
        _swap_norms_for_layernorm(model)
    return model


def _swap_norms_for_layernorm(model) -> None:
    """Replace every RMSNorm with a LayerNorm without bias (same parameter count, so
    estimates hold). Note: llama.cpp and GGUF expect RMSNorm for the llama architecture."""
    import torch
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, LlamaRMSNorm):
                ln = torch.nn.LayerNorm(child.weight.shape[0], eps=1e-5, bias=False)
                setattr(module, child_name, ln)


def _is_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")


def load_causal_lm(spec: str | Path, dtype: str = "float32", four_bit: bool = False):
    """Load a causal LM and its tokenizer from a local folder, a ``.gguf`` file or a hub id.

    Args:
        spec: A folder with ``config.json``, a ``.gguf`` file (dequantised to ``dtype`` through
            transformers' GGUF loader, for the architectures it supports), or a hub id
            (``Qwen/Qwen2.5-0.5B-Instruct``; needs the network unless cached).
        dtype: ``float32`` or ``bfloat16``.
        four_bit: Load the weights as 4-bit NF4 on the GPU (bitsandbytes), for QLoRA.

    Returns:
        ``(model, tokenizer)``.

    Raises:
        ModelError: Nothing at that path, a hub id while offline, or a file transformers cannot read.
    """
    import torch

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from slmforge.model.quantized import is_quantized_folder, load_quantized

    extra: dict[str, Any] = {}
    if four_bit:
        from transformers import BitsAndBytesConfig

        extra = {
            "quantization_config": BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.bfloat16,
            ),
            "device_map": {"": 0},
        }

    path = Path(str(spec)).expanduser()
    try:
        if path.suffix == ".gguf":
            if not path.is_file():
                raise ModelError(f"GGUF file {path} does not exist.")
            from transformers import GgufConfig

            folder, name = str(path.parent), path.name
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
            model = AutoModelForCausalLM.from_pretrained(
                folder, gguf_file=name, dtype=torch_dtype,
                quantization_config=GgufConfig(gguf_file=name, dequantize=True),
            )
            return model, tokenizer
        if is_quantized_folder(path):  # written by `slmforge quantize`
            return load_quantized(path)
        if path.exists():
            if not (path / "config.json").is_file():
                raise ModelError(
                    f"{path} is not a model folder (no config.json). Point at the output of `slmforge train`, "
                    "a Hugging Face model folder, or a .gguf file."
                )
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, **extra)
            tokenizer = AutoTokenizer.from_pretrained(path)
            return model, tokenizer
        if str(spec).startswith((".", "/", "~")) or str(spec).count("/") > 1:
            raise ModelError(f"Model path {spec} does not exist.")
        if _is_offline():
            raise ModelError(
                f"{spec!r} is not a local path, and HF_HUB_OFFLINE is set, so it cannot be downloaded from the "
                "hub. Download it on a machine with network (`hf download " + str(spec) + " --local-dir DIR`) "
                "and pass DIR, or unset HF_HUB_OFFLINE."
            )
        model = AutoModelForCausalLM.from_pretrained(str(spec), dtype=torch_dtype, **extra)
        tokenizer = AutoTokenizer.from_pretrained(str(spec))
        return model, tokenizer
    except ModelError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelError(f"Could not load the model {spec}: {type(exc).__name__}: {str(exc)[:400]}") from None


def load_tokenizer_for(path: str | Path):
    """The tokenizer saved in a model or tokenizer folder."""
    from slmforge.tokenizer import load_tokenizer

    return load_tokenizer(path)


def save_model_folder(model, tokenizer, folder: Path, profiles: dict[str, Any] | None = None,
                      default_profile: str | None = None) -> None:
    """Save a model as a Hugging Face folder: weights (safetensors), config, tokenizer
    with its chat template, and ``generation_config.json`` carrying the sampling profiles.

    The profiles sit under the ``slmforge_profiles`` key; the default profile's values
    are also the file's top-level defaults, so plain ``model.generate`` uses them.
    """
    from transformers import GenerationConfig
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # its "Writing model shards" bar duplicates ours
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    gen = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=stop_token_ids(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
    )
    if profiles:
        plain = {k: (v.model_dump(mode="json") if hasattr(v, "model_dump") else dict(v)) for k, v in profiles.items()}
        gen.slmforge_profiles = plain
        gen.slmforge_default_profile = default_profile
        default = plain.get(default_profile or "", {})
        if default:
            gen.max_new_tokens = default["max_new_tokens"]
            gen.repetition_penalty = default["repetition_penalty"]
            if default["temperature"] > 0:
                gen.do_sample = True
                gen.temperature = default["temperature"]
                gen.top_k = default["top_k"] if default["top_k"] is not None else 0
                gen.top_p = default["top_p"] if default["top_p"] is not None else 1.0
    gen.save_pretrained(folder)


def read_profiles(folder: str | Path) -> tuple[dict[str, dict[str, Any]], str | None]:
    """The sampling profiles saved in a model folder's ``generation_config.json``
    (``{}``, None when there are none)."""
    file = Path(folder) / "generation_config.json"
    if not file.is_file():
        return {}, None
    data = json.loads(file.read_text())
    return data.get("slmforge_profiles") or {}, data.get("slmforge_default_profile")


def stop_token_ids(tokenizer) -> list[int] | int | None:
    """End-of-document and end-of-turn ids: generation stops at either.

    Every engine stops at these and ``save_model_folder`` writes them as the
    ``eos_token_id`` of ``generation_config.json``, so one list serves both.

    Returns:
        A list when there are several, the single id when there is one, None when there are none
        (the shapes ``GenerationConfig.eos_token_id`` takes).
    """
    ids = []
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    for token in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>"):
        tid = tokenizer.convert_tokens_to_ids(token)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid not in ids and tid >= 0:
            if tokenizer.convert_ids_to_tokens(tid) == token:
                ids.append(tid)
    return ids if len(ids) > 1 else (ids[0] if ids else None)


def pick_device(name: str) -> str:
    """The torch device for a ``device`` setting, one rule for training, compression and generation.

    Args:
        name: ``auto`` (CUDA when present, else CPU), ``cpu``, ``cuda`` or ``cuda:N``.

    Returns:
        ``cpu``, or ``cuda``/``cuda:N`` (``auto`` becomes ``cuda`` on a machine with a CUDA GPU).

    Raises:
        ConfigError: CUDA was asked for on a machine without it, or the name is unknown; asking for
            a GPU that is not there fails here, before minutes of loading, not at the first tensor.
    """
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} was asked for, but no CUDA GPU is available; use --device cpu.")
    if name != "cpu" and not name.startswith("cuda"):
        raise ConfigError(f"Unknown device {name!r}; use auto, cpu, cuda or cuda:N.")
    return name
