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

    Templates with ``{% generation %}`` blocks (slmforge's) mark the assistant tokens themselves
    (``return_assistant_tokens_mask``). Most published templates have none; for those, each assistant turn
    is the tokens between the conversation rendered up to it (with the generation prompt) and rendered
    through it, which is checked to be a prefix of the whole conversation's tokens.
    """

    def __init__(self, records: list[dict], tokenizer, seq_len: int) -> None:
        if tokenizer.chat_template is None:
            tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE
        marks = any(tag in tokenizer.chat_template for tag in ("{% generation %}", "{%- generation %}"))
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.examples: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.skipped = 0
        for record in records:
            ids, mask = (_marked(tokenizer, record["messages"]) if marks else _by_prefixes(tokenizer, record["messages"]))
            ids, mask = ids[:seq_len], mask[:seq_len]
            if not any(mask):
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


def _marked(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    enc = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    return list(enc["input_ids"]), list(enc["assistant_masks"])


def _tokens(tokenizer, messages: list[dict], prompt: bool) -> list[int]:
    if not messages:
        return []
    enc = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, add_generation_prompt=prompt)
    return list(enc["input_ids"])


def _by_prefixes(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Assistant tokens of a template without generation blocks (see ``ChatExamples``).

    Raises:
        TrainError: A rendered prefix is not a prefix of the whole conversation's tokens (a template that
            rewrites earlier turns), so the assistant's tokens cannot be located.
    """
    ids = _tokens(tokenizer, messages, False)
    mask = [0] * len(ids)
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        start, through = _tokens(tokenizer, messages[:i], True), _tokens(tokenizer, messages[: i + 1], False)
        if ids[: len(through)] != through or through[: len(start)] != start:
            raise TrainError("The chat template renders earlier turns differently once later ones follow, so the "
                             "assistant's tokens cannot be located; add {% generation %} blocks to the template.")
        mask[len(start) : len(through)] = [1] * (len(through) - len(start))
    return ids, mask


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
