"""Evaluation. For now: held-out perplexity and bits per byte, the numbers the
pipeline report needs; suites, metrics and comparisons build on this package.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["Perplexity", "perplexity"]


@dataclass
class Perplexity:
    """Language-model quality on held-out text."""

    ppl: float  # exp(mean negative log-likelihood per token)
    nll: float  # nats per token
    bits_per_byte: float  # tokenizer-independent: total bits / UTF-8 bytes of the text
    tokens: int
    bytes: int


def perplexity(model, tokenizer, texts: Iterable[str], seq_len: int = 256, batch_size: int = 8,
               max_tokens: int | None = 200_000) -> Perplexity:
    """Perplexity of a causal LM on texts, packed into windows of ``seq_len`` tokens.

    Each document is ``bos + text + eos``; windows do not overlap, so early tokens of
    a window see less context (the usual, slightly pessimistic, packed estimate). Models that need
    BOS at the start of every sequence (Gemma) get it at the start of every window (``window_bos_id``).
    """
    import torch

    from slmforge.tokenizer.packing import PackedTokens, tokenize_documents, window_bos_id

    stream = tokenize_documents(texts, tokenizer, max_tokens=max_tokens)  # reads only the texts it uses
    if max_tokens is not None:
        stream = stream[:max_tokens]
    windows = PackedTokens(stream, seq_len, window_bos_id(model, tokenizer)).chunks  # (N, T)
    n = len(windows)
    if n == 0:
        raise ValueError(f"held-out text has {len(stream)} tokens, fewer than one window of {seq_len}")
    device = next(model.parameters()).device
    model.eval()
    total_nll, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, n, batch_size):
            x = windows[start : start + batch_size].to(device)
            logits = model(input_ids=x).logits[:, :-1].float()  # (B, T-1, V)
            nll = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum"
            )
            total_nll += float(nll)
            count += x[:, 1:].numel()
    used_text_bytes = _bytes_of_tokens(tokenizer, windows[:, 1:])
    mean = total_nll / count
    return Perplexity(
        ppl=math.exp(min(mean, 50)),
        nll=mean,
        bits_per_byte=total_nll / math.log(2) / max(used_text_bytes, 1),
        tokens=count,
        bytes=used_text_bytes,
    )


def _bytes_of_tokens(tokenizer, ids) -> int:
    """UTF-8 bytes the predicted tokens spell (special tokens count zero)."""
    text = tokenizer.batch_decode(ids.tolist(), skip_special_tokens=True)
    return sum(len(t.encode("utf-8")) for t in text)
