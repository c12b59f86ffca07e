"""A tokenizer's vocabulary as bytes, for constrained decoding.

``outlines_core`` matches a regular expression against bytes, so each token id must be
mapped to the bytes it stands for: byte-level BPE (GPT-2 style) and SentencePiece-style
vocabularies are read from the fast tokenizer's decoder. The vocabulary is built once per
(tokenizer, end ids) and cached; the small thread-safe LRU and the per-key build locks here
are shared with the constraint cache (``_automaton``).
"""

from __future__ import annotations

import json
import re
import threading
import weakref
from collections import OrderedDict
from collections.abc import Hashable
from typing import Any

from slmforge.errors import GenerateError

# Chat end-of-turn tokens that also end a constrained answer, when the tokenizer has them.
_END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's printable-unicode -> byte table (the inverse of ``bytes_to_unicode``)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {v: k for k, v in bytes_to_unicode().items()}


def _decoder_kind(tokenizer: Any) -> str:
    """``"byte_level"`` or ``"sentencepiece"``, read from the fast tokenizer's decoder.

    Raises:
        GenerateError: Not a fast tokenizer, or a decoder whose token text cannot be mapped
            back to bytes (WordPiece, no decoder...).
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise GenerateError(
            f"Constrained decoding needs a fast (Rust `tokenizers`) tokenizer; got {type(tokenizer).__name__}. "
            "Load the model's tokenizer.json with transformers' fast tokenizer."
        )
    decoder = json.loads(backend.to_str()).get("decoder") or {}
    parts = decoder.get("decoders", [decoder]) if decoder.get("type") == "Sequence" else [decoder]
    types = [p.get("type") for p in parts]
    if "ByteLevel" in types:
        return "byte_level"
    spiece = "Metaspace" in types or "ByteFallback" in types or any(
        p.get("type") == "Replace" and (p.get("pattern") or {}).get("String") == "\u2581" for p in parts
    )
    if spiece:
        return "sentencepiece"
    raise GenerateError(
        f"Constrained decoding cannot map this tokenizer's tokens to bytes: its decoder is {types or 'missing'}, "
        "and only byte-level BPE (GPT-2 style, decoder ByteLevel) and SentencePiece-style vocabularies "
        "('\u2581' for a space, <0xNN> byte tokens) are supported. Use response_format text, or a model with "
        "one of those tokenizers."
    )


def _token_bytes(tokenizer: Any) -> dict[bytes, list[int]]:
    """Map the bytes each non-special token stands for to its ids (several ids may share bytes).

    Raises:
        GenerateError: The vocabulary cannot be mapped (see ``_decoder_kind``), or a byte-level
            token holds a character outside the byte alphabet.
    """
    kind = _decoder_kind(tokenizer)
    special = set(tokenizer.all_special_ids)
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    special |= {i for i, t in added.items() if getattr(t, "special", False)}
    added_text = {i for i in added if i not in special}  # matched verbatim in text, never byte-mapped
    u2b = _byte_level_decoder() if kind == "byte_level" else {}
    out: dict[bytes, list[int]] = {}
    for text, i in tokenizer.get_vocab().items():
        if i in special:
            continue
        if i in added_text:
            data = text.encode("utf-8")
        elif kind == "byte_level":
            try:
                data = bytes(u2b[c] for c in text)
            except KeyError as e:
                raise GenerateError(
                    f"Token {text!r} (id {i}) holds the character {e.args[0]!r}, which is not in the byte-level "
                    "alphabet its ByteLevel decoder expects, so constrained decoding cannot tell which bytes it "
                    "stands for. The tokenizer.json looks inconsistent; retrain or re-export the tokenizer."
                ) from None
        else:
            m = _BYTE_TOKEN.fullmatch(text)
            data = bytes([int(m.group(1), 16)]) if m else text.replace("\u2581", " ").encode("utf-8")
        if data:
            out.setdefault(data, []).append(i)
    if not out:
        raise GenerateError("The tokenizer has no ordinary (non-special) tokens; nothing can be generated.")
    return out


def _default_eos_ids(tokenizer: Any) -> tuple[int, ...]:
    """The model's eos id, then the chat end-of-turn tokens the vocabulary has."""
    ids: list[int] = []
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    vocab = tokenizer.get_vocab()
    for text in _END_OF_TURN_TOKENS:
        if text in vocab and vocab[text] not in ids:
            ids.append(int(vocab[text]))
    return tuple(ids)


class _Lru:
    """A small thread-safe LRU map. Values hold a strong reference to the tokenizer whose
    ``id()`` is in the key, so that id cannot be reused by another object while cached."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._items: OrderedDict[Hashable, tuple[Any, Any]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable, owner: Any) -> Any | None:
        with self._lock:
            item = self._items.get(key)
            if item is None or item[0] is not owner:
                return None
            self._items.move_to_end(key)
            return item[1]

    def put(self, key: Hashable, owner: Any, value: Any) -> None:
        with self._lock:
            self._items[key] = (owner, value)
            self._items.move_to_end(key)
            while len(self._items) > self._size:
                self._items.popitem(last=False)


_VOCABS = _Lru(8)
_BUILD_LOCKS: weakref.WeakValueDictionary[Hashable, threading.Lock] = weakref.WeakValueDictionary()
_BUILD_LOCKS_LOCK = threading.Lock()


def _build_lock(key: Hashable) -> threading.Lock:
    """The lock that lets one thread build the constraint of ``key`` while others wait for it."""
    with _BUILD_LOCKS_LOCK:
        lock = _BUILD_LOCKS.get(key)
        if lock is None:
            lock = _BuildLock()
            _BUILD_LOCKS[key] = lock
        return lock


class _BuildLock:
    """A lock a WeakValueDictionary can hold (``threading.Lock`` objects take no weak references)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def __enter__(self) -> None:
        self._lock.acquire()

    def __exit__(self, *exc: object) -> None:
        self._lock.release()


def _vocabulary(tokenizer: Any, eos_ids: tuple[int, ...]) -> Any:
    import outlines_core as oc

    key = ("vocab", id(tokenizer), eos_ids)
    vocab = _VOCABS.get(key, tokenizer)
    if vocab is None:
        mapping = _token_bytes(tokenizer)
        ends = set(eos_ids)
        for data in list(mapping):  # an end id is never also ordinary text
            mapping[data] = [i for i in mapping[data] if i not in ends]
            if not mapping[data]:
                del mapping[data]
        vocab = oc.Vocabulary(eos_ids[0], mapping)
        _VOCABS.put(key, tokenizer, vocab)
    return vocab
