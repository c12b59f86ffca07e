"""Vocabulary trimming for a domain: keep the BPE tokens a corpus uses (plus specials and the byte
fallback), renumbered densely, so that the corpus encodes to the same tokens under new ids.

Why by hand: neither ``tokenizers`` nor ``transformers`` can shrink a trained BPE model while keeping its
encoding; this edits the tokenizer.json (vocabulary, merges, added tokens, post-processor ids).

A kept token must stay reachable by the merges that build it on the corpus. BPE builds a token only
through intermediate tokens that are the parents of some merge producing it, so the kept set is closed
under "every merge producing a kept token brings its two parts" (a SentencePiece-converted BPE such as
Gemma's lists several merges per token; all are followed). The kept merges, in their old order, are those
whose parts and result are all kept. On the corpus, every merge that fired before is still there and
every merge that is gone never fired, so at each step BPE picks the same pair: the corpus encodes to the
same tokens. Text the corpus never had falls back to shorter pieces and, through the kept byte tokens
(``<0xNN>`` with byte fallback, the 256-character alphabet of a byte-level BPE), never to unknown.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

from slmforge.errors import TokenizerError
from slmforge.tokenizer._analyze import _SP_BYTE, _byte_level_alphabet
from slmforge.tokenizer._bpe import has_component, read_merges


def fallback_tokens(tok_json: dict[str, Any]) -> set[str]:
    """The tokens every text can fall back to: byte tokens, the byte-level alphabet, the unknown token."""
    model = tok_json["model"]
    vocab: dict[str, int] = model["vocab"]
    out = {t for t in vocab if _SP_BYTE.fullmatch(t)} if model.get("byte_fallback") else set()
    if has_component(tok_json.get("pre_tokenizer"), "ByteLevel"):
        out |= {c for c in _byte_level_alphabet() if c in vocab}
    if model.get("unk_token") in vocab:
        out.add(model["unk_token"])
    return out


def closed_under_merges(kept: set[str], merges: list[tuple[str, str]]) -> set[str]:
    """``kept`` and, recursively, both parts of every merge that produces a kept token."""
    producers: dict[str, list[tuple[str, str]]] = {}
    for a, b in merges:
        producers.setdefault(a + b, []).append((a, b))
    out, stack = set(kept), list(kept)
    while stack:
        for pair in producers.get(stack.pop(), ()):
            for part in pair:
                if part not in out:
                    out.add(part)
                    stack.append(part)
    return out


def _remap_ids(node: Any, new_id: dict[int, int], where: str) -> Any:
    """A post-processor with every special-token id renumbered (TemplateProcessing ``ids``, the
    ``[token, id]`` pairs of Bert/Roberta processors)."""
    if isinstance(node, list):
        if len(node) == 2 and isinstance(node[0], str) and isinstance(node[1], int):
            return [node[0], _new(node[1], new_id, where)]
        return [_remap_ids(v, new_id, where) for v in node]
    if isinstance(node, dict):
        return {k: ([_new(i, new_id, where) for i in v] if k == "ids" and isinstance(v, list) else
                    _remap_ids(v, new_id, where)) for k, v in node.items()}
    return node


def _new(old: int, new_id: dict[int, int], where: str) -> int:
    if old not in new_id:
        raise TokenizerError(f"The {where} names token id {old}, which the trimmed vocabulary drops; keep it.")
    return new_id[old]


def trim_tokenizer(tok_json: dict[str, Any], keep_ids: Iterable[int]) -> tuple[dict[str, Any], list[int]]:
    """A BPE tokenizer.json that keeps ``keep_ids`` (and what they need: see the module docstring).

    Returns:
        The new tokenizer.json and ``order``: the old id of each new id (new id ``i`` was ``order[i]``),
        for slicing embedding rows.

    Raises:
        TokenizerError: Not a BPE model, or a post-processor naming a dropped token.
    """
    model = tok_json.get("model") or {}
    if model.get("type") != "BPE":
        raise TokenizerError(f"Only BPE tokenizers can be trimmed; this one is {model.get('type')!r}.")
    vocab: dict[str, int] = model["vocab"]
    merges = read_merges(model)
    by_id = {i: t for t, i in vocab.items()}
    keep = set(keep_ids)
    kept_tokens = closed_under_merges({by_id[i] for i in keep if i in by_id} | fallback_tokens(tok_json), merges)
    added = [t for t in tok_json.get("added_tokens") or [] if t["id"] in keep]
    order = sorted({vocab[t] for t in kept_tokens} | {t["id"] for t in added})
    new_id = {old: new for new, old in enumerate(order)}
    out = copy.deepcopy({k: v for k, v in tok_json.items() if k not in ("model", "added_tokens")})
    out["added_tokens"] = [{**t, "id": new_id[t["id"]]} for t in added]
    new_model = {k: v for k, v in model.items() if k not in ("vocab", "merges")}
    new_model["vocab"] = {t: new_id[vocab[t]] for t in sorted(kept_tokens, key=vocab.__getitem__)}
    new_model["merges"] = [[a, b] for a, b in merges if a in kept_tokens and b in kept_tokens and a + b in kept_tokens]
    out["model"] = new_model
    if out.get("post_processor") is not None:
        out["post_processor"] = _remap_ids(out["post_processor"], new_id, "post-processor")
    return out, order
