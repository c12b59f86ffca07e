"""GGUF export: a Hugging Face model folder -> one ``.gguf`` file llama.cpp (and Ollama) load.

Our own converter on ``gguf.GGUFWriter``: llama.cpp's ``convert_hf_to_gguf.py`` is
not packaged, and it rejects freshly trained tokenizers ("BPE pre-tokenizer was
not recognized"). Covered:

- **llama** (``LlamaForCausalLM``): what ``slmforge train`` makes. q/k weights are
  permuted into llama.cpp's rotary layout (the KV-head count for k); tied
  embeddings write no ``output.weight`` (llama.cpp then reuses ``token_embd``).
  Tokenizer: byte-level BPE with the GPT-2 pre-tokenizer (``tokenizer.ggml.model
  = gpt2``, ``pre = gpt-2``), which is what ``slmforge tokenizer`` trains.
- **gemma3** (``Gemma3ForCausalLM``, text only): e.g. a fine-tuned Gemma 3 270M going
  back to llama.cpp. Norm weights get the +1 llama.cpp expects (Gemma's RMSNorm
  multiplies by ``1 + w``); no permutation (NEOX rope). Tokenizer: SentencePiece-style
  BPE with byte fallback (``tokenizer.ggml.model = llama``), scores rebuilt from
  token ids (sentencepiece numbers pieces by score). The whitespace-run pieces that
  Google's file types USER_DEFINED are plain vocabulary in tokenizer.json and are
  written NORMAL: that reproduces the Hugging Face tokenizer, the one the fine-tune
  was trained with. Rope scaling "linear" is written; the sliding-window pattern is
  llama.cpp's built-in one (every 6th layer global), which is Gemma 3's. Checked
  against the real Gemma 3 270M (the slow test in tests/test_gguf.py).

Anything else (other architectures, pre-tokenizers, rope types, biases llama.cpp's
graph lacks) raises ``ModelError`` naming what is unsupported, rather than writing
a file llama.cpp would load and run wrongly.

Tensor types: ``F32``; ``F16``; ``Q8_0``; ``Q4_0`` (``gguf.quants``: K-quants are not
implemented there). 1-D tensors (norms) always stay F32. A matrix whose rows are
not a multiple of the 32-value block stays F16. With Q4_0 the output projection
(``output.weight``, or the tied ``token_embd``) is written Q8_0, as llama-quantize
keeps it at a higher precision (Q6_K there).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from slmforge.errors import ModelError
from slmforge.export._gguf_arch import (
    _gemma3_hparams,
    _gemma3_weights,
    _llama_hparams,
    _llama_weights,
    _tensor_type,
    _write_gemma3_hparams,
    _write_llama_hparams,
)
from slmforge.export._gguf_parity import PARITY_PROMPTS, PARITY_TEXTS, gguf_parity_report
from slmforge.export._gguf_vocab import _write_generation_defaults, _write_special_ids, _write_vocab
from slmforge.model.gguf import GgufInfo, read_gguf_info

# The parity check (_gguf_parity), the per-architecture weights (_gguf_arch) and the tokenizer (_gguf_vocab)
# live in private siblings; this module is the public face of all three.
__all__ = ["GGUF_TYPES", "PARITY_PROMPTS", "PARITY_TEXTS", "GgufInfo", "export_gguf", "gguf_parity_report",
           "read_gguf_info", "strip_generation_tags"]

# Tensor type name (the `export.gguf.type` config value) -> (GGML tensor type, GGUF file type), by name.
GGUF_TYPES: dict[str, tuple[str, str]] = {
    "F32": ("F32", "ALL_F32"),
    "F16": ("F16", "MOSTLY_F16"),
    "Q8_0": ("Q8_0", "MOSTLY_Q8_0"),
    "Q4_0": ("Q4_0", "MOSTLY_Q4_0"),
}

# HF architecture class -> GGUF architecture name.
_ARCHITECTURES = {"LlamaForCausalLM": "llama", "Gemma3ForCausalLM": "gemma3"}


# --------------------------------------------------------------------------- public


def export_gguf(
    model_dir: str | Path,
    out_file: str | Path,
    type: str = "Q8_0",  # noqa: A002 - the config key's name
    name: str | None = None,
) -> Path:
    """Convert a Hugging Face model folder into one GGUF file.

    Args:
        model_dir: A folder with ``config.json``, safetensors weights and ``tokenizer.json``
            (what ``slmforge train`` writes; a merged fine-tune too; not a LoRA adapter folder).
        out_file: The ``.gguf`` file to write (written to a temporary name, then renamed).
        type: ``F32``, ``F16``, ``Q8_0`` or ``Q4_0`` (see the module docstring for exceptions).
        name: ``general.name`` (default: the folder's name).

    Returns:
        The written file.

    Raises:
        ModelError: The folder is not a model, or it uses an architecture, tokenizer or option
            this converter does not cover.
    """
    import gguf

    if type not in GGUF_TYPES:
        raise ModelError(f"Unknown GGUF type {type!r}; choose one of {', '.join(GGUF_TYPES)}.")
    folder = Path(model_dir).expanduser()
    config = _read_json(folder / "config.json", "config.json")
    arch_class = (config.get("architectures") or [""])[0]
    arch = _ARCHITECTURES.get(arch_class)
    if arch is None:
        raise ModelError(
            f"{folder} holds a {arch_class or config.get('model_type')!r} model; GGUF export covers "
            f"{', '.join(_ARCHITECTURES)}. For other architectures use llama.cpp's convert_hf_to_gguf.py."
        )
    tokenizer_files = _read_tokenizer_files(folder)
    tensors = _read_safetensors(folder)

    out = Path(out_file).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    part = out.with_name(out.name + ".part")
    writer = gguf.GGUFWriter(str(part), arch)
    try:
        writer.add_type("model")
        writer.add_name(name or folder.resolve().name)
        writer.add_file_type(int(gguf.LlamaFileType[GGUF_TYPES[type][1]]))
        if type in ("Q8_0", "Q4_0"):
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        if arch == "llama":
            hp = _llama_hparams(config)
            _write_llama_hparams(writer, hp)
            weights = _llama_weights(tensors, hp)
        else:
            hp = _gemma3_hparams(config)
            _write_gemma3_hparams(writer, hp)
            weights = _gemma3_weights(tensors, hp)
        _write_tokenizer(writer, arch, folder, hp["vocab_size"], *tokenizer_files)
        _write_tensors(writer, weights, type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(part, out)
    except BaseException:
        writer.close()
        part.unlink(missing_ok=True)
        raise
    return out


def _read_tokenizer_files(folder: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """tokenizer.json, tokenizer_config.json and generation_config.json (the last two may be missing)."""
    return (_read_json(folder / "tokenizer.json", "tokenizer.json (a fast tokenizer)"),
            _read_json(folder / "tokenizer_config.json", "tokenizer_config.json", required=False),
            _read_json(folder / "generation_config.json", "generation_config.json", required=False))


def _write_tokenizer(writer, arch: str, folder: Path, vocab_size: int, tok_json: dict[str, Any],
                     tok_config: dict[str, Any], gen_config: dict[str, Any]) -> None:
    """The vocabulary, special ids, chat template and sampling defaults."""
    specials = _write_vocab(writer, arch, tok_json, tok_config, vocab_size, folder)
    _write_special_ids(writer, specials, gen_config)
    template = _chat_template(folder, tok_config)
    if template:
        writer.add_chat_template(strip_generation_tags(template))
    _write_generation_defaults(writer, gen_config)


def _write_tensors(writer, weights: dict[str, Any], type: str) -> None:  # noqa: A002 - the config key's name
    """Every weight at its tensor type (see the module docstring: norms F32, odd rows F16, output Q8_0 under Q4_0)."""
    import gguf
    import numpy as np

    tied = "output.weight" not in weights
    ggml = gguf.GGMLQuantizationType
    wanted = ggml[GGUF_TYPES[type][0]]
    for gguf_name, array in weights.items():
        array = np.ascontiguousarray(array, dtype=np.float32)
        qtype = _tensor_type(gguf_name, array, wanted, tied)
        data = gguf.quants.quantize(array, qtype)
        if qtype in (ggml.F32, ggml.F16):
            writer.add_tensor(gguf_name, data)
        else:
            writer.add_tensor(gguf_name, data, raw_dtype=qtype)


def strip_generation_tags(template: str) -> str:
    """The chat template without transformers' ``{% generation %}`` markers, which only
    transformers' Jinja environment knows (they mark the assistant tokens an SFT loss trains on).

    Each marker becomes an always-true ``if`` block with the same whitespace control, so the
    rendered text is unchanged: dropping a ``{%- ... %}`` tag outright would let the whitespace
    it trimmed through.
    """
    template = re.sub(r"\{%(-?)\s*generation\s*(-?)%\}", r"{%\1 if true \2%}", template)
    return re.sub(r"\{%(-?)\s*endgeneration\s*(-?)%\}", r"{%\1 endif \2%}", template)


# --------------------------------------------------------------------------- reading the folder


def _read_json(path: Path, what: str, required: bool = True) -> dict[str, Any]:
    if not path.is_file():
        if not required:
            return {}
        hint = ""
        if what == "config.json" and (path.parent / "adapter_config.json").is_file():
            hint = " It is a LoRA adapter folder: merge the adapter into its base model first."
        raise ModelError(f"{path.parent} has no {what}, so it cannot be exported to GGUF.{hint}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"Could not read {path}: {exc}") from None


def _read_safetensors(folder: Path) -> dict[str, Any]:
    """Every tensor of the folder's safetensors file(s), as float32 numpy arrays."""
    import torch
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelError(f"{folder} has no .safetensors weights; save the model with save_pretrained first.")
    out: dict[str, Any] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                out[key] = f.get_tensor(key).to(torch.float32).numpy()
    return out


def _chat_template(folder: Path, tok_config: dict[str, Any]) -> str | None:
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    template = tok_config.get("chat_template")
    if isinstance(template, list):  # named templates: the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    return template if isinstance(template, str) else None
