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

The buffers have a row per slot; the running rows hold slots 0..B-1 (in any order: ``slot_of`` maps the
scheduler's rows to them), so a step binds the first B rows, a contiguous view, and nothing is copied
per step. A joining group is prefilled straight into its free slots; a row that leaves gives its slot to
the last one (one row's used positions copied). Buffers grow as the batch and its longest row grow
(doubling, up to ``max_rows`` and the context length), not to prompt + max_tokens up front: a request
that allows 32k tokens costs memory only for what it writes.

The builder's graph computes the logits of every position fed, which a prompt does not need: for Gemma
3's 262k vocabulary the output layer is a third of the model's multiply-adds per token, so a 25-token
prompt cost as much as 25 decode rows. The backend runs its own session over a copy of the graph in which
the output layer reads only the last position (a ``Slice`` before its MatMul; the weights read from the
same file), so a prompt's cost is its transformer layers plus one row of the output layer. Without a recognisable output MatMul it falls back to the generator's session (and bounds the
prompts prefilled together by the bytes of their logits, ``PREFILL_LOGITS_BYTES``: 16 equal 9-token
prompts of Gemma 3 in one run took 5.3 s against 80 ms for one).
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
PREFILL_LOGITS_BYTES = 32 * 2**20  # the graph returns logits for every prompt position: bound that buffer (measured below)
_MIN_CAPACITY = 64


class OnnxBackend:
    """Prefill, decode and cache bookkeeping over an ``OnnxGenerator``'s session (see the module docstring).

    Args:
        generator: The ``OnnxGenerator``: its session, layout (genai_config.json) and pad token are used.
        max_rows: Most rows decoded together (the scheduler's max_batch_size).

    Raises:
        GenerateError: The graph has no GroupQueryAttention with a shared past/present buffer (an ONNX file
            not written by onnxruntime-genai's builder); serve it without batching.
    """

    adapters: list[str] = []

    def __init__(self, generator: Any, max_rows: int) -> None:
        layout = generator.layout
        if not layout.share_buffer:
            raise GenerateError(
                f"{layout.onnx_file}: batched decoding needs the GroupQueryAttention graphs of "
                "`slmforge export onnx` (genai_config.json search.past_present_share_buffer); this one has "
                "not. Re-export the model, or serve it with max_batch_size 1 through another engine."
            )
        self.layout, self.max_rows = layout, max_rows
        self.session = self._last_position_session(generator.session)
        self.last_only = self.session is not generator.session  # prompts return one row of logits each
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
        self.cache: list[np.ndarray] = []  # (slots, kv_heads, positions, head_size) per cache name
        self.capacity = 0  # positions of a full-attention buffer
        self.slot_of = np.zeros(0, np.int64)  # the scheduler's row i lives in slot slot_of[i]
        self.lengths = np.zeros(0, np.int64)  # positions in row i's cache
        self.bound_rows = 0  # rows the decode binding is bound for (0: rebind at the next step)
        self.step_out = np.zeros((0, 1, self.vocab_size), self.logits_dtype)  # a decode step's logits
        self.bound: list[Any] = []  # what the decode binding points at, kept alive

    def prefill(self, joining: list[_Seq]) -> torch.Tensor:
        """Run the joining prompts in the free slots (prompts of one length together, in groups whose logits
        fit ``PREFILL_LOGITS_BYTES``); on success they join the running rows after them, in ``joining``'s
        order. Returns (n, vocab) last-token logits."""
        rows = len(self.lengths)
        lengths = np.asarray([len(s.ids) for s in joining], np.int64)
        self._ensure(rows + len(joining), int(lengths.max()) + 1)
        by_length: dict[int, list[int]] = {}
        for row, n in enumerate(lengths.tolist()):
            by_length.setdefault(n, []).append(row)
        slots = np.zeros(len(joining), np.int64)
        last = np.zeros((len(joining), self.vocab_size), np.float32)
        free = rows  # slots rows.. are free
        for n, members in by_length.items():
            group = max(1, PREFILL_LOGITS_BYTES // ((1 if self.last_only else n) * self.vocab_size * 4))
            for start in range(0, len(members), group):
                part = members[start:start + group]
                last[part] = self._prefill_group([joining[r].ids for r in part], free)
                slots[part] = np.arange(free, free + len(part))
                free += len(part)
        self.slot_of = np.concatenate([self.slot_of, slots])
        self.lengths = np.concatenate([self.lengths, lengths])
        self.bound_rows = 0
        return torch.from_numpy(last)

    def decode(self, seqs: list[_Seq]) -> torch.Tensor:
        """Feed every row its last token at its own length; returns (B, vocab) logits."""
        rows = len(seqs)
        self._ensure(rows, int(self.lengths.max()) + 2)
        ids = np.zeros((rows, 1), np.int64)
        ids[self.slot_of, 0] = [s.ids[-1] for s in seqs]
        at = np.zeros(rows, np.int64)
        at[self.slot_of] = self.lengths
        mask = (np.arange(int(at.max()) + 1)[None, :] <= at[:, None]).astype(np.int64)  # (B, width), right padding
        if self.bound_rows != rows:
            self._bind(rows)
        b, lay = self.binding, self.layout
        b.bind_cpu_input(lay.input_ids, ids)
        b.bind_cpu_input(lay.attention_mask, mask)
        self._run(b)
        self.lengths = self.lengths + 1
        out = self.step_out[:rows, 0, :]  # (B, vocab) by slot; read before the next step overwrites it
        if not np.array_equal(self.slot_of, np.arange(rows)):
            out = out[self.slot_of]
        return torch.from_numpy(out if out.dtype == np.float32 else out.astype(np.float32))

    def keep(self, rows: list[int]) -> None:
        """Keep only ``rows`` (indices into the batch, in order): slots past the new batch size move into the
        freed ones below it, so the running rows stay the first slots."""
        slot_of, lengths = self.slot_of[rows], self.lengths[rows]
        count = len(rows)
        free = iter(sorted(set(range(count)) - set(slot_of.tolist())))
        for i in np.flatnonzero(slot_of >= count):
            to, used = next(free), int(lengths[i])
            for c in self.cache:  # only the positions the row has written
                c[to, :, :used] = c[slot_of[i], :, :used]
            slot_of[i] = to
        self.slot_of, self.lengths = slot_of, lengths
        self.bound_rows = 0

    # ------------------------------------------------------------------ buffers

    def _ensure(self, rows: int, positions: int) -> None:
        """Buffers with at least ``rows`` slots and ``positions`` full-attention positions (grown by doubling,
        the running rows' positions copied over)."""
        if positions > self.layout.context_length:
            raise GenerateError(f"{positions} positions asked for; the model was exported for "
                                f"{self.layout.context_length}.")
        slots = self.cache[0].shape[0] if self.cache else 0
        if rows <= slots and positions <= self.capacity:
            return
        new_slots, capacity = max(slots, 1), max(self.capacity, _MIN_CAPACITY)
        while new_slots < rows:
            new_slots *= 2
        while capacity < positions:
            capacity *= 2
        new_slots, capacity = min(new_slots, max(self.max_rows, rows)), min(capacity, self.layout.context_length)
        lay, used = self.layout, len(self.lengths)
        grown = [np.zeros((new_slots, lay.num_kv_heads, self._layer_length(i, capacity), lay.head_size), self.kv_dtype)
                 for i in range(len(lay.cache_names()))]
        for new, old in zip(grown, self.cache, strict=False):
            new[:used, :, :old.shape[2]] = old[:used]
        self.cache, self.capacity, self.bound_rows = grown, capacity, 0
        self.step_out = np.zeros((new_slots, 1, self.vocab_size), self.logits_dtype)

    def _layer_length(self, name_index: int, capacity: int) -> int:
        layer = name_index // 2  # keys then values of each layer
        return max(capacity, self.layout.sliding_window) if layer in self.layout.sliding_layers else capacity

    def _bind(self, rows: int) -> None:
        """Bind the first ``rows`` slots (contiguous views) as every layer's past and present, and the logits.
        CPU OrtValues wrap the numpy memory; they are kept in ``self.bound`` while the binding uses them."""
        values = [ort.OrtValue.ortvalue_from_numpy(c[:rows]) for c in self.cache]
        for (past, present), value in zip(self.layout.cache_names(), values, strict=True):
            self.binding.bind_ortvalue_input(past, value)
            self.binding.bind_ortvalue_output(present, value)  # the same buffer: updated in place
        logits = ort.OrtValue.ortvalue_from_numpy(self.step_out[:rows])
        self.binding.bind_ortvalue_output(self.layout.logits, logits)
        self.bound, self.bound_rows = [*values, logits], rows

    # ------------------------------------------------------------------ runs

    def _prefill_group(self, prompts: list[list[int]], first_slot: int) -> np.ndarray:
        """One first-prompt run of ``prompts`` (all of one length) in slots ``first_slot``... Returns the
        (rows, vocab) logits of each prompt's last token."""
        lay, n = self.layout, len(prompts)
        ids = np.asarray(prompts, np.int64)  # (rows, S)
        mask = np.ones_like(ids)
        out = np.zeros((n, 1 if self.last_only else ids.shape[1], self.vocab_size), self.logits_dtype)
        # Every array and OrtValue bound stays referenced until the run: a binding holds no Python
        # reference, and memory freed before the run gives wrong numbers rather than an error.
        values = [ort.OrtValue.ortvalue_from_numpy(c[first_slot:first_slot + n]) for c in self.cache]
        logits = ort.OrtValue.ortvalue_from_numpy(out)  # CPU: ONNX Runtime writes into ``out`` itself
        b = self.session.io_binding()
        b.bind_cpu_input(lay.input_ids, ids)
        b.bind_cpu_input(lay.attention_mask, mask)
        b.bind_ortvalue_output(lay.logits, logits)
        for (past, present), value in zip(lay.cache_names(), values, strict=True):
            b.bind_ortvalue_input(past, value)
            b.bind_ortvalue_output(present, value)
        self._run(b)
        return out[:, -1].astype(np.float32)

    def _last_position_session(self, session: ort.InferenceSession) -> ort.InferenceSession:
        """A session over a copy of the graph whose output layer reads only the last position (see the module
        docstring), with ``session``'s options and providers; ``session`` itself when the output layer is not
        a MatMul reached from the logits through at most a few elementwise nodes, or the copy fails."""
        import onnx

        lay = self.layout
        try:
            model = onnx.load(str(lay.onnx_file), load_external_data=False)
        except Exception:  # an unreadable graph still runs as it is
            return session
        graph = model.graph
        producer = {out: node for node in graph.node for out in node.output}
        node = producer.get(lay.logits)
        for _ in range(4):  # e.g. a Cast, or a soft-capping Div/Tanh/Mul after the output MatMul
            if node is None or node.op_type in ("MatMul", "MatMulNBits"):
                break
            node = producer.get(node.input[0])
        if node is None or node.op_type not in ("MatMul", "MatMulNBits"):
            return session
        last = "slmforge/last_position_hidden"
        graph.initializer.extend([onnx.numpy_helper.from_array(np.asarray([v], np.int64), f"{last}/{k}")
                                  for k, v in (("starts", -1), ("ends", np.iinfo(np.int64).max), ("axes", 1))])
        graph.node.insert(list(graph.node).index(node), onnx.helper.make_node(
            "Slice", [node.input[0], f"{last}/starts", f"{last}/ends", f"{last}/axes"], [last], name=last))
        node.input[0] = last  # (B, S, hidden) -> (B, 1, hidden) -> logits (B, 1, vocab)
        for out in graph.output:
            if out.name == lay.logits and len(out.type.tensor_type.shape.dim) == 3:
                out.type.tensor_type.shape.dim[1].dim_value = 1
        # Loaded from memory, its weights read from the export's own folder (ONNX Runtime refuses a copy of
        # the graph elsewhere whose external data, even through a symlink, lies outside the copy's folder).
        options = _options_like(session.get_session_options())
        options.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                         str(lay.onnx_file.parent.resolve()))
        try:
            return ort.InferenceSession(model.SerializeToString(), options, providers=session.get_providers())
        except Exception:  # ONNX Runtime refuses the copy: prompts then return every position's logits
            return session

    def _run(self, binding: Any) -> None:
        try:
            self.session.run_with_iobinding(binding)
        except Exception as exc:  # onnxruntime's own error classes derive from Exception alone
            raise GenerateError(f"ONNX Runtime failed to run {self.layout.onnx_file.name}: {str(exc)[:500]}") from None


def _options_like(source: ort.SessionOptions) -> ort.SessionOptions:
    """New session options with ``source``'s optimization level, threads, logging and spinning (the options a
    session reports are its own: changing them would change what a later session of the generator gets)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = source.graph_optimization_level
    options.intra_op_num_threads = source.intra_op_num_threads
    options.inter_op_num_threads = source.inter_op_num_threads
    options.log_severity_level = source.log_severity_level
    for key in ("session.intra_op.allow_spinning", "session.inter_op.allow_spinning"):
        try:
            options.add_session_config_entry(key, source.get_session_config_entry(key))
        except Exception:  # not set on the source: ONNX Runtime's default
            pass
    return options
