"""Fill-in-the-middle (FIM): the sentinel tokens, the training transform and the prompt.

A FIM example is a piece of code cut at two random character positions into
prefix, middle and suffix and rearranged as

    <|fim_prefix|>prefix<|fim_suffix|>suffix<|fim_middle|>middle<eos>

("PSM", Bavarian et al. 2022, "Efficient Training of Language Models to Fill in
the Middle"). The model learns to write the middle after seeing both sides, then
to stop. At inference the prompt is the same up to ``<|fim_middle|>``. The
sentinels are Qwen2.5-Coder's names; StarCoder's (``<fim_prefix>`` ...) are
recognised in models that bring them.

    >>> fim_text("abcdef", 2, 4, ("<P>", "<S>", "<M>"))
    '<P>ab<S>ef<M>cd'
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator

__all__ = ["FIM_TOKENS", "fim_sentinels", "add_fim_tokens", "fim_text", "fim_documents", "iter_fim_documents", "fim_prompt",
           "tokenizer_fim_prompt", "FIM_FAMILIES"]

FIM_TOKENS = ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>")
FIM_FAMILIES = (FIM_TOKENS, ("<fim_prefix>", "<fim_suffix>", "<fim_middle>"))


def fim_sentinels(tokenizer) -> tuple[str, str, str] | None:
    """The (prefix, suffix, middle) sentinels the tokenizer has as whole tokens, or None."""
    vocab = tokenizer.get_vocab()
    for family in FIM_FAMILIES:
        if all(t in vocab for t in family):
            return family
    return None


def add_fim_tokens(tokenizer) -> int:
    """Give a tokenizer the FIM sentinels as special tokens when it has none; the number added (the model's
    embeddings must then grow by as many rows)."""
    if fim_sentinels(tokenizer) is not None:
        return 0
    return int(tokenizer.add_special_tokens({"extra_special_tokens": list(FIM_TOKENS)},
                                            replace_extra_special_tokens=False))


def fim_text(text: str, i: int, j: int, sentinels: tuple[str, str, str]) -> str:
    """``text`` cut at characters ``i <= j`` into prefix, middle, suffix and written in PSM order."""
    pre, suf, mid = sentinels
    return f"{pre}{text[:i]}{suf}{text[j:]}{mid}{text[i:j]}"


def _pieces(text: str, max_chars: int) -> list[str]:
    """``text`` in consecutive runs of whole lines of at most about ``max_chars`` characters."""
    out: list[str] = []
    current = ""
    for line in text.splitlines(keepends=True):
        if current and len(current) + len(line) > max_chars:
            out.append(current)
            current = ""
        current += line
    return out + ([current] if current else [])


def iter_fim_documents(texts: Iterable[str], rate: float, sentinels: tuple[str, str, str], max_chars: int,
                       seed: int = 0) -> Iterator[str]:
    """Training documents with FIM: each text is cut into pieces of whole lines that fit a training window
    (``max_chars``), and each piece becomes a FIM example with probability ``rate`` (else it stays as is);
    yielded one at a time, so a corpus larger than memory streams through.

    Cutting first matters: a FIM example longer than the window would rarely show the model a suffix and
    the middle it conditions in one sequence. The same texts, rate and seed give the same documents (a
    resumed run reads the same stream).
    """
    rng = random.Random(seed)
    for text in texts:
        for piece in _pieces(text, max_chars) if rate > 0 else [text]:
            if rate > 0 and len(piece) > 1 and rng.random() < rate:
                i, j = sorted(rng.randint(0, len(piece)) for _ in range(2))
                piece = fim_text(piece, i, j, sentinels)
            yield piece


def fim_documents(texts: Iterable[str], rate: float, sentinels: tuple[str, str, str], max_chars: int,
                  seed: int = 0) -> list[str]:
    """``iter_fim_documents`` as a list."""
    return list(iter_fim_documents(texts, rate, sentinels, max_chars, seed))


def fim_prompt(prefix: str, suffix: str, sentinels: tuple[str, str, str]) -> str:
    """The prompt that asks a FIM-trained model for the code between ``prefix`` and ``suffix``."""
    pre, suf, mid = sentinels
    return f"{pre}{prefix}{suf}{suffix}{mid}"


def tokenizer_fim_prompt(tokenizer, prefix: str, suffix: str) -> str | None:
    """``fim_prompt`` with the tokenizer's own sentinels; None when it has none (a model not trained for FIM)."""
    sentinels = fim_sentinels(tokenizer)
    return None if sentinels is None else fim_prompt(prefix, suffix, sentinels)
