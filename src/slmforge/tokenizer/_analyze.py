"""How well a tokenizer compresses text: fertility, characters and bytes per token,
and how often it falls back to bare bytes or unknown tokens."""

from __future__ import annotations

import json
import re
from typing import Any

from slmforge.tokenizer._bpe import has_component

_SP_BYTE = re.compile(r"<0x[0-9A-Fa-f]{2}>")  # sentencepiece byte_fallback tokens
_BATCH = 256


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's printable stand-in character for each byte -> the byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1)
    )
    chars, n = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + n)] = b
            n += 1
    return chars


def fallback_ids(hf_tokenizer: Any) -> tuple[set[int], str]:
    """Ids of tokens that carry no whole character, and which kind they are.

    Byte-level BPE: single-byte tokens with a byte >= 0x80 (a fragment of a
    multi-byte UTF-8 character). SentencePiece with byte fallback: ``<0xNN>``
    tokens. Anything else: the unknown token.
    """
    tok_json = json.loads(hf_tokenizer.backend_tokenizer.to_str())
    vocab = hf_tokenizer.get_vocab()
    if any(has_component(tok_json.get(part), "ByteLevel") for part in ("pre_tokenizer", "decoder")):
        alphabet = _byte_level_alphabet()
        return {i for t, i in vocab.items() if len(t) == 1 and alphabet.get(t, 0) >= 0x80}, "byte"
    if (tok_json.get("model") or {}).get("byte_fallback"):
        return {i for t, i in vocab.items() if _SP_BYTE.fullmatch(t)}, "byte"
    unk = hf_tokenizer.unk_token_id
    return ({unk} if unk is not None else set()), "unk"


def text_stats(name: str, hf_tokenizer: Any, texts: list[str]) -> dict[str, Any]:
    """The numbers behind ``TokenizerStats`` for one tokenizer on ``texts``."""
    fallback, _ = fallback_ids(hf_tokenizer)
    unk = hf_tokenizer.unk_token_id
    words = chars = nbytes = tokens = n_fallback = n_unk = 0
    for start in range(0, len(texts), _BATCH):
        batch = texts[start : start + _BATCH]
        ids = hf_tokenizer(batch, add_special_tokens=False)["input_ids"]
        for text, seq in zip(batch, ids):
            words += len(text.split())
            chars += len(text)
            nbytes += len(text.encode("utf-8"))
            tokens += len(seq)
            n_fallback += sum(1 for i in seq if i in fallback)
            if unk is not None:
                n_unk += sum(1 for i in seq if i == unk)
    return {
        "name": name,
        "documents": len(texts),
        "words": words,
        "chars": chars,
        "bytes": nbytes,
        "tokens": tokens,
        "fertility": round(tokens / words, 4) if words else 0.0,
        "chars_per_token": round(chars / tokens, 4) if tokens else 0.0,
        "bytes_per_token": round(nbytes / tokens, 4) if tokens else 0.0,
        "byte_fallback_rate": round(n_fallback / tokens, 6) if tokens else 0.0,
        "unk_rate": round(n_unk / tokens, 6) if tokens else 0.0,
    }
