"""GGUF export, the tokenizer: vocabulary, merges or scores, special token ids and sampling defaults.

Private to ``slmforge.export.gguf`` (see its docstring for the tokenizers covered).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from slmforge.errors import ModelError

# The regex-splitting byte-level pre-tokenizer that llama.cpp knows as "gpt-2".
_GPT2_PRE = "gpt-2"

# Tokens that end a chat turn: written as tokenizer.ggml.eot_token_id when present.
_END_OF_TURN = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>")


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
    from slmforge.tokenizer.fim import FIM_FAMILIES

    fim = next((family for family in FIM_FAMILIES if all(t in ids for t in family)), None)
    if fim is not None:  # llama.cpp's /infill and editors' FIM clients read these
        found.update(fim_pre=ids[fim[0]], fim_suf=ids[fim[1]], fim_mid=ids[fim[2]])
        found["fim_spm"] = int(tok_config.get("fim_order") == "spm")  # the order slmforge trained it in
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
    import gguf

    for key, name in ((gguf.Keys.Tokenizer.FIM_PRE_ID, "fim_pre"), (gguf.Keys.Tokenizer.FIM_SUF_ID, "fim_suf"),
                      (gguf.Keys.Tokenizer.FIM_MID_ID, "fim_mid")):
        if name in found:
            writer.add_uint32(key, found[name])
    if found.get("fim_spm"):  # llama.cpp's own /infill needs --spm-infill for such a model
        writer.add_string("slmforge.fim_order", "spm")


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
