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
from slmforge.model.gguf import GgufInfo, read_gguf_info

__all__ = ["GGUF_TYPES", "GgufInfo", "export_gguf", "gguf_parity_report", "read_gguf_info", "strip_generation_tags"]

# Tensor type name (the `export.gguf.type` config value) -> (GGML tensor type, GGUF file type), by name.
GGUF_TYPES: dict[str, tuple[str, str]] = {
    "F32": ("F32", "ALL_F32"),
    "F16": ("F16", "MOSTLY_F16"),
    "Q8_0": ("Q8_0", "MOSTLY_Q8_0"),
    "Q4_0": ("Q4_0", "MOSTLY_Q4_0"),
}

# HF architecture class -> GGUF architecture name.
_ARCHITECTURES = {"LlamaForCausalLM": "llama", "Gemma3ForCausalLM": "gemma3"}

# The regex-splitting byte-level pre-tokenizer that llama.cpp knows as "gpt-2".
_GPT2_PRE = "gpt-2"

# Tokens that end a chat turn: written as tokenizer.ggml.eot_token_id when present.
_END_OF_TURN = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>")


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
    import numpy as np

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
    tok_json = _read_json(folder / "tokenizer.json", "tokenizer.json (a fast tokenizer)")
    tok_config = _read_json(folder / "tokenizer_config.json", "tokenizer_config.json", required=False)
    gen_config = _read_json(folder / "generation_config.json", "generation_config.json", required=False)
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
        vocab_size = hp["vocab_size"]
        specials = _write_vocab(writer, arch, tok_json, tok_config, vocab_size, folder)
        _write_special_ids(writer, specials, gen_config)
        template = _chat_template(folder, tok_config)
        if template:
            writer.add_chat_template(strip_generation_tags(template))
        _write_generation_defaults(writer, gen_config)

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


# --------------------------------------------------------------------------- parity with the source model

# Texts whose tokenization llama.cpp must reproduce: prose, code, whitespace runs, unicode, numbers,
# URLs and special tokens: the places where a pre-tokenizer or a byte mapping goes wrong first.
PARITY_TEXTS = (
    "The garden was planted in early spring.",
    "json.dumps(obj, *, indent=None) serializes obj to a JSON formatted str.",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "if (a && b) { return a[0]; } // done",
    "for i in range(10):\n\tprint(i ** 2)  # tab-indented",
    "  two leading spaces and trailing spaces   ",
    "multiple    spaces\t\ttabs\n\n\nblank lines\r\n",
    "Ünïcödé çharacters, naïve café, Straße",
    "日本語のテキストと中文",
    "emoji 😀🚀 and flags 🇩🇪",
    "numbers 1234567 3.14159 -42 1e-9 0x1F",
    "don't won't it's we'll I'm they're",
    "URL https://docs.python.org/3/library/json.html?q=a&b=c#x",
    "punctuation!!! ??? ... --- (((nested)))",
    "MiXeD CaSe WoRdS and ALLCAPS",
    "",
    " ",
    "\n",
)
PARITY_PROMPTS = ("def fibonacci(n):", "The standard library", "import json\n", "Question: What does len do?\nAnswer:",
                  "The garden was")


def gguf_parity_report(
    model_dir: str | Path,
    gguf_file: str | Path,
    prompts: list[str] | tuple[str, ...] = PARITY_PROMPTS,
    max_new_tokens: int = 16,
    texts: list[str] | tuple[str, ...] = PARITY_TEXTS,
    n_threads: int | None = None,
) -> dict[str, Any]:
    """Load the GGUF file in llama.cpp and compare it with the Hugging Face model it came from.

    The GGUF counterpart of ``export.onnx.parity_report`` (same key names, same meanings), through
    llama.cpp's own tokenizer and graph (xllamacpp), so the export claims only what llama.cpp did:

    - Tokenization: each text (``texts``, the prompts, and a chat rendered with the model's template)
      through llama.cpp's tokenizer and the source tokenizer, with and without special tokens.
    - Greedy parity: PyTorch decodes ``max_new_tokens`` greedy tokens per prompt (up to an end-of-turn
      token). llama.cpp is then asked for its next token after every prefix of the prompt and of
      PyTorch's tokens (teacher-forced: ``top1_agreement`` over all positions, ``greedy_agreement``
      over generated ones, and the log-probability it gives its pick next to PyTorch's), and decodes
      each prompt freely (``greedy_identical``: prompts whose whole continuation is PyTorch's).

    Quantized types are expected to disagree sometimes: the rates say how often, nothing is required.

    Args:
        model_dir: The Hugging Face model folder that was exported.
        gguf_file: The GGUF file.
        prompts: Plain-text prompts (llama.cpp gets PyTorch's token ids, BOS included).
        max_new_tokens: Greedy tokens per prompt.
        texts: Texts whose tokenization is compared.
        n_threads: CPU threads for llama.cpp (default: the machine's cores, at most 8).

    Returns:
        ``engine``, ``prompts``, ``positions`` (next-token predictions compared), ``top1_agreement``,
        ``greedy_agreement``, ``greedy_identical``, ``max_abs_logprob_diff`` (over llama.cpp's picks), ``tokenization``
        (``texts``, ``identical``, ``agreement``, ``mismatches``: up to 5 texts that differ).

    Raises:
        ModelError: llama.cpp cannot load the file, or the source model cannot be loaded.
    """
    import torch
    from transformers import DynamicCache

    from slmforge.errors import GenerateError
    from slmforge.generate import LlamaCppGenerator
    from slmforge.model import load_causal_lm

    model, tokenizer = load_causal_lm(model_dir)
    model.eval()
    refs: list[tuple[list[int], list[int], Any]] = []  # (prompt ids, greedy ids, log-probs after each position)
    stops = _end_ids(tokenizer, model)
    for prompt in prompts:
        ids = list(tokenizer(prompt)["input_ids"])
        with torch.inference_mode():
            cache = DynamicCache(config=model.config)  # filled in place by each forward
            parts, new = [model(input_ids=torch.tensor([ids]), cache=cache, use_cache=True).logits[0]], []
            while len(new) < max_new_tokens and (not new or new[-1] not in stops):
                new.append(int(parts[-1][-1].argmax()))
                parts.append(model(input_ids=torch.tensor([[new[-1]]]), cache=cache, use_cache=True).logits[0])
        # (S + N, V): the log-probabilities after each position, as numpy (no torch work between llama.cpp calls).
        refs.append((ids, new, torch.log_softmax(torch.cat(parts).float(), -1).numpy()))
    longest = max((len(ids) + len(new) for ids, new, _ in refs), default=1)
    try:
        gen = LlamaCppGenerator(gguf_file, n_threads=n_threads or max(1, min(os.cpu_count() or 2, 8)),
                                n_ctx=max(longest + 8, 64), cache_prompt=True)
    except GenerateError as exc:
        raise ModelError(f"The GGUF file was written, but llama.cpp cannot use it: {str(exc).rstrip('.')}. This is a "
                         "gap in slmforge's GGUF converter for this model; please report it with the model's "
                         "config.json.") from None
    with gen:
        tokenization = _tokenization_agreement(gen, tokenizer, [*texts, *prompts, *_chat_texts(tokenizer)])
        positions = agree = gen_positions = gen_agree = identical = 0
        max_logprob_diff = 0.0
        for ids, new, logprobs in refs:
            full = ids + new
            for k in range(1, len(full)):  # llama.cpp's next token after full[:k]
                got, logprob = _llama_next(gen, full[:k])
                same = got == int(logprobs[k - 1].argmax())
                positions, agree = positions + 1, agree + same
                if k >= len(ids):
                    gen_positions, gen_agree = gen_positions + 1, gen_agree + same
                if logprob is not None:
                    max_logprob_diff = max(max_logprob_diff, abs(logprob - float(logprobs[k - 1][got])))
            identical += _llama_greedy(gen, ids, len(new)) == new
    return {
        "engine": "llama.cpp",
        "prompts": len(refs),
        "positions": positions,
        "top1_agreement": agree / max(positions, 1),
        "greedy_agreement": gen_agree / max(gen_positions, 1),
        "greedy_identical": identical,
        "max_new_tokens": max_new_tokens,
        "max_abs_logprob_diff": max_logprob_diff,
        "tokenization": tokenization,
    }


def _end_ids(tokenizer, model) -> set[int]:
    """Token ids that end generation (EOS, end-of-turn): PyTorch's reference stops after one."""
    ends = {tokenizer.eos_token_id}
    gen_eos = getattr(model.generation_config, "eos_token_id", None)
    ends |= set(gen_eos) if isinstance(gen_eos, list) else {gen_eos}
    vocab = tokenizer.get_vocab()
    ends |= {vocab[t] for t in _END_OF_TURN if t in vocab}
    return {i for i in ends if isinstance(i, int)}


def _chat_texts(tokenizer) -> list[str]:
    """A short conversation rendered by the model's chat template (special tokens included), if it has one."""
    if not getattr(tokenizer, "chat_template", None):
        return []
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What does len do?"},
                {"role": "assistant", "content": "It returns the number of items."}]
    try:
        return [tokenizer.apply_chat_template(messages, tokenize=False)]
    except Exception:  # a template that needs other roles: the plain texts are compared anyway
        return []


def _tokenization_agreement(gen, tokenizer, texts: list[str]) -> dict[str, Any]:
    mismatches = []
    for text in texts:
        for special in (True, False):
            want = list(tokenizer(text, add_special_tokens=special)["input_ids"])
            if gen.tokenize(text, add_special=special) != want:
                mismatches.append(text)
                break
    return {"texts": len(texts), "identical": len(texts) - len(mismatches),
            "agreement": (len(texts) - len(mismatches)) / max(len(texts), 1),
            "mismatches": [t[:80] for t in mismatches[:5]]}


def _llama_steps(gen, ids: list[int], n: int) -> list[dict[str, Any]]:
    """llama.cpp's greedy decoding of up to ``n`` tokens after ``ids`` (token ids: nothing is added; it stops
    at end-of-generation tokens), one ``{id, logprob, ...}`` per token. Greedy with no penalty, whatever
    defaults the file's ``general.sampling.*`` keys hold."""
    body = {"prompt": ids, "max_tokens": n, "n_probs": 1, "temperature": 0.0, "top_k": 0, "top_p": 1.0,
            "min_p": 0.0, "repeat_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0,
            "dry_multiplier": 0.0, "cache_prompt": True}
    result = gen.server.handle_completions(body)
    if "choices" not in result:
        raise ModelError(f"llama.cpp could not decode with {gen.gguf_file}: {str(result.get('error', result))[:300]}")
    return result["choices"][0].get("logprobs", {}).get("content") or []


def _llama_next(gen, ids: list[int]) -> tuple[int, float | None]:
    """llama.cpp's greedy next token after ``ids`` and its log-probability."""
    step = _llama_steps(gen, ids, 1)[0]
    return int(step["id"]), step.get("logprob")


def _llama_greedy(gen, ids: list[int], n: int) -> list[int]:
    return [int(step["id"]) for step in _llama_steps(gen, ids, n)] if n else []


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


def _rope_theta(config: dict[str, Any], layer_type: str | None = None, default: float = 10_000.0) -> float:
    """rope_theta from a transformers 5 ``rope_parameters`` (flat or per layer type) or a 4.x config."""
    rope = config.get("rope_parameters") or {}
    if layer_type and isinstance(rope.get(layer_type), dict):
        rope = rope[layer_type]
    return float(rope.get("rope_theta", config.get("rope_theta", default)))


def _rope_scaling(config: dict[str, Any], layer_type: str | None = None) -> dict[str, Any]:
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if layer_type and isinstance(rope.get(layer_type), dict):
        rope = rope[layer_type]
    kind = rope.get("rope_type", rope.get("type", "default"))
    return {} if kind == "default" else dict(rope, rope_type=kind)


# --------------------------------------------------------------------------- llama


def _llama_hparams(config: dict[str, Any]) -> dict[str, Any]:
    act = config.get("hidden_act", "silu")
    if act != "silu":
        raise ModelError(f"llama.cpp's llama graph is SwiGLU (silu); this model uses hidden_act={act!r}.")
    if config.get("mlp_bias"):
        raise ModelError("llama.cpp's llama graph has no MLP biases; this model has mlp_bias=true.")
    scaling = _rope_scaling(config)
    if scaling and scaling["rope_type"] != "linear":
        raise ModelError(f"Rope scaling {scaling['rope_type']!r} is not covered by the GGUF export (default and linear are).")
    heads = int(config["num_attention_heads"])
    hidden = int(config["hidden_size"])
    return {
        "vocab_size": int(config["vocab_size"]),
        "hidden": hidden,
        "layers": int(config["num_hidden_layers"]),
        "heads": heads,
        "kv_heads": int(config.get("num_key_value_heads") or heads),
        "head_dim": int(config.get("head_dim") or hidden // heads),
        "ffn": int(config["intermediate_size"]),
        "context": int(config.get("max_position_embeddings", 2048)),
        "eps": float(config.get("rms_norm_eps", 1e-5)),
        "rope_theta": _rope_theta(config),
        "rope_scaling": scaling,
        "tied": bool(config.get("tie_word_embeddings", False)),
    }


def _write_llama_hparams(writer, hp: dict[str, Any]) -> None:
    import gguf

    writer.add_vocab_size(hp["vocab_size"])
    writer.add_context_length(hp["context"])
    writer.add_embedding_length(hp["hidden"])
    writer.add_block_count(hp["layers"])
    writer.add_feed_forward_length(hp["ffn"])
    writer.add_head_count(hp["heads"])
    writer.add_head_count_kv(hp["kv_heads"])
    writer.add_layer_norm_rms_eps(hp["eps"])
    writer.add_rope_freq_base(hp["rope_theta"])
    writer.add_rope_dimension_count(hp["head_dim"])
    if hp["head_dim"] != hp["hidden"] // hp["heads"]:
        writer.add_key_length(hp["head_dim"])
        writer.add_value_length(hp["head_dim"])
    if hp["rope_scaling"]:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(hp["rope_scaling"]["factor"]))


def _permute_for_rope(w, n_head: int):
    """HF's rotate-half rotary layout -> llama.cpp's interleaved pairs, per head (rows of q/k)."""
    # (out, in) -> (n_head, 2, head_dim/2, in) -> swap the half axis with the pair axis -> (out, in)
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _mapped(tensors: dict[str, Any], arch_name: str, layers: int) -> dict[str, tuple[str, Any]]:
    """HF tensor name -> (GGUF tensor name, array), through gguf-py's name table."""
    import gguf

    table = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch_name.upper()], layers)
    out = {}
    unknown = []
    for hf_name, array in tensors.items():
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue  # recomputed by llama.cpp
        new = table.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if new is None:
            unknown.append(hf_name)
        else:
            out[hf_name] = (new, array)
    if unknown:
        raise ModelError(
            f"The GGUF export does not know where these weights go in llama.cpp's {arch_name} graph: "
            f"{', '.join(unknown[:8])}{' ...' if len(unknown) > 8 else ''}."
        )
    return out


def _llama_weights(tensors: dict[str, Any], hp: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for hf_name, (name, array) in _mapped(tensors, "llama", hp["layers"]).items():
        if name.endswith("attn_q.weight") or name.endswith("attn_q.bias"):
            array = _permute_for_rope(array, hp["heads"])
        elif name.endswith("attn_k.weight") or name.endswith("attn_k.bias"):
            array = _permute_for_rope(array, hp["kv_heads"])
        if name == "output.weight" and hp["tied"]:
            continue  # llama.cpp uses token_embd when output.weight is absent
        out[name] = array
    if "token_embd.weight" not in out:
        raise ModelError("The model has no embedding table (model.embed_tokens.weight).")
    return out


# --------------------------------------------------------------------------- gemma3


def _gemma3_hparams(config: dict[str, Any]) -> dict[str, Any]:
    if config.get("attn_logit_softcapping") is not None or config.get("final_logit_softcapping") is not None:
        raise ModelError("Gemma 3 in llama.cpp has no logit soft-capping; this config sets it.")
    act = config.get("hidden_activation", config.get("hidden_act", "gelu_pytorch_tanh"))
    if act not in ("gelu_pytorch_tanh", "gelu"):
        raise ModelError(f"llama.cpp's gemma3 graph uses GELU (tanh); this model uses {act!r}.")
    head_dim = int(config.get("head_dim", 256))
    scalar = config.get("query_pre_attn_scalar", head_dim)
    if scalar != head_dim:
        # llama.cpp scales attention by 1/sqrt(head_dim) for every size but 27B.
        raise ModelError(f"query_pre_attn_scalar={scalar} differs from head_dim={head_dim}; llama.cpp assumes they match.")
    layer_types = config.get("layer_types")
    if layer_types:
        expected = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(len(layer_types))]
        if list(layer_types) != expected:
            raise ModelError("This Gemma 3 model's sliding/global layer pattern is not llama.cpp's (every 6th layer global).")
    scaling = _rope_scaling(config, "full_attention")
    if scaling and scaling["rope_type"] != "linear":
        raise ModelError(f"Rope scaling {scaling['rope_type']!r} is not covered for Gemma 3 (linear is).")
    return {
        "vocab_size": int(config["vocab_size"]),
        "hidden": int(config["hidden_size"]),
        "layers": int(config["num_hidden_layers"]),
        "heads": int(config["num_attention_heads"]),
        "kv_heads": int(config.get("num_key_value_heads", 4)),
        "head_dim": head_dim,
        "ffn": int(config["intermediate_size"]),
        "context": int(config.get("max_position_embeddings", 131072)),
        "eps": float(config.get("rms_norm_eps", 1e-6)),
        "rope_theta": _rope_theta(config, "full_attention", 1_000_000.0),
        "rope_theta_local": float(config.get("rope_local_base_freq") or _rope_theta(config, "sliding_attention")),
        "rope_scaling": scaling,
        "sliding_window": int(config.get("sliding_window") or 512),
        "tied": bool(config.get("tie_word_embeddings", True)),
    }


def _write_gemma3_hparams(writer, hp: dict[str, Any]) -> None:
    import gguf

    writer.add_context_length(hp["context"])
    writer.add_embedding_length(hp["hidden"])
    writer.add_block_count(hp["layers"])
    writer.add_feed_forward_length(hp["ffn"])
    writer.add_head_count(hp["heads"])
    writer.add_head_count_kv(hp["kv_heads"])
    writer.add_layer_norm_rms_eps(hp["eps"])
    writer.add_key_length(hp["head_dim"])
    writer.add_value_length(hp["head_dim"])
    writer.add_rope_freq_base(hp["rope_theta"])
    writer.add_rope_freq_base_swa(hp["rope_theta_local"])
    writer.add_sliding_window(hp["sliding_window"])
    if hp["rope_scaling"]:  # applied to the global layers only, as in transformers
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(hp["rope_scaling"]["factor"]))


def _gemma3_weights(tensors: dict[str, Any], hp: dict[str, Any]) -> dict[str, Any]:
    tensors = {k.replace("model.language_model.", "model.").replace("language_model.", ""): v
               for k, v in tensors.items() if "vision" not in k and "multi_modal" not in k}
    out = {}
    for hf_name, (name, array) in _mapped(tensors, "gemma3", hp["layers"]).items():
        if name.endswith("norm.weight"):
            array = array + 1.0  # Gemma's RMSNorm scales by (1 + w); llama.cpp's by w
        if name == "output.weight" and hp["tied"]:
            continue
        if name == "token_embd.weight":
            array = array[: hp["vocab_size"]]
        out[name] = array
    return out


# --------------------------------------------------------------------------- tensor types


def _tensor_type(name: str, array, wanted, tied: bool):
    import gguf

    ggml = gguf.GGMLQuantizationType
    if array.ndim < 2 or wanted == ggml.F32:
        return ggml.F32
    if wanted == ggml.F16:
        return ggml.F16
    if wanted == ggml.Q4_0 and (name == "output.weight" or (tied and name == "token_embd.weight")):
        wanted = ggml.Q8_0  # the output projection at higher precision, as llama-quantize does
    block = gguf.GGML_QUANT_SIZES[wanted][0]
    if array.shape[-1] % block:
        return ggml.F16  # a row that is not whole blocks cannot be block-quantized
    return wanted


# --------------------------------------------------------------------------- tokenizer


def _token_ids(tok_json: dict[str, Any]) -> tuple[dict[int, str], dict[int, dict[str, Any]]]:
    model = tok_json.get("model") or {}
    vocab = model.get("vocab")
    if not isinstance(vocab, dict):
        raise ModelError(f"tokenizer.json has a {model.get('type')!r} model; the GGUF export needs a BPE vocabulary.")
    by_id = {int(i): t for t, i in vocab.items()}
    added = {int(t["id"]): t for t in tok_json.get("added_tokens") or []}
    for i, t in added.items():
        by_id[i] = t["content"]
    return by_id, added


def _pre_tokenizer(tok_json: dict[str, Any]) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer (byte-level BPE only)."""
    pre = tok_json.get("pre_tokenizer") or {}
    if tok_json.get("normalizer"):
        raise ModelError("The tokenizer has a normalizer; llama.cpp's GPT-2 pre-tokenizer would not apply it.")
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space", False):
        return _GPT2_PRE
    raise ModelError(
        f"The tokenizer's pre-tokenizer ({json.dumps(pre)[:200]}) is not one the GGUF export maps to llama.cpp; "
        "it covers byte-level BPE with the GPT-2 split (what `slmforge tokenizer train` makes)."
    )


def _adds_bos(tok_json: dict[str, Any], bos: str | None) -> bool:
    """Whether the tokenizer's post-processor puts BOS first (what llama.cpp's add_bos_token means)."""
    post = tok_json.get("post_processor") or {}
    steps = post.get("processors", [post]) if post.get("type") == "Sequence" else [post]
    for step in steps:
        if step.get("type") == "TemplateProcessing":
            first = (step.get("single") or [{}])[0]
            return "SpecialToken" in first and first["SpecialToken"].get("id") == bos
    return False


def _adds_eos(tok_json: dict[str, Any], eos: str | None) -> bool:
    post = tok_json.get("post_processor") or {}
    steps = post.get("processors", [post]) if post.get("type") == "Sequence" else [post]
    for step in steps:
        if step.get("type") == "TemplateProcessing":
            last = (step.get("single") or [{}])[-1]
            return "SpecialToken" in last and last["SpecialToken"].get("id") == eos
    return False


def _special_name(tok_config: dict[str, Any], key: str) -> str | None:
    value = tok_config.get(key)
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _write_vocab(writer, arch: str, tok_json: dict[str, Any], tok_config: dict[str, Any], vocab_size: int,
                 folder: Path) -> dict[str, Any]:
    """Write tokens, types, merges/scores and add-BOS/EOS. Returns the special tokens' ids and flags."""
    import gguf

    by_id, added = _token_ids(tok_json)
    if by_id and max(by_id) >= vocab_size:
        raise ModelError(
            f"The tokenizer in {folder} has ids up to {max(by_id)}, but the model's vocabulary has {vocab_size} rows."
        )
    model = tok_json["model"]
    tokens: list[str] = []
    types: list[int] = []
    scores: list[float] = []
    byte_token = re.compile(r"<0x[0-9A-Fa-f]{2}>")
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")  # embedding rows past the tokenizer (vocab padded to a multiple)
            types.append(gguf.TokenType.UNUSED)
            scores.append(-1000.0)
            continue
        text = by_id[i]
        if i in added:
            special = added[i].get("special", False)
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
            scores.append(-1000.0)
        elif model.get("byte_fallback") and byte_token.fullmatch(text):
            types.append(gguf.TokenType.BYTE)
            scores.append(0.0)
        else:
            types.append(gguf.TokenType.NORMAL)
            # SentencePiece numbers pieces by descending score; llama.cpp's SPM merges by score.
            scores.append(-float(i))
        tokens.append(text)

    if arch == "llama":
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(_pre_tokenizer(tok_json))
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        from slmforge.tokenizer import read_merges

        writer.add_token_merges([f"{a} {b}" for a, b in read_merges(model)])
    else:  # gemma3: SentencePiece-style BPE with byte fallback
        if not model.get("byte_fallback"):
            raise ModelError("A Gemma 3 tokenizer must be a SentencePiece BPE with byte fallback (as Gemma's is).")
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        writer.add_add_space_prefix(False)

    ids = {t: i for i, t in by_id.items()}
    names = {k: _special_name(tok_config, f"{k}_token") for k in ("bos", "eos", "pad", "unk")}
    found = {k: ids.get(v) for k, v in names.items() if v is not None and v in ids}
    writer.add_add_bos_token(_adds_bos(tok_json, names["bos"]))
    writer.add_add_eos_token(_adds_eos(tok_json, names["eos"]))
    eot = next((ids[t] for t in _END_OF_TURN if t in ids), None)
    if eot is not None:
        found["eot"] = eot
    return found


def _write_special_ids(writer, found: dict[str, int], gen_config: dict[str, Any]) -> None:
    if "bos" in found:
        writer.add_bos_token_id(found["bos"])
    eos = found.get("eos")
    if eos is None:
        gen_eos = gen_config.get("eos_token_id")
        eos = gen_eos[0] if isinstance(gen_eos, list) and gen_eos else gen_eos
    if isinstance(eos, int):
        writer.add_eos_token_id(eos)
    if "pad" in found:
        writer.add_pad_token_id(found["pad"])
    if "unk" in found:
        writer.add_unk_token_id(found["unk"])
    if "eot" in found and found["eot"] != eos:
        writer.add_eot_token_id(found["eot"])


def _write_generation_defaults(writer, gen_config: dict[str, Any]) -> None:
    """The default sampling profile as llama.cpp's general.sampling.* defaults, every profile as JSON."""
    profiles = gen_config.get("slmforge_profiles") or {}
    default = gen_config.get("slmforge_default_profile")
    if profiles:
        writer.add_string("slmforge.sampling_profiles", json.dumps(profiles, sort_keys=True))
    if default:
        writer.add_string("slmforge.default_profile", default)
    p = profiles.get(default or "")
    if not p:
        return
    writer.add_sampling_temp(float(p["temperature"]))
    writer.add_sampling_top_k(int(p["top_k"] or 0))  # 0 = off in llama.cpp
    writer.add_sampling_top_p(float(p["top_p"] if p["top_p"] is not None else 1.0))
    writer.add_sampling_min_p(0.0)  # transformers has no min-p by default
    writer.add_sampling_penalty_repeat(float(p["repetition_penalty"]))
    writer.add_sampling_penalty_last_n(-1)  # transformers penalises the whole context
    writer.add_uint32("slmforge.max_new_tokens", int(p["max_new_tokens"]))
