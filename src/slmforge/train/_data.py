"""Batch sources for supervised fine-tuning: masked conversations. Pretraining's packed
token chunks (``PackedTokens``) live in ``slmforge.tokenizer.packing``, shared with
compression and evaluation."""

from __future__ import annotations

import torch

from slmforge.errors import TrainError

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
        return right_padded([self.examples[i] for i in indices], self.pad)

    def tokens_in(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["attention_mask"].sum())


def right_padded(items: list[tuple[torch.Tensor, torch.Tensor]], pad: int) -> dict[str, torch.Tensor]:
    """(ids, labels) examples as one batch, right-padded: ``input_ids`` with ``pad``, ``labels`` with -100,
    and the ``attention_mask``."""
    width = max(len(ids) for ids, _ in items)
    ids = torch.full((len(items), width), pad, dtype=torch.long)  # (B, T)
    labels = torch.full((len(items), width), -100, dtype=torch.long)
    attn = torch.zeros((len(items), width), dtype=torch.long)
    for row, (x, y) in enumerate(items):
        ids[row, : len(x)] = x
        labels[row, : len(y)] = y
        attn[row, : len(x)] = 1
    return {"input_ids": ids, "attention_mask": attn, "labels": labels}
