"""Byte-level BPE surgery on the JSON of a ``tokenizers`` tokenizer.

Domain terms become single tokens by *appending merges* (lowest priority) to a
real BPE vocabulary, not by "added tokens", so that GGUF/llama.cpp exporters
see an ordinary BPE model. Everything here works on the parsed
``tokenizer.json`` (a dict) and never mutates its input.

tokenizers 0.23 serialises ``model.merges`` as a list of ``[left, right]`` pairs;
older files use ``"left right"`` strings, which we read too.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from typing import Any


def is_byte_level_bpe(tok_json: dict[str, Any]) -> bool:
    """A BPE model with a ByteLevel pre-tokenizer and plain (GPT-2 style) pieces."""
    model = tok_json.get("model") or {}
    return (
        model.get("type") == "BPE"
        and not model.get("continuing_subword_prefix")
        and not model.get("end_of_word_suffix")
        and has_component(tok_json.get("pre_tokenizer"), "ByteLevel")
    )


def has_component(node: Any, name: str) -> bool:
    if isinstance(node, dict):
        return node.get("type") == name or any(has_component(v, name) for v in node.values())
    if isinstance(node, list):
        return any(has_component(v, name) for v in node)
    return False


def read_merges(model: dict[str, Any]) -> list[tuple[str, str]]:
    """The merges of a tokenizer.json ``model`` section as pairs, from either of the two forms
    tokenizers writes (legacy ``"a b"`` strings, or ``["a", "b"]`` pairs)."""
    out = []
    for m in model.get("merges", []):
        if isinstance(m, str):  # legacy "a b" form
            a, _, b = m.partition(" ")
            out.append((a, b))
        else:
            out.append((m[0], m[1]))
    return out


def max_id(tok_json: dict[str, Any]) -> int:
    ids = list(tok_json["model"]["vocab"].values()) + [t["id"] for t in tok_json.get("added_tokens") or []]
    return max(ids, default=-1)


def bpe_split(word: str, vocab: dict[str, int], ranks: dict[tuple[str, str], int], ignore_merges: bool) -> list[str]:
    """The BPE pieces of one pre-tokenized word, as tokenizers computes them:
    repeatedly merge the adjacent pair of lowest rank (leftmost on ties)."""
    if ignore_merges and word in vocab:
        return [word]
    syms = list(word)
    while len(syms) > 1:
        best_rank, best_i = None, -1
        for i in range(len(syms) - 1):
            r = ranks.get((syms[i], syms[i + 1]))
            if r is not None and (best_rank is None or r < best_rank):
                best_rank, best_i = r, i
        if best_rank is None:
            break
        syms[best_i : best_i + 2] = [syms[best_i] + syms[best_i + 1]]
    return syms


@dataclass
class ForcedMerges:
    merges: list[tuple[str, str]] = field(default_factory=list)
    new_tokens: dict[str, int] = field(default_factory=dict)  # token -> id, in id order


def force_single_tokens(
    vocab: dict[str, int],
    merges: list[tuple[str, str]],
    words: list[str],
    next_id: int,
    ignore_merges: bool = False,
) -> ForcedMerges:
    """Merges to append so that each pre-tokenized word in ``words`` is one token.

    While a word is more than one piece, append the merge (pieces[0], pieces[1]).
    An appended merge has the lowest priority, so it fires only once no older merge
    applies: it never changes how any other text is split, and the loop ends
    because each step removes a piece.
    """
    ranks = {pair: i for i, pair in enumerate(merges)}
    known = dict(vocab)
    out = ForcedMerges()
    for word in words:
        while True:
            pieces = bpe_split(word, known, ranks, ignore_merges)
            if len(pieces) == 1:
                break
            pair = (pieces[0], pieces[1])
            ranks[pair] = len(ranks)
            out.merges.append(pair)
            merged = pair[0] + pair[1]
            if merged not in known:
                known[merged] = next_id
                out.new_tokens[merged] = next_id
                next_id += 1
    return out


def with_merges(tok_json: dict[str, Any], vocab: dict[str, int], merges: list[tuple[str, str]]) -> dict[str, Any]:
    """A copy of ``tok_json`` whose BPE model has this vocabulary and these merges."""
    out = copy.deepcopy({k: v for k, v in tok_json.items() if k != "model"})
    model = {k: v for k, v in tok_json["model"].items() if k not in ("vocab", "merges")}
    model["vocab"] = dict(sorted(vocab.items(), key=lambda kv: kv[1]))
    model["merges"] = [[a, b] for a, b in merges]
    out["model"] = copy.deepcopy(model)
    return out


def trimmed_vocab(
    vocab: dict[str, int], merges: list[tuple[str, str]], keep: int, protected: set[str]
) -> dict[str, int]:
    """The vocabulary of a trained BPE that keeps only its first ``keep`` merges.

    Tokens that no merge produces (specials, the byte alphabet) and ``protected``
    ones always stay; ids are renumbered densely in their old order (for a
    trained model that is a no-op: the trainer numbers merge outputs in order).
    """
    produced = {a + b for a, b in merges}
    kept = {t for t in vocab if t not in produced or t in protected}
    kept.update(a + b for a, b in merges[:keep])
    return {t: i for i, t in enumerate(sorted(kept, key=vocab.__getitem__))}


def added_token_entry(content: str, id_: int, special: bool, normalized: bool, single_word: bool) -> dict[str, Any]:
    return {
        "id": id_,
        "content": content,
        "single_word": single_word,
        "lstrip": False,
        "rstrip": False,
        "normalized": normalized,
        "special": special,
    }


def dumps(tok_json: dict[str, Any]) -> str:
    return json.dumps(tok_json, ensure_ascii=False)
