"""Fill-in-the-middle (FIM): the sentinel tokens, the training transform and the prompt.

A FIM example is a piece of code cut at two places into prefix, middle and
suffix and rearranged in one of the two orders of Bavarian et al. 2022
("Efficient Training of Language Models to Fill in the Middle"):

    PSM  <|fim_prefix|>prefix<|fim_suffix|>suffix<|fim_middle|>middle<eos>
    SPM  <|fim_prefix|><|fim_suffix|>suffix<|fim_middle|>prefix middle<eos>

The model learns to write the middle after seeing both sides, then to stop.
``FimWindows`` makes the examples from training windows; at inference the
prompt is the same up to where the middle starts. The sentinels are
Qwen2.5-Coder's names; StarCoder's (``<fim_prefix>`` ...) are recognised in
models that bring them, and such models use PSM, the order they were trained
in. A model that gets its sentinels here (``add_fim_tokens``) is trained in SPM,
recorded as ``fim_order`` in its tokenizer_config.json (and GGUF metadata): in
SPM the middle continues the prefix, as in plain completion, so a base model
that has never seen the sentinels starts from what it already does well and
learns to use the suffix and to stop. (PSM on Gemma 3 270M, 80 steps: after
``<|fim_middle|>`` the model went on from the suffix, not the prefix.)

    >>> fim_text("abcdef", 2, 4, ("<P>", "<S>", "<M>"))
    '<P>ab<S>ef<M>cd'
    >>> fim_text("abcdef", 2, 4, ("<P>", "<S>", "<M>"), "spm")
    '<P><S>ef<M>abcd'
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["FIM_TOKENS", "fim_sentinels", "fim_order", "add_fim_tokens", "fim_text", "FimWindows", "fim_prompt",
           "tokenizer_fim_prompt", "FIM_FAMILIES"]

FIM_TOKENS = ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>")
FIM_FAMILIES = (FIM_TOKENS, ("<fim_prefix>", "<fim_suffix>", "<fim_middle>"))
_LINE_SHARE = 0.5  # of the FIM examples, those cut around whole lines (the rest at two random characters)


def fim_sentinels(tokenizer) -> tuple[str, str, str] | None:
    """The (prefix, suffix, middle) sentinels the tokenizer has as whole tokens, or None. (Looked up a token at
    a time: ``get_vocab()`` builds Gemma's 262k-entry dict, a quarter of a second on every FIM request.)"""
    unknown = getattr(tokenizer, "unk_token_id", None)
    for family in FIM_FAMILIES:
        ids = tokenizer.convert_tokens_to_ids(list(family))
        if all(i is not None and i != unknown for i in ids):
            return family
    return None


def fim_order(tokenizer) -> str:
    """The order a FIM model was trained in: ``spm`` when its sentinels were added here, else ``psm``."""
    order = getattr(tokenizer, "init_kwargs", {}).get("fim_order", "psm")
    return "spm" if order == "spm" else "psm"


def add_fim_tokens(tokenizer) -> int:
    """Give a tokenizer the FIM sentinels as special tokens when it has none, in SPM order (saved with the
    tokenizer); the number added (the model's embeddings must then grow by as many rows)."""
    if fim_sentinels(tokenizer) is not None:
        return 0
    tokenizer.init_kwargs["fim_order"] = "spm"
    return int(tokenizer.add_special_tokens({"extra_special_tokens": list(FIM_TOKENS)},
                                            replace_extra_special_tokens=False))


def fim_text(text: str, i: int, j: int, sentinels: tuple[str, str, str], order: str = "psm") -> str:
    """``text`` cut at characters ``i <= j`` into prefix, middle, suffix and written in ``order``."""
    return fim_prompt(text[:i], text[j:], sentinels, order) + text[i:j]


class FimWindows:
    """Training windows with fill-in-the-middle applied inside each window.

    Each window of ``windows`` (a ``PackedTokens``) is split at its document separators (BOS, EOS); each
    piece between them becomes, with probability ``rate``, a FIM example in the tokenizer's order (the EOS
    that followed the piece now ends the middle). This is Megatron-LM's FIM as used for SantaCoder and StarCoder:
    every example lies whole in one window, so the model always sees both sides and the middle they frame.
    (Cutting the text into pieces before packing, as this did first, left about nine in ten examples split
    across two windows, and Gemma 3 270M did not learn to fill gaps in 80 steps.) As there, a piece is cut
    in its text and each part tokenized on its own, as a FIM prompt is at inference, so a gap may start or
    end inside what would otherwise be one token. An example is longer than its piece by its three
    sentinels (and a token or two where a cut falls inside a token): the window grows by as much rather
    than lose the end of a middle and the EOS that ends it, and a batch is padded to its longest window
    with EOS that the loss ignores (label -100).

    Half the examples cut at two random characters; the other half take a run of one to three whole lines
    without the newline that ends them, so the suffix starts with that newline: what an editor asks for
    with the cursor at the start of a line, and what the next-line suite measures. A window's pieces are
    drawn from a generator seeded by ``(seed, index)``, so a resumed run sees the same batches.
    """

    def __init__(self, windows: Any, rate: float, tokenizer: Any, seed: int = 0) -> None:
        sentinels = fim_sentinels(tokenizer)
        if sentinels is None:
            raise ValueError("FimWindows needs a tokenizer with FIM sentinels (add_fim_tokens)")
        self.windows, self.rate, self.seed, self._tok = windows, rate, seed, tokenizer
        self._order = fim_order(tokenizer)
        self.seq_len = windows.seq_len
        self._sentinels = [np.array([i], dtype=np.int64) for i in tokenizer.convert_tokens_to_ids(list(sentinels))]
        ids = (tokenizer.bos_token_id, tokenizer.eos_token_id)
        self._separators = np.array(sorted({i for i in ids if i is not None}), dtype=np.int64)
        self._pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0

    def __len__(self) -> int:
        return len(self.windows)

    def batch(self, indices: list[int]) -> dict[str, Any]:
        import torch

        x = self.windows.batch(indices)["input_ids"]  # (B, T)
        rows = [self.window(x[r].numpy(), i) for r, i in enumerate(indices)]
        width = max(len(r) for r in rows)
        ids = np.full((len(rows), width), self._pad, dtype=np.int64)  # (B, T'), T' >= T
        labels = np.full((len(rows), width), -100, dtype=np.int64)
        for r, row in enumerate(rows):
            ids[r, : len(row)] = labels[r, : len(row)] = row
        return {"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(labels)}

    def tokens_in(self, batch: dict[str, Any]) -> int:
        """The corpus tokens the batch's windows hold (tokens/s and epochs count the corpus, not sentinels)."""
        return int(batch["input_ids"].shape[0]) * self.seq_len

    def window(self, ids: np.ndarray, index: int) -> np.ndarray:
        """Window ``index`` (its token ids ``ids``) with some of its pieces rearranged."""
        rng = np.random.default_rng((self.seed, index))
        cuts = np.flatnonzero(np.isin(ids, self._separators))
        out, start = [], 0
        for end in [*cuts.tolist(), len(ids)]:
            piece = ids[start:end]
            out.append(self._rearranged(piece, rng) if len(piece) > 1 and rng.random() < self.rate else piece)
            out.append(ids[end:end + 1])  # the separator (nothing after the last piece)
            start = end + 1
        return np.concatenate(out).astype(np.int64)

    def _rearranged(self, piece: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        text = self._tok.decode(piece.tolist(), clean_up_tokenization_spaces=False)
        n = len(text)
        ends = [k for k, c in enumerate(text) if c == "\n"]
        if ends and rng.random() < _LINE_SHARE:  # one to three whole lines, without the newline that ends them
            starts = [0] + [e + 1 for e in ends if e + 1 < n]
            i = starts[int(rng.integers(len(starts)))]
            after = [e for e in ends if e >= i]
            j = after[min(int(rng.integers(1, 4)), len(after)) - 1] if after else n
        else:
            i, j = sorted(int(v) for v in rng.integers(0, n + 1, size=2))
        parts = self._tok([text[:i], text[j:], text[i:j]], add_special_tokens=False)["input_ids"]
        before, after_gap, middle = (np.array(ids, dtype=np.int64) for ids in parts)
        pre, suf, mid = self._sentinels
        if self._order == "spm":
            return np.concatenate([pre, suf, after_gap, mid, before, middle])
        return np.concatenate([pre, before, suf, after_gap, mid, middle])


def fim_prompt(prefix: str, suffix: str, sentinels: tuple[str, str, str], order: str = "psm") -> str:
    """The prompt that asks a FIM-trained model for the code between ``prefix`` and ``suffix``."""
    pre, suf, mid = sentinels
    return f"{pre}{suf}{suffix}{mid}{prefix}" if order == "spm" else f"{pre}{prefix}{suf}{suffix}{mid}"


def tokenizer_fim_prompt(tokenizer, prefix: str, suffix: str) -> str | None:
    """``fim_prompt`` with the tokenizer's own sentinels and order; None when it has none (a model not
    trained for FIM)."""
    sentinels = fim_sentinels(tokenizer)
    return None if sentinels is None else fim_prompt(prefix, suffix, sentinels, fim_order(tokenizer))
