"""The ONNX Runtime half of continuous batching: an ``OnnxGenerator``'s graph run over the batch's rows.

``BatchEngine`` (serve/_batch.py) schedules, samples and stops; this backend runs the decoder graph that
onnxruntime-genai's builder writes (``slmforge export onnx``): GroupQueryAttention (GQA) in every layer,
its KV cache one buffer per layer that is both the past input and the present output (written in place).

How GQA sees a batch (ONNX Runtime's CPU kernel, contrib_ops/cpu/bert/group_query_attention.cc and
gqa_attention_base.h): the builder's graph derives ``seqlens_k`` = sum(attention_mask, axis 1) - 1 and
``total_sequence_length`` = the mask's width. For each row b the kernel takes its own length
``seqlens_k[b] + 1``; in a decode step (one new token per row) it writes the row's new key/value at
position ``seqlens_k[b]`` of that row's buffer, attends to positions ``0..seqlens_k[b]``, and rotates the
query and key by that same position. In a first prompt (``sequence_length == total_sequence_length``)
every row's positions are ``0..S-1``. So the layout is **right padding**: each row's cache starts at 0
and runs to its own length, its mask is ones over that length then zeros, and rows of different lengths
decode together with nothing to shift. Left padding (what the torch backend does) would give the padded
rows wrong rotary positions and write their new keys after the padding. A first prompt cannot be padded
at all: ONNX Runtime 1.32 refuses a row shorter than the step ("seqlens_k[0] = 34 is too small for
sequence_length 45"), so joining prompts are prefilled together only with prompts of their own length,
each group in fresh buffers, and their rows are then appended to the running batch's buffers.

Sliding-window layers (Gemma 3) take ``local_window_size``: the kernel masks positions more than a window
behind. ONNX Runtime wants their buffers at least a window long; the single-sequence ``Decoder`` also
caps them at two windows and lets the kernel drop old positions, but that compaction moves a row's
positions, so here every buffer holds each row's whole sequence (at least a window): rows never move,
and the window is applied by the mask alone.

Buffers grow as the longest row grows (doubling, up to the context length), not to prompt + max_tokens
up front: a request that allows 32k tokens costs memory only for what it writes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import onnxruntime as ort
import torch

from slmforge.errors import GenerateError

if TYPE_CHECKING:
    from slmforge.serve._batch import _Seq

_NUMPY_OF_ORT_TYPE = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
PREFILL_LOGITS_BYTES = 256 * 2**20  # the graph returns logits for every prompt position: bound that buffer
_MIN_CAPACITY = 64


class OnnxBackend:
    """Prefill, decode and cache bookkeeping over an ``OnnxGenerator``'s session (see the module docstring).

    Raises:
        GenerateError: The graph has no GroupQueryAttention with a shared past/present buffer (an ONNX file
            not written by onnxruntime-genai's builder); serve it without batching.
    """

    adapters: list[str] = []

    def __init__(self, generator: Any) -> None:
        layout = generator.layout
        if not layout.share_buffer:
            raise GenerateError(
                f"{layout.onnx_file}: batched decoding needs the GroupQueryAttention graphs of "
                "`slmforge export onnx` (genai_config.json search.past_present_share_buffer); this one has "
                "not. Re-export the model, or serve it with max_batch_size 1 through another engine."
            )
        self.session, self.layout = generator.session, layout
        self.vocab_size = layout.vocab_size
        types = {i.name: i.type for i in self.session.get_inputs()}
        self.kv_dtype = _NUMPY_OF_ORT_TYPE.get(types[layout.cache_names()[0][0]], np.float32)
        out_types = {o.name: o.type for o in self.session.get_outputs()}
        self.logits_dtype = _NUMPY_OF_ORT_TYPE.get(out_types.get(layout.logits, ""), np.float32)
        self.binding = self.session.io_binding()
        self.clear()

    # ------------------------------------------------------------------ the backend

    def clear(self) -> None:
        """Forget every row (and free the buffers)."""
        self.cache: list[np.ndarray] = []  # (B, kv_heads, capacity, head_size) per cache name
        self.values: list[ort.OrtValue] = []  # the same memory, as ONNX Runtime sees it
        self.lengths = np.zeros(0, np.int64)  # positions in each row's cache
        self.capacity = 0
        self.step_out = np.zeros(0, self.logits_dtype)  # (B, 1, vocab): the decode step's logits
        self.step_logits: ort.OrtValue | None = None  # the same memory, as ONNX Runtime sees it

    def prefill(self, joining: list[_Seq]) -> torch.Tensor:
        """Run the joining prompts (prompts of one length together, in groups whose logits fit
        ``PREFILL_LOGITS_BYTES``); on success their rows join the running batch's buffers after the running
        rows, in ``joining``'s order. Returns (n, vocab) last-token logits."""
        lengths = [len(s.ids) for s in joining]
        capacity = self._capacity_for(max(lengths) + 1)
        by_length: dict[int, list[int]] = {}
        for row, n in enumerate(lengths):
            by_length.setdefault(n, []).append(row)
        order, caches, last = [], [], []
        for n, rows in by_length.items():
            group = max(1, PREFILL_LOGITS_BYTES // (n * self.vocab_size * 4))
            for start in range(0, len(rows), group):
                part = rows[start:start + group]
                cache, logits = self._prefill_group([joining[r] for r in part], capacity)
                order += part
                caches.append(cache)
                last.append(logits)
        back = np.argsort(np.asarray(order))  # rows back in joining's order
        merged = [np.concatenate(layer, axis=0)[back] for layer in zip(*caches, strict=True)]
        self._append([merged], capacity, np.asarray(lengths, np.int64))
        return torch.from_numpy(np.concatenate(last, axis=0)[back])

    def decode(self, seqs: list[_Seq]) -> torch.Tensor:
        """Feed every row its last token at its own length; returns (B, vocab) logits."""
        rows = len(seqs)
        if int(self.lengths.max()) + 1 > self.capacity:
            self._grow(self._capacity_for(int(self.lengths.max()) + 1))
        ids = np.asarray([[s.ids[-1]] for s in seqs], np.int64)
        width = int(self.lengths.max()) + 1
        mask = (np.arange(width)[None, :] <= self.lengths[:, None]).astype(np.int64)  # (B, width), right padding
        if self.step_logits is None:
            self._bind_cache()
            self.step_out = np.zeros((rows, 1, self.vocab_size), self.logits_dtype)
            self.step_logits = ort.OrtValue.ortvalue_from_numpy(self.step_out)
        b, lay = self.binding, self.layout
        b.bind_cpu_input(lay.input_ids, ids)
        b.bind_cpu_input(lay.attention_mask, mask)
        b.bind_ortvalue_output(lay.logits, self.step_logits)
        self._run(b)
        self.lengths = self.lengths + 1
        return torch.from_numpy(self.step_out[:, 0, :].astype(np.float32))  # a copy: overwritten next step

    def keep(self, rows: list[int]) -> None:
        """Keep only ``rows`` (indices into the batch, in order)."""
        index = np.asarray(rows, np.int64)
        self._set_cache([np.ascontiguousarray(c[index]) for c in self.cache], self.capacity)
        self.lengths = self.lengths[index]

    # ------------------------------------------------------------------ buffers

    def _capacity_for(self, positions: int) -> int:
        """Full-attention buffer length for rows ``positions`` long: doubling from 64, within the context."""
        if positions > self.layout.context_length:
            raise GenerateError(f"{positions} positions asked for; the model was exported for "
                                f"{self.layout.context_length}.")
        capacity = max(self.capacity, _MIN_CAPACITY)
        while capacity < positions:
            capacity *= 2
        return min(capacity, self.layout.context_length)

    def _layer_length(self, name_index: int, capacity: int) -> int:
        layer = name_index // 2  # keys then values of each layer
        return max(capacity, self.layout.sliding_window) if layer in self.layout.sliding_layers else capacity

    def _zeros(self, rows: int, capacity: int) -> list[np.ndarray]:
        lay = self.layout
        return [np.zeros((rows, lay.num_kv_heads, self._layer_length(i, capacity), lay.head_size), self.kv_dtype)
                for i in range(len(lay.cache_names()))]

    def _set_cache(self, cache: list[np.ndarray], capacity: int) -> None:
        """New buffers: ONNX Runtime reads and writes the numpy arrays' own memory (CPU OrtValues wrap it)."""
        self.cache, self.capacity = cache, capacity
        self.values = [ort.OrtValue.ortvalue_from_numpy(c) for c in cache]
        self.step_logits = None  # rebind the cache and the logits at the next decode step

    def _grow(self, capacity: int) -> None:
        grown = self._zeros(len(self.lengths), capacity)
        for new, old in zip(grown, self.cache, strict=True):
            new[:, :, :old.shape[2]] = old
        self._set_cache(grown, capacity)

    def _append(self, caches: list[list[np.ndarray]], capacity: int, lengths: np.ndarray) -> None:
        if capacity > self.capacity and self.cache:
            self._grow(capacity)
        parts = [self.cache, *caches] if self.cache else caches
        self._set_cache([np.concatenate(layer, axis=0) for layer in zip(*parts, strict=True)], capacity)
        self.lengths = np.concatenate([self.lengths, lengths])

    def _bind_cache(self) -> None:
        for (past, present), value in zip(self.layout.cache_names(), self.values, strict=True):
            self.binding.bind_ortvalue_input(past, value)
            self.binding.bind_ortvalue_output(present, value)  # the same buffer: updated in place

    # ------------------------------------------------------------------ runs

    def _prefill_group(self, part: list[_Seq], capacity: int) -> tuple[list[np.ndarray], np.ndarray]:
        """One first-prompt run of ``part`` (prompts of one length), into fresh buffers. Returns them and
        the (rows, vocab) logits of each prompt's last token."""
        lay = self.layout
        ids = np.asarray([s.ids for s in part], np.int64)  # (rows, S)
        width = ids.shape[1]
        cache = self._zeros(len(part), capacity)
        b = self.session.io_binding()
        b.bind_cpu_input(lay.input_ids, ids)
        mask = np.ones_like(ids)  # kept alive until the run: the binding points at this memory
        b.bind_cpu_input(lay.attention_mask, mask)
        out = np.zeros((len(part), width, self.vocab_size), self.logits_dtype)
        logits = ort.OrtValue.ortvalue_from_numpy(out)  # CPU: ONNX Runtime writes into ``out`` itself
        b.bind_ortvalue_output(lay.logits, logits)
        # Every OrtValue (and numpy array) bound stays referenced until the run: a binding holds no Python
        # reference, and an OrtValue collected before the run gives wrong numbers rather than an error.
        values = [ort.OrtValue.ortvalue_from_numpy(buffer) for buffer in cache]
        for (past, present), value in zip(lay.cache_names(), values, strict=True):
            b.bind_ortvalue_input(past, value)
            b.bind_ortvalue_output(present, value)
        self._run(b)
        return cache, out[:, -1].astype(np.float32)  # (rows, vocab), a copy

    def _run(self, binding: Any) -> None:
        try:
            self.session.run_with_iobinding(binding)
        except Exception as exc:  # onnxruntime's own error classes derive from Exception alone
            raise GenerateError(f"ONNX Runtime failed to run {self.layout.onnx_file.name}: {str(exc)[:500]}") from None
