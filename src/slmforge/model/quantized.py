"""The quantized model folder: a small, pickle-free format that rebuilds the model.

It lives in the model layer, not in compress/, because loading a model must know every
folder format (``load_causal_lm`` opens a quantized folder like any other) while the model
layer may not import the stages above it; compress/ writes these folders and re-exports
``save_quantized`` and ``load_quantized``.

    config.json, generation_config.json, tokenizer files   as in any Hugging Face folder
    quantized.safetensors                                  every tensor of the model's state dict:
                                                           float tensors as they were, and for each
                                                           quantized linear its qweight/scale(s)
    quantize.json                                          {"format": "slmforge.quantized/1",
                                                            "layers": {name: {format, shapes, ...}}}

A layer entry is a quantized linear (``format`` a key of ``LAYER_FORMATS``), a quantized token
embedding (``format: embedding`` with its ``table``, a linear description), or an output head
tied to that embedding (``format: tied``, ``tied_to``: the embedding's name), which shares the
embedding's table and has no tensors of its own. Folders written before embeddings were
quantized have linear entries only; their embedding and head are float tensors, loaded and
tied as in any Hugging Face folder.

``load_quantized`` builds the architecture from config.json, swaps in an empty
layer of the recorded format for each quantized linear, and loads the tensors
strictly: any missing or unexpected tensor is an error, never a silent default.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from slmforge.errors import ModelError

FORMAT = "slmforge.quantized/1"
WEIGHTS_FILE = "quantized.safetensors"
META_FILE = "quantize.json"
TIED = "tied"  # quantize.json format of an output head that is its quantized embedding's table


def save_quantized(model, tokenizer, folder: Path, layers: dict[str, dict[str, Any]], extra: dict | None = None) -> Path:
    """Write a quantized model folder (see the module docstring); returns the weights file.

    Args:
        model: The model with its quantized layers in place (on any device).
        tokenizer: Saved beside it.
        folder: Created if missing.
        layers: Module name -> ``layer.describe()`` plus the method that made it.
        extra: More keys for quantize.json (method, group size, parent).
    """
    from safetensors.torch import save_model

    folder.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    weights = folder / WEIGHTS_FILE
    # save_model drops the second name of tied tensors (embedding / lm_head); load_model restores it.
    save_model(model, str(weights), metadata={"format": FORMAT})
    meta = {"format": FORMAT, "weights": WEIGHTS_FILE, **(extra or {}), "layers": layers}
    (folder / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")
    return weights


def is_quantized_folder(path: str | Path) -> bool:
    return (Path(path) / META_FILE).is_file()


def load_quantized(path: str | Path, device: str = "cpu"):
    """Rebuild a model written by ``slmforge quantize`` (or ``save_quantized``).

    Args:
        path: The quantized model folder.
        device: Where to put it (``cpu``, ``cuda``).

    Returns:
        ``(model, tokenizer)``, the model in eval mode.

    Raises:
        ModelError: Not a quantized folder, an unknown format, or tensors that do not fit.
    """
    import torch
    from safetensors.torch import load_model
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from slmforge.model.quant_layers import QuantizedEmbedding

    folder = Path(path).expanduser()
    meta_file = folder / META_FILE
    if not meta_file.is_file():
        raise ModelError(
            f"{folder} is not a quantized model folder (no {META_FILE}). Point at the output of `slmforge quantize`."
        )
    meta = json.loads(meta_file.read_text())
    if meta.get("format") != FORMAT:
        raise ModelError(f"{meta_file} has format {meta.get('format')!r}; this slmforge reads {FORMAT!r}.")
    try:
        config = AutoConfig.from_pretrained(folder)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"Could not build the architecture of {folder}: {type(exc).__name__}: {exc}") from None
    layers = meta["layers"]
    for name in sorted(layers, key=lambda n: layers[n].get("format") == TIED):  # tied heads after their embedding
        try:
            model.get_submodule(name)
        except AttributeError:
            raise ModelError(f"{meta_file} names layer {name}, which the architecture in config.json lacks.") from None
        model.set_submodule(name, _empty_layer(model, name, layers[name], meta_file))
    try:
        load_model(model, str(folder / meta.get("weights", WEIGHTS_FILE)), strict=True)
    except (RuntimeError, OSError) as exc:
        raise ModelError(f"The tensors in {folder} do not fit the model it describes: {str(exc)[:400]}") from None
    if not any(info.get("format") == QuantizedEmbedding.format for info in layers.values()):
        model.tie_weights()  # a float embedding and head (folders of every version); a quantized pair shares its table
    if (folder / "generation_config.json").is_file():  # as from_pretrained does: `generate` keeps the folder's defaults
        model.generation_config = GenerationConfig.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return model.to(device).eval(), tokenizer


def _empty_layer(model, name: str, info: dict[str, Any], meta_file: Path):
    """The module to load ``name``'s tensors into: a quantized linear, a quantized embedding, or, for
    a head tied to a quantized embedding, that embedding's table itself (already built)."""
    from slmforge.model.quant_layers import LAYER_FORMATS, QuantizedEmbedding

    fmt = info.get("format")
    known = f"known formats: {', '.join([*LAYER_FORMATS, QuantizedEmbedding.format, TIED])}"
    if fmt == TIED:
        try:
            source = model.get_submodule(info.get("tied_to", ""))
        except AttributeError:
            source = None
        if not isinstance(source, QuantizedEmbedding):
            raise ModelError(f"{meta_file}: layer {name} is tied to {info['tied_to']!r}, which is not a quantized embedding.")
        return source.table
    if fmt == QuantizedEmbedding.format:
        try:
            return QuantizedEmbedding.empty(info)
        except KeyError as exc:
            raise ModelError(f"{meta_file}: embedding {name} has an unknown or incomplete table ({exc}); {known}.") from None
    cls = LAYER_FORMATS.get(fmt)  # type: ignore[arg-type]
    if cls is None:
        raise ModelError(f"{meta_file}: layer {name} has format {fmt!r}; {known}.")
    options = {"group_size": info["group_size"]} if "group_size" in info else {}
    return cls(info["in_features"], info["out_features"], info["bias"], **options)
