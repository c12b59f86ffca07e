"""The torch half of continuous batching: a ``TorchGenerator``'s model run over the batch's rows.

``BatchEngine`` (serve/_batch.py) schedules, samples and stops; this backend only runs the model: a
prefill of the joining prompts (left-padded together), one decode step for every running row, and the
bookkeeping of the batch's KV cache as rows join and leave. The cache is a transformers ``DynamicCache``
whose rows are merged (left-padded to a common length) when sequences join and selected when they leave,
as early TGI did; the padding columns every row shares are trimmed away. Left padding works here because
the model takes explicit ``position_ids`` and an attention mask over the padding. When every row of a
run decodes plainly greedily, the run is inside ``TorchGenerator.greedy_steps``: the LM head multiplies
in int8 (bf16 without oneDNN's int8 product) and recomputes in fp32 whatever could be a row's argmax (16
rows of Gemma 3 270M's head: 20 ms against 122 ms in fp32, docs/BENCHMARKS.md), the same tokens.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from slmforge.serve._batch import _Seq

BASE_ADAPTER = "__base__"  # peft's name for "no adapter" in a mixed-adapter batch


class TorchBackend:
    """Prefill, decode and cache bookkeeping over a ``TorchGenerator``'s model (see the module docstring)."""

    def __init__(self, generator: Any) -> None:
        self.generator = generator
        self.model = generator.model
        self.device = generator.device
        self.pad_id = generator.pad_token_id if generator.pad_token_id is not None else 0
        self._cache: Any = None
        self._mask: torch.Tensor | None = None  # (B, T) 1 = real token, 0 = left padding
        self._positions: torch.Tensor | None = None  # (B,) position of each row's next token

    @property
    def adapters(self) -> list[str]:
        return self.generator.adapters

    @property
    def vocab_size(self) -> int:
        """Rows of the model's input embedding: the token ids a prompt may hold are 0..vocab_size - 1."""
        return self.model.get_input_embeddings().num_embeddings

    def prefill(self, joining: list[_Seq]) -> torch.Tensor:
        """Run the joining prompts; on success their rows join the batch's cache (after the running rows).

        Returns:
            (len(joining), vocab) logits of each prompt's last token.
        """
        from transformers import DynamicCache

        width = max(len(s.ids) for s in joining)
        ids = torch.full((len(joining), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(joining), width), dtype=torch.long)
        for row, s in enumerate(joining):
            ids[row, width - len(s.ids):] = torch.tensor(s.ids)
            mask[row, width - len(s.ids):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        out = self._forward(ids.to(self.device), mask.to(self.device), positions.to(self.device), cache, joining)
        self._merge(cache, mask, positions[:, -1] + 1)
        return out.logits[:, -1, :]

    def decode(self, seqs: list[_Seq]) -> torch.Tensor:
        """Feed every running row its last token; returns (B, vocab) logits."""
        last = torch.tensor([[s.ids[-1]] for s in seqs], dtype=torch.long)
        self._mask = torch.cat([self._mask, torch.ones((len(seqs), 1), dtype=torch.long)], dim=1)
        out = self._forward(last.to(self.device), self._mask.to(self.device),
                            self._positions.view(-1, 1).to(self.device), self._cache, seqs)
        self._positions = self._positions + 1
        return out.logits[:, -1, :]

    def keep(self, rows: list[int]) -> None:
        """Keep only ``rows`` (indices into the batch, in order)."""
        index = torch.tensor(rows, dtype=torch.long)
        self._mask = self._mask[index]
        self._positions = self._positions[index]
        # Columns that are padding in every remaining row are dead weight in every later step.
        lead = int((self._mask.sum(0) == 0).long().cumprod(0).sum())
        device_index = index.to(self.device)
        for layer in self._cache.layers:
            layer.keys = layer.keys.index_select(0, device_index)[:, :, lead:, :]
            layer.values = layer.values.index_select(0, device_index)[:, :, lead:, :]
        self._mask = self._mask[:, lead:]

    def clear(self) -> None:
        """Forget every row."""
        self._cache, self._mask, self._positions = None, None, None

    def _forward(self, input_ids, attention_mask, position_ids, cache, seqs: list[_Seq]):
        # Every row plain greedy: the model's head may give only each row's argmax exactly (certified).
        plain = all(s.request.params.plain_greedy and s.request.constraint is None and not s.request.logit_bias
                    and s.request.logprobs is None for s in seqs)
        with self.generator.greedy_steps() if plain else contextlib.nullcontext():
            return self._run_model(input_ids, attention_mask, position_ids, cache, seqs)

    def _run_model(self, input_ids, attention_mask, position_ids, cache, seqs: list[_Seq]):
        kwargs = {}
        if self.adapters:
            names = [s.request.adapter or BASE_ADAPTER for s in seqs]
            if any(n != BASE_ADAPTER for n in names):
                kwargs["adapter_names"] = names
            else:
                # peft has no "all base" shortcut in forward; a disabled-adapter context does the same.
                with self.model.disable_adapter():
                    return self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                      cache=cache, use_cache=True, logits_to_keep=1)
        return self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          cache=cache, use_cache=True, logits_to_keep=1, **kwargs)

    def _merge(self, cache, mask: torch.Tensor, positions: torch.Tensor) -> None:
        """Add the prefilled rows to the running batch: left-pad both to one length, stack the rows.

        The joining rows already hold their prompt in ``cache``; their first sampled token is fed at the
        next decode step, like every running row's last token.
        """
        if self._cache is None:
            self._cache, self._mask, self._positions = cache, mask, positions
            return
        width = max(self._mask.shape[1], mask.shape[1])
        for old_layer, new_layer in zip(self._cache.layers, cache.layers, strict=True):
            old_layer.keys = _left_pad(old_layer.keys, width)
            old_layer.values = _left_pad(old_layer.values, width)
            old_layer.keys = torch.cat([old_layer.keys, _left_pad(new_layer.keys, width)], dim=0)
            old_layer.values = torch.cat([old_layer.values, _left_pad(new_layer.values, width)], dim=0)
        self._mask = torch.cat([_left_pad_mask(self._mask, width), _left_pad_mask(mask, width)], dim=0)
        self._positions = torch.cat([self._positions, positions])


def _left_pad(t: torch.Tensor, width: int) -> torch.Tensor:
    """(B, H, T, D) -> (B, H, width, D), zeros on the left (masked out)."""
    missing = width - t.shape[2]
    if missing <= 0:
        return t
    pad = torch.zeros((t.shape[0], t.shape[1], missing, t.shape[3]), dtype=t.dtype, device=t.device)
    return torch.cat([pad, t], dim=2)


def _left_pad_mask(m: torch.Tensor, width: int) -> torch.Tensor:
    missing = width - m.shape[1]
    if missing <= 0:
        return m
    return torch.cat([torch.zeros((m.shape[0], missing), dtype=m.dtype), m], dim=1)
