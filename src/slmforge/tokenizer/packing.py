"""Token streams for language modelling: documents tokenized into one stream
(``bos + text + eos`` each, cached as ``.npy``), packed into fixed-length chunks, and the
unigram perplexity floor a model must beat.

Shared by pretraining (train/), the ternary fine-tune and calibration (compress/) and
perplexity and reports (evaluate/), so it sits in the tokenizer layer below all three.
numpy is imported here; torch only by ``PackedTokens``, when it is built.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

__all__ = ["tokenize_documents", "PackedTokens", "unigram_perplexity", "window_bos_id"]

# Model families that expect every sequence to start with BOS (their first position acts as an attention
# sink): a packed window without it scores several times worse than the model is.
_BOS_FAMILIES = ("gemma",)


def window_bos_id(model, tokenizer) -> int | None:
    """The token to start every packed window with for this model (its BOS), or None for models that
    need none (ours, trained on packed windows as they come)."""
    model_type = str(getattr(getattr(model, "config", None), "model_type", "") or "")
    if tokenizer.bos_token_id is not None and model_type.startswith(_BOS_FAMILIES):
        return int(tokenizer.bos_token_id)
    return None


def tokenize_documents(texts: list[str], tokenizer, cache: Path | None = None) -> np.ndarray:
    """One token stream: ``bos + text + eos`` per document, concatenated.

    The stream is cached as ``.npy`` (no pickle) keyed by the texts and the tokenizer,
    so a resumed or re-run training does not tokenize again.
    """
    h = hashlib.sha256()
    h.update(tokenizer.backend_tokenizer.to_str().encode() if hasattr(tokenizer, "backend_tokenizer") else b"")
    for t in texts:
        h.update(hashlib.sha256(t.encode()).digest())
    file = cache / f"tokens-{h.hexdigest()[:16]}.npy" if cache else None
    if file is not None and file.is_file():
        return np.load(file, allow_pickle=False)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    dtype = np.uint16 if len(tokenizer) < 65536 else np.int32
    parts = []
    for start in range(0, len(texts), 512):
        chunk = texts[start : start + 512]
        encoded = tokenizer(chunk, add_special_tokens=False)["input_ids"]
        for ids in encoded:
            doc = ([bos] if bos is not None else []) + ids + ([eos] if eos is not None else [])
            parts.append(np.asarray(doc, dtype=dtype))
    stream = np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)
    if file is not None:
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp = file.with_suffix(".tmp.npy")
        np.save(tmp, stream, allow_pickle=False)
        tmp.replace(file)
    return stream


class PackedTokens:
    """Fixed-length chunks of a token stream; labels are the inputs (the model shifts them).

    With ``window_bos`` every chunk starts with that token followed by ``seq_len - 1`` tokens of the
    stream: models such as Gemma were trained only on sequences that start with BOS and do badly on a
    window that does not (``window_bos_id``), so both their training and their perplexity use this.
    """

    def __init__(self, stream: np.ndarray, seq_len: int, window_bos: int | None = None) -> None:
        import torch

        self.seq_len = seq_len
        body = seq_len - (window_bos is not None)
        n = len(stream) // body
        chunks = torch.from_numpy(stream[: n * body].astype(np.int64)).view(n, body)  # (N, T)
        if window_bos is not None:
            chunks = torch.cat([torch.full((n, 1), window_bos, dtype=torch.int64), chunks], dim=1)
        self.chunks = chunks

    def __len__(self) -> int:
        return self.chunks.shape[0]

    def batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        x = self.chunks[indices]  # (B, T)
        return {"input_ids": x, "labels": x}

    def tokens_in(self, batch: dict[str, torch.Tensor]) -> int:
        return batch["input_ids"].numel()


def unigram_perplexity(train: np.ndarray, val: np.ndarray, vocab_size: int) -> float:
    """Perplexity of an add-one unigram model fitted on ``train``, on ``val``: the floor a
    language model must beat to have learnt anything beyond token frequencies."""
    counts = np.bincount(train.astype(np.int64), minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(math.exp(-logp[val.astype(np.int64)].mean())) if len(val) else float("nan")
