"""Continuous batching for the in-process engines (torch, ONNX Runtime).

One background thread owns the model. Every iteration it admits waiting requests (prefilled together)
into the running batch, then decodes one token for every running sequence in one forward pass; a
sequence leaves the batch the step it finishes, and its slot is free for the next request.
Each sequence keeps its own sampling settings, seed, stop strings, token budget, log-probabilities,
LoRA adapter (peft's mixed-adapter batches, torch only) and decoding constraint, which closes a
structured reply within the tokens the sequence may still write.

This module is the scheduler and the sampler, the same for every engine. What differs per engine is a
small backend (``BACKENDS``, by engine name): prefill the joining prompts, decode one step for every row,
and keep the batch's KV cache as rows join and leave (``serve/_batch_torch.py``: a transformers
``DynamicCache``, left-padded; ``serve/_batch_onnx.py``: GroupQueryAttention's in-place buffers,
right-padded, each row at its own length).

Written by hand rather than with transformers' ``init_continuous_batching``: that manager has one
``GenerationConfig`` for all requests (no per-request temperature, seed, stop strings, adapters or
logits masks for structured output), and on CPU it measured ~3x slower than a padded batch
(../shared/stack.md); onnxruntime-genai's ``og.Generator`` has one search config per batch too.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import queue
import secrets
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from slmforge.errors import GenerateError
from slmforge.generate import SamplingParams, StopCutter, draw_token


def _torch_backend(generator: Any, max_rows: int) -> Any:
    from slmforge.serve._batch_torch import TorchBackend

    return TorchBackend(generator)


def _onnx_backend(generator: Any, max_rows: int) -> Any:
    from slmforge.serve._batch_onnx import OnnxBackend

    return OnnxBackend(generator, max_rows)


# Engine name -> the backend that runs its model for the scheduler (imported on first use), made from the
# generator and the most rows it will be given. A backend has
# ``vocab_size``, ``adapters``, ``prefill(joining) -> (n, V) logits`` (the joining rows enter its cache after
# the running ones, and only on success), ``decode(running) -> (B, V) logits``, ``keep(rows)`` and ``clear()``.
BACKENDS: dict[str, Callable[[Any, int], Any]] = {"torch": _torch_backend, "onnx": _onnx_backend}


@dataclass
class TokenEvent:
    """New text of one sequence (may be empty while a stop string or a multi-byte character is pending)."""

    text: str
    logprobs: list[dict[str, Any]] = field(default_factory=list)  # one entry per token in this event


@dataclass
class Finished:
    """The sequence ended: why, and how many tokens it read and wrote."""

    # "stop" (end of sequence, stop string, complete structured output) | "length" (max_new_tokens or the
    # context ran out; a constrained reply is then still complete: the budget steered it to its shortest ending)
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None  # the engine failed on this batch


@dataclass
class BatchRequest:
    """One sequence to generate. ``params.n`` must be 1: the server submits n requests for n choices."""

    prompt_ids: list[int]
    params: SamplingParams
    adapter: str | None = None  # a loaded LoRA adapter's name; None = the base model
    constraint: Any = None  # a generate._constrain.Constraint, or None
    logprobs: int | None = None  # None = none; k >= 0: the chosen token's log-probability and the top k
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit (OpenAI's logit_bias)


class Handle:
    """The consumer's side of one request: its events, and a way to cancel it.

    The engine thread appends events to a deque and wakes the event loop at most once until the consumer
    has drained it, so a consumer that falls behind under load takes many tokens per wake-up (and the
    server sends them as one chunk) instead of paying a wake-up and a chunk per token.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop | None) -> None:
        self._loop = loop
        self._items: deque[TokenEvent | Finished] = deque()
        self._ready = asyncio.Event() if loop is not None else None
        self._wake_pending = False
        self._sync: queue.SimpleQueue | None = None if loop is not None else queue.SimpleQueue()
        self.cancelled = False
        self.prompt_tokens = 0
        self.completion_tokens = 0  # kept current by the engine: what a cancelled request still used

    def _put(self, event: TokenEvent | Finished) -> None:
        if self._sync is not None:
            self._sync.put(event)
            return
        self._items.append(event)
        if self._wake_pending:
            return
        self._wake_pending = True
        try:
            self._loop.call_soon_threadsafe(self._wake)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            self.cancelled = True

    def _wake(self) -> None:
        self._wake_pending = False
        self._ready.set()

    def cancel(self) -> None:
        """Stop generating for this request (the client went away); its slot frees at the next step."""
        self.cancelled = True

    async def drain(self) -> list[TokenEvent | Finished]:
        """Every event that has arrived, waiting for at least one."""
        while True:
            if self._items:
                out = []
                while self._items:
                    out.append(self._items.popleft())
                return out
            self._ready.clear()
            if not self._items:
                await self._ready.wait()

    async def events(self) -> AsyncIterator[TokenEvent | Finished]:
        """Events as they come, ending with ``Finished``; leaving early cancels the request."""
        try:
            while True:
                for event in await self.drain():
                    yield event
                    if isinstance(event, Finished):
                        return
        finally:
            self.cancelled = True

    def wait(self) -> tuple[str, Finished, list[dict[str, Any]]]:
        """Block until the end (no event loop): (text, Finished, logprob entries)."""
        text, logprobs = [], []
        while True:
            event = self._sync.get()
            if isinstance(event, Finished):
                return "".join(text), event, logprobs
            text.append(event.text)
            logprobs.extend(event.logprobs)


@dataclass
class _Seq:
    request: BatchRequest
    handle: Handle
    ids: list[int]  # prompt + generated
    seen: set[int] = field(default_factory=set)  # distinct ids in ``ids``, for the repetition penalty
    generated: list[int] = field(default_factory=list)
    rng: torch.Generator | None = None
    state: Any = None  # ConstraintState
    cutter: StopCutter | None = None
    emitted_chars: int = 0  # characters of the decoded text already handed to the cutter
    pending_logprobs: list[dict[str, Any]] = field(default_factory=list)
    finish: str | None = None


class BatchEngine:
    """Continuous batching over an in-process engine's model and tokenizer.

    Args:
        generator: An engine with the ``batching`` capability (``TorchGenerator``, ``OnnxGenerator``): its
            backend (``BACKENDS``, by the engine's name) runs the model; its tokenizer and ``encode`` are
            used here; a torch model's adapters, if any, can be picked per request.
        max_batch_size: Most sequences decoded together; 1 serves one request at a time.
        on_step: Called after every forward pass with the number of sequences in it (for metrics).
        max_prefill_tokens: Padded prompt tokens one prefill step may take (a longer single prompt still
            goes alone); the rest of the queue joins at the next steps.
    """

    def __init__(self, generator, max_batch_size: int = 16, on_step: Callable[[int], None] | None = None,
                 max_prefill_tokens: int = 4096) -> None:
        if max_batch_size < 1:
            raise GenerateError(f"max_batch_size must be >= 1 (got {max_batch_size}).")
        from slmforge.generate import as_engine

        name = as_engine(generator).engine
        if name not in BACKENDS:
            raise GenerateError(f"Continuous batching runs the engines {', '.join(BACKENDS)}, not {name!r}.")
        self.generator = generator
        self.backend = BACKENDS[name](generator, max_batch_size)
        self.tokenizer = generator.tokenizer
        self.eos_ids = list(generator.eos_token_ids)
        self.max_batch_size = max_batch_size
        self.max_prefill_tokens = max_prefill_tokens
        self.on_step = on_step
        self.context_length: int | None = generator.context_length
        self.tokenizer_lock = threading.Lock()  # fast tokenizers are not safe to share between threads
        self._waiting: deque[_Seq] = deque()
        self._wake = threading.Condition()
        self._active: list[_Seq] = []
        self._calls: deque[tuple[Callable[[], Any], concurrent.futures.Future]] = deque()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="slmforge-batch", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ public

    @property
    def adapters(self) -> list[str]:
        return self.backend.adapters

    @property
    def vocab_size(self) -> int:
        """Rows of the model's input embedding: the token ids a prompt may hold are 0..vocab_size - 1."""
        return self.backend.vocab_size

    def encode(self, text: str, special: bool) -> list[int]:
        """Token ids of a prompt (``special``: add BOS as in training; False for a rendered chat)."""
        with self.tokenizer_lock:
            return self.generator.encode(text, special=special)

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        with self.tokenizer_lock:
            return self.generator.render_chat(messages)

    def submit(self, request: BatchRequest, loop: asyncio.AbstractEventLoop | None = None) -> Handle:
        """Queue a sequence; with ``loop`` its events arrive on that event loop (``handle.events()``),
        without one ``handle.wait()`` blocks for the result.

        Raises:
            GenerateError: Bad parameters, n > 1 or beams, an unknown adapter, or the engine has stopped.
        """
        p = request.params
        p.validate()
        if p.n != 1 or p.num_beams != 1:
            raise GenerateError(f"A batched request generates one sequence without beams (got n={p.n}, "
                                f"num_beams={p.num_beams}); submit n requests instead.")
        if request.adapter is not None and request.adapter not in self.adapters:
            raise GenerateError(f"No adapter named {request.adapter!r}; loaded: {', '.join(self.adapters) or 'none'}.")
        if not request.prompt_ids:
            raise GenerateError("The prompt is empty; give some text.")
        vocab = self.vocab_size  # a quantized head has no float .weight to read the width from
        bad = [t for t in (request.logit_bias or {}) if not 0 <= t < vocab]
        if bad:
            raise GenerateError(f"logit_bias names token ids outside the vocabulary (0..{vocab - 1}): {bad[:5]}.")
        handle = Handle(loop)
        handle.prompt_tokens = len(request.prompt_ids)
        seq = _Seq(request=request, handle=handle, ids=list(request.prompt_ids), seen=set(request.prompt_ids))
        seed = p.seed if p.seed is not None else secrets.randbits(62)
        if p.temperature > 0:
            seq.rng = torch.Generator(device="cpu").manual_seed(seed)
        if request.constraint is not None:
            # The constraint closes the structure within the tokens this sequence may still write.
            budget = p.max_new_tokens
            if self.context_length is not None:
                budget = min(budget, self.context_length - len(request.prompt_ids))
            seq.state = request.constraint.start(max(budget, 0))
        seq.cutter = StopCutter(list(p.stop))
        with self._wake:  # checked under the lock the loop exits under, so no request is left behind
            if self._stopping:
                raise GenerateError("The server is shutting down and takes no new requests.")
            self._waiting.append(seq)
            self._wake.notify()
        return handle

    def call(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        """Run ``fn()`` on the engine's thread between two steps; its result (or error) comes in the future.

        Work on the model outside the batch (prompt log-probabilities for ``echo``) goes here rather than in
        another thread: a step may be switching the shared model's LoRA adapters while it runs.

        Raises:
            GenerateError: The engine has stopped.
        """
        done: concurrent.futures.Future = concurrent.futures.Future()
        with self._wake:
            if self._stopping:
                raise GenerateError("The server is shutting down and takes no new requests.")
            self._calls.append((fn, done))
            self._wake.notify()
        return done

    def stop(self, timeout_s: float = 30.0) -> None:
        """Finish the running and queued sequences (up to ``timeout_s``), then end the thread."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout_s)

    @property
    def waiting(self) -> int:
        """Sequences waiting for a slot in the batch."""
        return len(self._waiting)

    @property
    def busy(self) -> int:
        """Sequences running or waiting."""
        return len(self._active) + len(self._waiting)

    # ------------------------------------------------------------------ the loop

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._waiting and not self._active and not self._calls:
                    if self._stopping:
                        return
                    self._wake.wait(0.5)
                calls = list(self._calls)
                self._calls.clear()
                joining, width = [], 0
                while self._waiting and len(self._active) + len(joining) < self.max_batch_size:
                    seq = self._waiting[0]
                    # A prefill step pads every joining prompt to the longest: past the budget, the rest
                    # wait a step, so running sequences are not stalled by one huge padded prefill.
                    if joining and max(width, len(seq.ids)) * (len(joining) + 1) > self.max_prefill_tokens:
                        break
                    self._waiting.popleft()
                    if not seq.handle.cancelled:
                        joining.append(seq)
                        width = max(width, len(seq.ids))
            for fn, done in calls:
                if done.set_running_or_notify_cancel():
                    try:
                        with torch.inference_mode():
                            done.set_result(fn())
                    except BaseException as exc:  # the caller's error, raised where it waits
                        done.set_exception(exc)
            try:
                with torch.inference_mode():
                    if joining:
                        self._prefill(joining)
                    elif self._active:
                        self._decode()
            except Exception as exc:  # a failure past the forward pass ends the batch's sequences, not the server
                self._fail([*self._active, *joining], exc)
                self._active = []
                self.backend.clear()

    def _fail(self, seqs: list[_Seq], exc: BaseException) -> None:
        """End each unfinished sequence once, with the error."""
        message = f"Generation failed: {type(exc).__name__}: {str(exc)[:300]}"
        seen: set[int] = set()
        for seq in seqs:
            if id(seq) in seen or seq.finish is not None:
                continue
            seen.add(id(seq))
            seq.finish = "error"
            seq.handle._put(Finished("stop", len(seq.request.prompt_ids), len(seq.generated), message))

    def _prefill(self, joining: list[_Seq]) -> None:
        try:
            logits = self.backend.prefill(joining)
        except Exception as exc:  # e.g. out of memory on a long prompt: the running batch is untouched
            self._fail(joining, exc)
            return
        self._active.extend(joining)
        if self.on_step is not None:
            self.on_step(len(joining))
        self._sample_and_emit(joining, logits)

    def _decode(self) -> None:
        seqs = self._active
        logits = self.backend.decode(seqs)
        if self.on_step is not None:
            self.on_step(len(seqs))
        self._sample_and_emit(seqs, logits)

    def _drop_finished(self) -> None:
        keep = [i for i, s in enumerate(self._active) if s.finish is None and not s.handle.cancelled]
        if len(keep) == len(self._active):
            return
        if not keep:
            self._active = []
            self.backend.clear()
            return
        self._active = [self._active[i] for i in keep]
        self.backend.keep(keep)

    # ------------------------------------------------------------------ sampling

    def _sample_and_emit(self, seqs: list[_Seq], logits: torch.Tensor) -> None:
        logits = logits.float().cpu()  # (B, V)
        logprobs = None
        if any(s.request.logprobs is not None for s in seqs):
            logprobs = torch.log_softmax(logits, dim=-1)
        tokens = self._choose_all(seqs, logits)
        for row, seq in enumerate(seqs):
            if seq.handle.cancelled or seq.finish is not None:
                continue
            try:
                entry = self._logprob_entry(tokens[row], logprobs[row], seq.request.logprobs) if (
                    logprobs is not None and seq.request.logprobs is not None) else None
                self._advance(seq, tokens[row], entry)
            except Exception as exc:
                self._fail([seq], exc)
        self._drop_finished()

    def _choose_all(self, seqs: list[_Seq], logits: torch.Tensor) -> list[int]:
        """The next token of every row: what all rows share is done in one batched op (repetition
        penalty, greedy argmax); per-row work only where a row asks for it (bias, constraint, sampling)."""
        # Edited in place below, without a copy: the backends hand over logits used for nothing after this
        # (the torch one a slice of the step's output, the ONNX one its step buffer, rewritten next step).
        rows, cols, penalties = [], [], []
        for r, seq in enumerate(seqs):
            penalty = seq.request.params.repetition_penalty
            if penalty != 1.0:
                rows.extend([r] * len(seq.seen))
                cols.extend(seq.seen)
                penalties.extend([penalty] * len(seq.seen))
        if rows:
            r_t, c_t = torch.tensor(rows), torch.tensor(cols)
            p_t = torch.tensor(penalties, dtype=logits.dtype)
            scores = logits[r_t, c_t]
            logits[r_t, c_t] = torch.where(scores > 0, scores / p_t, scores * p_t)
        greedy, tokens = [], [0] * len(seqs)
        for r, seq in enumerate(seqs):
            p, row = seq.request.params, logits[r]  # a view: in-place edits land in ``logits``
            try:
                if seq.request.logit_bias:
                    row[list(seq.request.logit_bias)] += torch.tensor(list(seq.request.logit_bias.values()),
                                                                      dtype=row.dtype)
                if seq.state is not None:
                    seq.state.mask_logits_(row, self.eos_ids)
                elif p.ignore_eos and len(seq.generated) + 1 < p.max_new_tokens:
                    row[self.eos_ids] = float("-inf")
                if p.temperature == 0:
                    greedy.append(r)
                else:
                    tokens[r] = self._sample(seq, row)
            except Exception as exc:  # one row's failure (a constraint, NaN logits) ends that row only
                self._fail([seq], exc)
        # numpy's argmax, row by row on views: torch's argmax over (16, 262144) fp32 logits took 8 ms on
        # this CPU (15 ms with the row selection's copy) against numpy's 0.4 ms; both take the first maximum.
        scores = logits.numpy()
        for r in greedy:
            tokens[r] = int(scores[r].argmax())
        return tokens

    def _sample(self, seq: _Seq, row: torch.Tensor) -> int:
        return sample_token(row, seq.request.params, seq.rng)

    def _logprob_entry(self, token: int, logprobs: torch.Tensor, top: int) -> dict[str, Any]:
        with self.tokenizer_lock:
            entry = {**self._token_info(token), "logprob": float(logprobs[token]), "top_logprobs": []}
            if top > 0:
                values, ids = torch.topk(logprobs, min(top, logprobs.numel()))
                entry["top_logprobs"] = [{**self._token_info(int(i)), "logprob": float(v)}
                                         for v, i in zip(values, ids, strict=True)]
        return entry

    def _token_info(self, token: int) -> dict[str, Any]:
        text = self.tokenizer.decode([token], skip_special_tokens=False)
        return {"token": text, "bytes": list(text.encode("utf-8"))}

    def _advance(self, seq: _Seq, token: int, logprob: dict[str, Any] | None) -> None:
        p = seq.request.params
        seq.generated.append(token)
        seq.ids.append(token)
        seq.seen.add(token)
        seq.handle.completion_tokens = len(seq.generated)
        if logprob is not None:
            seq.pending_logprobs.append(logprob)
        ended = token in self.eos_ids and not (p.ignore_eos and seq.state is None)
        if seq.state is not None and not ended:
            seq.state.advance(token)
        finish = None
        if ended or (seq.state is not None and seq.state.finished):
            finish = "length" if seq.state is not None and seq.state.shortened else "stop"
        elif len(seq.generated) >= p.max_new_tokens:
            finish = "length"
        elif self.context_length is not None and len(seq.ids) >= self.context_length:
            finish = "length"
        # The text so far, decoded whole: a token may end inside a multi-byte character, whose bytes
        # decode to U+FFFD until the rest arrives, so text ending that way is held back.
        with self.tokenizer_lock:
            text = self.tokenizer.decode(seq.generated, skip_special_tokens=True)
        if finish is None and text.endswith("\ufffd"):
            return
        piece = seq.cutter.feed(text[seq.emitted_chars:])
        seq.emitted_chars = len(text)
        if seq.cutter.stopped:
            finish = "stop"
        if finish is not None:
            piece += seq.cutter.flush()
        if piece or seq.pending_logprobs:
            seq.handle._put(TokenEvent(piece, seq.pending_logprobs))
            seq.pending_logprobs = []
        if finish is not None:
            seq.finish = finish
            seq.handle._put(Finished(finish, len(seq.request.prompt_ids), len(seq.generated)))


def sample_token(row: torch.Tensor, p: SamplingParams, rng: torch.Generator | None) -> int:
    """One token drawn from ``row``'s logits (``generate._sampling.draw_token``: single-threaded numpy, because
    torch's sort and multinomial over a 262k vocabulary took 50-80 ms a row here, and its elementwise ops slow
    down badly when the 2 cores are shared), with a uniform number from the request's generator."""
    u = float(torch.rand((), generator=rng, dtype=torch.float64))
    return draw_token(row.detach().cpu().numpy().astype(np.float64), p, u)
