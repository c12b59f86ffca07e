"""Methods by name: which layer format each becomes, and the model-wide step (calibrated
smoothing, quantization-aware training) some need first. One dict, ``METHODS``."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slmforge.config import LoopConfig, ProjectConfig
from slmforge.errors import ConfigError, ModelError

NONE = "none"  # plan value: keep the layer in float
_CALIBRATION_POOL_TOKENS = 1 << 22  # calibration draws from the training split's first 4 M tokens (or more)


@dataclass
class Inputs:
    """What a model-wide step needs besides the model: the project and where to work."""

    cfg: ProjectConfig
    tokenizer: Any
    data_dir: Path
    work_dir: Path
    run_key: dict[str, Any]
    progress: bool = True
    log: Callable[[str], None] | None = None
    loop_log: list[dict[str, Any]] = field(default_factory=list)  # the QAT loss curve, when there was one


@dataclass(frozen=True)
class Method:
    """How a method is done. Built with keyword arguments in ``METHODS``, so an entry reads as what it is."""

    layer: str  # key of model.quant_layers.LAYER_FORMATS: what each chosen Linear becomes
    # the LAYER_FORMATS key of the token embedding's table and the output head under quantize.embeddings=auto;
    # None keeps them float. Always weight-only: an embedding is a lookup, and the head's logits are the
    # model's most sensitive output.
    embedding: str | None
    one_shot: bool  # converts a layer on its own, from its weights alone (usable for per-layer sensitivity)
    prepare: Callable[[Any, list[str], Inputs], dict[str, Any]] | None = None  # runs once, before any layer is converted
    grouped: bool = False  # the layer format keeps a scale per quantize.group_size inputs (which must divide them)
    # settings the method reads besides quantize.* (added to the artifact's config, so changing them re-runs it)
    plan: Callable[[ProjectConfig], dict[str, Any]] | None = None


def _prepare_smoothquant(model, names: list[str], inputs: Inputs) -> dict[str, Any]:
    """Calibrate per-channel activation maxima on domain text, then migrate them into the weights."""
    import torch

    from slmforge.compress._smooth import find_smoothing_groups, input_absmax, smooth

    chosen = set(names)
    groups = [g for g in find_smoothing_groups(model) if chosen & set(g.linears)]
    batches = calibration_batches(inputs)
    if inputs.log:
        log_n = sum(len(b) for b in batches)
        inputs.log(f"quantize: calibrating {len(groups)} smoothing groups on {log_n} sequences")
    act_max = input_absmax(model, batches, [n for g in groups for n in g.linears])
    probe = batches[0][:2].to(next(model.parameters()).device)
    model.eval()
    with torch.no_grad():
        before = model(input_ids=probe).logits.float()
        stats = smooth(model, groups, act_max, inputs.cfg.quantize.smoothquant_alpha)
        after = model(input_ids=probe).logits.float()
    drift = float((after - before).abs().max() / before.abs().max().clamp_min(1e-8))
    if drift > 1e-3:
        raise ModelError(
            f"SmoothQuant changed the float model's output (relative drift {drift:.2e}); its norms are probably not "
            "a plain per-channel scale (Gemma-style 1 + weight). Use quantize.method int8_dynamic for this model."
        )
    stats["smoothing_float_drift"] = drift
    stats["calibration_sequences"] = sum(len(b) for b in batches)
    return stats


def calibration_batches(inputs: Inputs, batch_size: int = 8) -> list:
    """``quantize.calibration_samples`` sequences of domain text, drawn (seeded) from the sequences of the
    training split's first 4 M tokens (or 4 x the samples' tokens, when more): only those are read and
    tokenized, so a split larger than memory costs what a small one does; a smaller split gives the same
    draw as reading all of it."""
    import numpy as np

    from slmforge.errors import ArtifactError
    from slmforge.tokenizer.packing import PackedTokens, jsonl_texts, tokenize_documents

    cfg = inputs.cfg
    seq_len = min(cfg.train.seq_len, 512)
    pool = max(_CALIBRATION_POOL_TOKENS, 4 * cfg.quantize.calibration_samples * seq_len)
    texts = jsonl_texts(inputs.data_dir / "text" / "train.jsonl")
    chunks = PackedTokens(tokenize_documents(texts, inputs.tokenizer, max_tokens=pool)[:pool], seq_len)
    if len(chunks) == 0:
        raise ArtifactError(
            f"{inputs.data_dir / 'text' / 'train.jsonl'} has no sequence of {seq_len} tokens to calibrate on; "
            "run `slmforge data` with text in data.formats."
        )
    n = min(cfg.quantize.calibration_samples, len(chunks))
    picked = np.random.default_rng(cfg.project.seed).choice(len(chunks), size=n, replace=False).tolist()
    return [chunks.batch(picked[i : i + batch_size])["input_ids"] for i in range(0, n, batch_size)]


def qat_loop_config(cfg: ProjectConfig) -> LoopConfig:
    """The training loop settings of the ternary fine-tune: the pretraining ones, for
    ``quantize.ternary_steps`` steps, evaluated and checkpointed at the end."""
    steps = cfg.quantize.ternary_steps
    values = {k: getattr(cfg.train, k) for k in LoopConfig.model_fields}
    values.update(max_steps=steps, warmup_steps=min(cfg.train.warmup_steps, steps // 10), eval_every=steps,
                  save_every=min(cfg.train.save_every, steps), max_minutes=None, compile=False)
    return LoopConfig(**values)


def _plan_ternary(cfg: ProjectConfig) -> dict[str, Any]:
    return {"qat_loop": qat_loop_config(cfg).model_dump(mode="json")}


def _prepare_ternary(model, names: list[str], inputs: Inputs) -> dict[str, Any]:
    """BitNet b1.58-style quantization-aware fine-tune on the text split with the one training loop."""
    from slmforge.errors import ArtifactError
    from slmforge.model.quant_layers import TernaryQATLinear
    from slmforge.tokenizer.packing import PackedTokens, jsonl_texts, tokenize_documents
    from slmforge.train import run_loop

    cfg = inputs.cfg
    loop = qat_loop_config(cfg)
    device = next(model.parameters()).device
    for name in names:
        model.set_submodule(name, TernaryQATLinear.from_linear(model.get_submodule(name), cfg.quantize.group_size))
    cache = inputs.work_dir / "cache"
    # The whole training split, from the token cache (memory-mapped: it does not grow with the corpus).
    train_texts = jsonl_texts(inputs.data_dir / "text" / "train.jsonl")
    val_texts = jsonl_texts(inputs.data_dir / "text" / "val.jsonl")
    train_src = PackedTokens(tokenize_documents(train_texts, inputs.tokenizer, cache), loop.seq_len)
    if len(train_src) == 0:
        raise ArtifactError(
            f"{inputs.data_dir / 'text' / 'train.jsonl'} has no sequence of train.seq_len={loop.seq_len} tokens "
            "for the ternary fine-tune; run `slmforge data` with text in data.formats, or lower train.seq_len."
        )
    val_stream = tokenize_documents(val_texts, inputs.tokenizer, cache)
    val_src = PackedTokens(val_stream, loop.seq_len) if len(val_stream) >= loop.seq_len else None
    res = run_loop(model, train_src, val_src, loop, inputs.work_dir, cfg.project.seed, inputs.run_key,
                   "ternary QAT", inputs.progress, inputs.log)
    model.to(device)
    inputs.loop_log = res.log
    metrics = {"qat_steps": res.steps, "qat_train_loss": round(res.final_loss, 5), "qat_seconds": round(res.seconds, 2)}
    if res.val_loss is not None:
        metrics["qat_val_loss"] = round(res.val_loss, 5)
    return metrics


# Method name (quantize.method and the values of quantize.plan) -> how it is done.
# Model-wide steps run in this order. quantize.method's Literal in config.py lists the same names
# (tests/test_tables.py keeps them equal).
METHODS: dict[str, Method] = {
    "int8_weight_only": Method(layer="int8_weight_only", embedding="int8_weight_only", one_shot=True),
    "int8_dynamic": Method(layer="int8_dynamic", embedding="int8_weight_only", one_shot=True),
    "int4_weight_only": Method(layer="int4_weight_only", embedding="int4_weight_only", one_shot=True, grouped=True),
    "smoothquant": Method(layer="int8_dynamic", embedding="int8_weight_only", one_shot=False,
                          prepare=_prepare_smoothquant),
    # ternary embeddings without training them would wreck the model; they stay float unless asked for
    "ternary": Method(layer="ternary", embedding=None, one_shot=False, prepare=_prepare_ternary, grouped=True,
                      plan=_plan_ternary),
}


def quantizable_linears(model) -> list[str]:
    """Every ``nn.Linear`` except the output head, in module order.

    The head is not a plan entry: in our models it is tied to the input embedding (one tensor
    for both), so it follows ``quantize.embeddings`` with the embedding (``convert_embeddings``).
    """
    from torch import nn

    head = model.get_output_embeddings()
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head]


def assign_methods(model, default: str, plan: dict[str, str], group_size: int) -> dict[str, str]:
    """Module name -> method (or ``none``) for every quantizable linear.

    A plan key is a module name or a prefix of names (``model.layers.0`` covers that block);
    the longest matching key wins, and layers no key matches get ``default``.

    Raises:
        ConfigError: A plan key that matches no layer, an unknown method, or a group size that does
            not divide a layer's inputs.
    """
    names = quantizable_linears(model)
    allowed = [*METHODS, NONE]
    for key, method in plan.items():
        if method not in allowed:
            raise ConfigError(f"quantize.plan[{key!r}] = {method!r} is not a method; choose one of: {', '.join(allowed)}.")
        if not any(n == key or n.startswith(key + ".") for n in names):
            raise ConfigError(
                f"quantize.plan key {key!r} matches no quantizable layer; layers are named like {names[0]!r} "
                f"({len(names)} in all; the embedding and output head follow quantize.embeddings)."
            )
    out = {}
    for n in names:
        keys = [k for k in plan if n == k or n.startswith(k + ".")]
        out[n] = plan[max(keys, key=len)] if keys else default
    grouped = [n for n, m in out.items() if m != NONE and METHODS[m].grouped]
    widths = {model.get_submodule(n).in_features for n in grouped}
    bad = sorted(w for w in widths if w % group_size)
    if bad:
        raise ConfigError(
            f"quantize.group_size={group_size} does not divide the input width {bad[0]} of some layers; "
            f"use a divisor of {math.gcd(*widths)}, the largest group every layer allows."
        )
    return out


def convert(model, methods: dict[str, str], group_size: int) -> dict[str, dict[str, Any]]:
    """Swap each linear for its method's quantized layer, in place; returns what quantize.json records."""
    from slmforge.model.quant_layers import LAYER_FORMATS

    layers = {}
    for name, method in methods.items():
        if method == NONE:
            continue
        cls = LAYER_FORMATS[METHODS[method].layer]
        layer = cls.from_linear(model.get_submodule(name), group_size=group_size)
        model.set_submodule(name, layer)
        layers[name] = {"method": method, **layer.describe()}
    return layers


def embedding_format(model, method: str, setting: str, group_size: int) -> str | None:
    """The layer format of the token embedding and output head (``None``: float) for ``quantize.embeddings``.

    Raises:
        ConfigError: A group size that does not divide the embedding width, or an embedding that is
            not a plain ``nn.Embedding``.
    """
    from torch import nn

    fmt = METHODS[method].embedding if setting == "auto" else None if setting == NONE else METHODS[setting].layer
    if fmt is None:
        return None
    emb = model.get_input_embeddings()
    if not isinstance(emb, nn.Embedding):
        raise ConfigError(f"The model's input embedding is a {type(emb).__name__}, not an nn.Embedding; set "
                          "quantize.embeddings=none to keep it float.")
    if any(m.grouped and m.layer == fmt for m in METHODS.values()) and emb.embedding_dim % group_size:
        raise ConfigError(
            f"quantize.group_size={group_size} does not divide the embedding width {emb.embedding_dim}; use a divisor "
            f"of it, or quantize.embeddings=int8_weight_only (one scale per token, no groups)."
        )
    return fmt


def convert_embeddings(model, fmt: str, group_size: int) -> dict[str, dict[str, Any]]:
    """Quantize the token embedding and the output head to ``fmt``, in place; returns their quantize.json entries.

    A head tied to the embedding (the same weight tensor) becomes the embedding's quantized table
    itself: quantized once, stored once, so lookups and logits use the same numbers. An untied
    head is quantized as a linear of the same format.
    """
    from slmforge.model.quant_layers import LAYER_FORMATS, QuantizedEmbedding
    from slmforge.model.quantized import TIED

    names = {id(m): n for n, m in model.named_modules()}
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is not None and head.bias is None and head.weight is emb.weight
    quantized = QuantizedEmbedding.from_embedding(emb, fmt, group_size)
    model.set_submodule(names[id(emb)], quantized)
    layers = {names[id(emb)]: {"method": fmt, **quantized.describe()}}
    if head is None:
        return layers
    layer = quantized.table if tied else LAYER_FORMATS[fmt].from_linear(head, group_size=group_size)
    model.set_submodule(names[id(head)], layer)
    layers[names[id(head)]] = {"method": fmt, **({"format": TIED, "tied_to": names[id(emb)]} if tied else layer.describe())}
    return layers
