"""Token streams for language modelling: documents tokenized into one stream
(``bos + text + eos`` each, cached as ``.npy``), packed into fixed-length chunks, and the
unigram perplexity floor a model must beat.

Shared by pretraining (train/), the ternary fine-tune and calibration (compress/) and
perplexity and reports (evaluate/), so it sits in the tokenizer layer below all three.
numpy is imported here; torch only by ``PackedTokens``, when it is built.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

__all__ = ["tokenize_documents", "TextSource", "jsonl_texts", "PackedTokens", "unigram_perplexity", "window_bos_id"]

# Model families that expect every sequence to start with BOS (their first position acts as an attention
# sink): a packed window without it scores several times worse than the model is.
_BOS_FAMILIES = ("gemma",)
_CHUNK_DOCS = 512  # documents tokenized at a time


def window_bos_id(model, tokenizer) -> int | None:
    """The token to start every packed window with for this model (its BOS), or None for models that
    need none (ours, trained on packed windows as they come)."""
    model_type = str(getattr(getattr(model, "config", None), "model_type", "") or "")
    if tokenizer.bos_token_id is not None and model_type.startswith(_BOS_FAMILIES):
        return int(tokenizer.bos_token_id)
    return None


class TextSource:
    """Texts read again from where they live each time they are iterated: the stand-in for a list of texts
    that may not fit in memory (``tokenize_documents`` with a cache reads its texts twice: once for the
    cache key, once to tokenize)."""

    def __init__(self, make: Callable[[], Iterable[str]]) -> None:
        self._make = make

    def __iter__(self) -> Iterator[str]:
        return iter(self._make())


def jsonl_texts(path: Path, field: str = "text") -> TextSource:
    """The ``field`` of every record of a JSONL split (``data.iter_jsonl``), read from disk on each pass."""
    from slmforge.data import iter_jsonl

    return TextSource(lambda: (r[field] for r in iter_jsonl(path)))


def _token_chunks(texts: Iterable[str], tokenizer: Any, dtype: type, max_tokens: int | None) -> Iterator[np.ndarray]:
    """The stream, 512 documents (``bos + text + eos`` each) at a time; stops after the chunk that reaches
    ``max_tokens``."""
    prefix = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    suffix = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    docs, total = iter(texts), 0
    while chunk := list(itertools.islice(docs, _CHUNK_DOCS)):
        encoded = tokenizer(chunk, add_special_tokens=False)["input_ids"]
        tokens = np.concatenate([np.asarray(prefix + ids + suffix, dtype=dtype) for ids in encoded])
        del chunk, encoded  # not alive while the next chunk is tokenized
        yield tokens
        total += tokens.size
        if max_tokens is not None and total >= max_tokens:
            return


def _write_npy(file: Path, chunks: Iterable[np.ndarray], dtype: type) -> None:
    """``chunks`` as one 1-D ``.npy`` file, the same bytes ``np.save`` writes for their concatenation, never
    holding more than one chunk: the data go to a scratch file first, since the header names the length."""
    file.parent.mkdir(parents=True, exist_ok=True)
    raw, tmp = (file.with_name(f"{file.stem}.{os.getpid()}.{ext}") for ext in ("tmp.raw", "tmp.npy"))
    n = 0
    with open(raw, "wb") as f:
        for tokens in chunks:
            tokens.tofile(f)
            n += tokens.size
    with open(tmp, "wb") as out, open(raw, "rb") as f:
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": (n,)}
        np.lib.format.write_array_header_1_0(out, header)
        shutil.copyfileobj(f, out, 1 << 16)
    raw.unlink()
    tmp.replace(file)


def tokenize_documents(texts: Iterable[str], tokenizer: Any, cache: Path | None = None,
                       max_tokens: int | None = None) -> np.ndarray:
    """One token stream: ``bos + text + eos`` per document, concatenated; tokenized 512 documents at a time.

    Args:
        texts: The documents. With ``cache`` they are read twice (the key, then the tokens): a list or a
            ``TextSource`` (``jsonl_texts``), not an iterator.
        cache: A folder: the stream is cached there as ``.npy`` (no pickle) keyed by the texts and the
            tokenizer, so a resumed or re-run training does not tokenize again; it is written a chunk at a
            time and returned memory-mapped, so memory does not grow with the corpus. Without it the stream is
            built in memory.
        max_tokens: Stop reading ``texts`` once the stream has this many tokens (it may have a few more: the
            rest of the last 512 documents). Not with ``cache``.
    """
    dtype = np.uint16 if len(tokenizer) < 65536 else np.int32
    if cache is None:
        parts = list(_token_chunks(texts, tokenizer, dtype, max_tokens))
        return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)
    if max_tokens is not None or iter(texts) is texts:
        raise TypeError("tokenize_documents with a cache reads every text twice: pass a list or a TextSource")
    h = hashlib.sha256()
    h.update(tokenizer.backend_tokenizer.to_str().encode() if hasattr(tokenizer, "backend_tokenizer") else b"")
    for t in texts:
        h.update(hashlib.sha256(t.encode()).digest())
    file = cache / f"tokens-{h.hexdigest()[:16]}.npy"
    if not file.is_file():
        _write_npy(file, _token_chunks(texts, tokenizer, dtype, None), dtype)
    stream = np.load(file, mmap_mode="r", allow_pickle=False)
    return stream if stream.size else np.zeros(0, dtype=dtype)


class PackedTokens:
    """Fixed-length chunks of a token stream; labels are the inputs (the model shifts them).

    With ``window_bos`` every chunk starts with that token followed by ``seq_len - 1`` tokens of the
    stream: models such as Gemma were trained only on sequences that start with BOS and do badly on a
    window that does not (``window_bos_id``), so both their training and their perplexity use this.

    The stream stays as it is given (memory-mapped from the token cache in training): a batch's chunks are
    cut from it when asked for, so a training run holds a batch, not the corpus, as 64-bit ids.
    """

    def __init__(self, stream: np.ndarray, seq_len: int, window_bos: int | None = None) -> None:
        self.seq_len = seq_len
        self._stream, self._bos = stream, window_bos
        self._body = seq_len - (window_bos is not None)
        self._n = len(stream) // self._body

    def __len__(self) -> int:
        return self._n

    def _rows(self, indices: list[int]) -> torch.Tensor:
        import torch

        body = self._body
        rows = np.empty((len(indices), body), dtype=np.int64)  # (B, body)
        for r, i in enumerate(indices):
            if not 0 <= i < self._n:
                raise IndexError(f"chunk {i} of {self._n}")
            rows[r] = self._stream[i * body : (i + 1) * body]
        x = torch.from_numpy(rows)
        if self._bos is not None:
            x = torch.cat([torch.full((len(indices), 1), self._bos, dtype=torch.int64), x], dim=1)
        return x  # (B, T)

    @property
    def chunks(self) -> torch.Tensor:
        """Every chunk, one (N, T) tensor of 64-bit ids: for held-out sets and tests, not a training corpus."""
        return self._rows(list(range(self._n)))

    def batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        x = self._rows(indices)  # (B, T)
        return {"input_ids": x, "labels": x}

    def tokens_in(self, batch: dict[str, torch.Tensor]) -> int:
        return batch["input_ids"].numel()


def unigram_perplexity(train: np.ndarray, val: np.ndarray, vocab_size: int) -> float:
    """Perplexity of an add-one unigram model fitted on ``train``, on ``val``: the floor a
    language model must beat to have learnt anything beyond token frequencies."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for start in range(0, len(train), 1 << 22):  # a memory-mapped stream, a block at a time
        block = np.bincount(train[start : start + (1 << 22)].astype(np.int64), minlength=vocab_size)
        if block.size > counts.size:
            counts = np.concatenate([counts, np.zeros(block.size - counts.size, dtype=np.int64)])
        counts[: block.size] += block
    smoothed = counts.astype(np.float64) + 1.0
    logp = np.log(smoothed / smoothed.sum())
    return float(math.exp(-logp[val.astype(np.int64)].mean())) if len(val) else float("nan")
