"""Batch sources for the training loop: packed token chunks for pretraining and
masked conversations for supervised fine-tuning."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import torch

from slmforge.errors import TrainError


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


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
    """Fixed-length chunks of a token stream; labels are the inputs (the model shifts them)."""

    def __init__(self, stream: np.ndarray, seq_len: int) -> None:
        self.seq_len = seq_len
        n = len(stream) // seq_len
        self.chunks = torch.from_numpy(stream[: n * seq_len].astype(np.int64)).view(n, seq_len)  # (N, T)

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


# Used when a base model's tokenizer has no chat template (e.g. a base model from a GGUF):
# plain role headers and the tokenizer's own end-of-sequence token ending each turn.
FALLBACK_CHAT_TEMPLATE = (
    "{%- if bos_token %}{{ bos_token }}{% endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- 'Assistant: ' }}{%- generation %}{{ message['content'] + eos_token }}{% endgeneration %}{{- '\\n' }}"
    "{%- else %}{{- message['role'] | capitalize + ': ' + message['content'] + '\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- 'Assistant: ' }}{%- endif %}"
)


class ChatExamples:
    """Conversations tokenized with the chat template; loss only on assistant tokens.

    Uses ``return_assistant_tokens_mask``, which needs ``{% generation %}`` blocks in the
    template (slmforge's templates have them).
    """

    def __init__(self, records: list[dict], tokenizer, seq_len: int) -> None:
        if tokenizer.chat_template is None:
            tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.examples: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.skipped = 0
        for record in records:
            enc = tokenizer.apply_chat_template(
                record["messages"], tokenize=True, return_dict=True, return_assistant_tokens_mask=True
            )
            ids = list(enc["input_ids"])[:seq_len]
            mask = list(enc["assistant_masks"])[:seq_len]
            if not any(mask):
                if "{% generation %}" not in tokenizer.chat_template and "{%- generation %}" not in tokenizer.chat_template:
                    raise TrainError(
                        "The tokenizer's chat template has no {% generation %} block, so assistant tokens "
                        "cannot be told apart from the prompt. Use a slmforge tokenizer or add the block."
                    )
                self.skipped += 1  # the answer was cut off entirely by seq_len
                continue
            ids_t = torch.tensor(ids, dtype=torch.long)
            labels = torch.where(torch.tensor(mask, dtype=torch.bool), ids_t, torch.tensor(-100))
            self.examples.append((ids_t, labels))

    def __len__(self) -> int:
        return len(self.examples)

    def batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        items = [self.examples[i] for i in indices]
        width = max(len(ids) for ids, _ in items)
        ids = torch.full((len(items), width), self.pad, dtype=torch.long)  # (B, T), right-padded
        labels = torch.full((len(items), width), -100, dtype=torch.long)
        attn = torch.zeros((len(items), width), dtype=torch.long)
        for row, (x, y) in enumerate(items):
            ids[row, : len(x)] = x
            labels[row, : len(y)] = y
            attn[row, : len(x)] = 1
        return {"input_ids": ids, "attention_mask": attn, "labels": labels}

    def tokens_in(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["attention_mask"].sum())
