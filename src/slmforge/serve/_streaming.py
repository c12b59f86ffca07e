"""Server-sent events: OpenAI's stream chunks for the batching engine, for the other engines, and for a
reply that was made whole (a grammar-constrained llama.cpp reply).

Every stream ends with ``data: [DONE]``; an error after the first byte is an error event (the status is
already sent), and a stream past the request timeout ends with a timeout error event.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import anyio
from fastapi.responses import StreamingResponse

from slmforge.errors import GenerateError
from slmforge.generate import SamplingParams
from slmforge.serve._batch import Finished, Handle, TokenEvent
from slmforge.serve._limits import Metered, Metrics
from slmforge.serve._models import ServedModel
from slmforge.serve._structured import assistant_message
from slmforge.serve.protocol import timeout_error, usage_body

DONE = "data: [DONE]\n\n"


def sse(events: AsyncIterator[str]) -> StreamingResponse:
    """A streamed response of server-sent events, not buffered by proxies."""
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def event(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def error_event(message: str, type_: str) -> str:
    """An error event and the end of the stream."""
    return event({"error": {"message": message, "type": type_, "param": None, "code": None}}) + DONE


def timeout_event(timeout: float) -> str:
    """The error event and end of a stream that ran past the request timeout."""
    error = timeout_error(timeout)
    return event({"error": {"message": error.message, "type": error.type, "param": None, "code": error.code}}) + \
        DONE


def completion_logprobs(entries: list[dict[str, Any]], start: int = 0) -> dict[str, Any]:
    """Chat-style per-token entries -> the legacy completions ``logprobs`` object (``text_offset`` counted
    from ``start``: a stream's later chunks continue where the earlier ones ended)."""
    offsets, at = [], start
    for e in entries:
        offsets.append(at)
        at += len(e["token"])
    return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries],
            "text_offset": offsets}


@dataclass
class StreamHooks:
    """What a stream reports when its first text leaves and when it ends."""

    model: str
    user: Metered
    start: float
    metrics: Metrics
    finished: Any  # (user, model, prompt_tokens, completion_tokens, seconds) -> None
    timeout_s: float | None = None
    first_at: float | None = None

    def first_piece(self) -> None:
        self.first_at = time.perf_counter()
        self.metrics.ttft[self.model].observe(self.first_at - self.start)

    def done(self, prompt_tokens: int, completion_tokens: int) -> None:
        seconds = time.perf_counter() - (self.first_at or self.start)
        self.finished(self.user, self.model, prompt_tokens, completion_tokens, seconds)


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.perf_counter())


class _Producer:
    """A thread running an engine's text iterator, handing pieces over like the batching engine does
    (``Handle``): one event-loop wake-up per drain, and what arrived meanwhile goes out as one chunk, so a
    fast engine (llama.cpp: ~0.4 ms a token) is not held to a thread hop per token. ``stop()`` ends it
    at the next piece and closes the iterator, which stops the engine's generation."""

    def __init__(self, it: Iterator[str]):
        self.it, self.handle = it, Handle(asyncio.get_running_loop())
        self.failure: list[Exception] = []
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="slmforge-stream", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for piece in self.it:
                self.handle._put(TokenEvent(piece))
                if self._stop.is_set():
                    break
        except Exception as exc:  # handed to the event loop by the stream
            self.failure.append(exc)
        finally:
            close = getattr(self.it, "close", None)
            if close is not None:
                close()
            self.handle._put(Finished("stop", 0, 0))

    def stop(self) -> None:
        self._stop.set()


async def stream_events(served: ServedModel, lock: asyncio.Semaphore, prompt, params: SamplingParams,
                        chunk: dict[str, Any], chat: bool, usage: bool, hooks: StreamHooks,
                        hold) -> AsyncIterator[str]:
    """OpenAI chunks for one streamed sequence of an engine without our batching, then ``data: [DONE]``.

    The engine runs in a ``_Producer`` thread; if the client goes away the producer stops.
    """
    gen = served.generator

    def choice(delta_or_text, finish: str | None) -> dict[str, Any]:
        body = {"delta": delta_or_text} if chat else {"text": delta_or_text}
        return {**chunk, "choices": [{"index": 0, **body, "logprobs": None, "finish_reason": finish}]}

    async with hold(hooks.model, lock):
        deadline = None if hooks.timeout_s is None else time.perf_counter() + hooks.timeout_s
        pieces: list[str] = []
        try:
            it: Iterator[str] = await anyio.to_thread.run_sync(gen.stream, prompt, params)
        except GenerateError as exc:
            yield error_event(str(exc), "invalid_request_error")
            return

        def count() -> tuple[int, int]:
            text = served.render_chat(prompt) if chat else prompt
            return served.count_tokens(text, special=not chat), served.count_tokens("".join(pieces), special=False)

        producer = _Producer(it)
        try:
            if chat:
                yield event(choice({"role": "assistant", "content": ""}, None))
            ended = False
            while not ended:
                try:
                    events = await asyncio.wait_for(producer.handle.drain(), _remaining(deadline))
                except asyncio.TimeoutError:
                    yield timeout_event(hooks.timeout_s)
                    return
                ended = any(isinstance(e, Finished) for e in events)
                text = "".join(e.text for e in events if isinstance(e, TokenEvent))
                if text:
                    if not pieces:
                        hooks.first_piece()
                    pieces.append(text)
                    yield event(choice({"content": text} if chat else text, None))
            if producer.failure:
                failure = producer.failure[0]
                message = str(failure) if isinstance(failure, GenerateError) else \
                    f"Generation failed: {type(failure).__name__}: {str(failure)[:300]}"
                yield error_event(message, "server_error")
                return
        finally:
            producer.stop()
            # Metered also when the client went away, so an abandoned stream still counts against its key.
            with anyio.CancelScope(shield=True):  # also when the client went away and we are cancelled
                await anyio.to_thread.run_sync(producer.thread.join)
                prompt_tokens, completion_tokens = await anyio.to_thread.run_sync(count)
            hooks.done(prompt_tokens, completion_tokens)
    # The stream yields text only, so the finish reason is inferred from the re-tokenized text: a reply
    # that used its whole token budget is "length"; a shorter one ended at end-of-sequence or a stop string.
    finish = "length" if completion_tokens >= params.max_new_tokens else "stop"
    yield event(choice({} if chat else "", finish))
    if usage:
        yield event({**chunk, "choices": [], "usage": usage_body(prompt_tokens, completion_tokens)})
    yield DONE


class _Choices:
    """The chunks of n choices of one batched stream (logprob ``text_offset``s continue per choice)."""

    def __init__(self, chunk: dict[str, Any], n: int, chat: bool, logprobs: str | None):
        self.chunk, self.chat, self.logprobs = chunk, chat, logprobs
        self.offsets = [0] * n  # characters of logprob tokens sent so far, per choice

    def __call__(self, index: int, delta_or_text, finish: str | None, entries=None) -> dict[str, Any]:
        body = {"delta": delta_or_text} if self.chat else {"text": delta_or_text}
        lp = None
        if entries:
            lp = {"content": entries} if self.logprobs == "chat" else \
                completion_logprobs(entries, self.offsets[index])
            self.offsets[index] += sum(len(e["token"]) for e in entries)
        return {**self.chunk, "choices": [{"index": index, **body, "logprobs": lp, "finish_reason": finish}]}


async def batched_events(handles: list, chunk: dict[str, Any], chat: bool, usage: bool,
                         hooks: StreamHooks, logprobs: str | None, tools: list | None = None) -> AsyncIterator[str]:
    """OpenAI chunks for n sequences (choice ``index`` i) from the batching engine, then ``data: [DONE]``.

    With tools a reply is held until it ends: whether it is a tool call is known only then.
    """
    choice = _Choices(chunk, len(handles), chat, logprobs)
    deadline = None if hooks.timeout_s is None else time.perf_counter() + hooks.timeout_s
    held: list[list[str]] = [[] for _ in handles]
    held_logprobs: list[list[dict[str, Any]]] = [[] for _ in handles]
    fins: list[Finished | None] = [None] * len(handles)
    arrived: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, handle) -> None:
        while True:
            events = await handle.drain()
            arrived.put_nowait((index, events))
            if isinstance(events[-1], Finished):
                return

    pumps = [asyncio.ensure_future(pump(i, h)) for i, h in enumerate(handles)]
    try:
        if chat:
            for i in range(len(handles)):
                yield event(choice(i, {"role": "assistant", "content": ""}, None))
        while any(f is None for f in fins):
            # Everything that arrived since the last chunk goes out as one chunk: one token per chunk when
            # the server keeps up, several when it is busy.
            try:
                index, events = await asyncio.wait_for(arrived.get(), _remaining(deadline))
            except asyncio.TimeoutError:
                yield timeout_event(hooks.timeout_s)
                return
            end = next((k for k, e in enumerate(events) if isinstance(e, Finished)), None)
            if end is not None:
                fins[index], events = events[end], events[:end]
            text = "".join(e.text for e in events)
            entries = [lp for e in events for lp in e.logprobs]
            if hooks.first_at is None and (text or (tools and events)):
                hooks.first_piece()
            if tools is not None:
                held[index].append(text)
                held_logprobs[index].extend(entries)
            elif text or entries:
                yield event(choice(index, {"content": text} if chat else text, None, entries))
    finally:
        for task in pumps:
            task.cancel()
        for handle in handles:
            handle.cancel()
        # Metered also when the client went away or the request timed out part way.
        hooks.done(handles[0].prompt_tokens, sum(h.completion_tokens for h in handles))
    for text in _endings(choice, fins, held, held_logprobs, tools, usage):
        yield text


def _endings(choice: _Choices, fins: list[Finished], held: list[list[str]], held_logprobs: list[list[dict]],
             tools: list | None, usage: bool) -> Iterator[str]:
    """The end of a batched stream: each choice's held reply (with tools) and finish, [usage], [DONE]."""
    failed = next((f for f in fins if f.error), None)
    if failed is not None:
        yield error_event(failed.error, "server_error")
        return
    for i, fin in enumerate(fins):
        reason = fin.finish_reason
        if tools is not None:
            message, reason = assistant_message("".join(held[i]), reason, tools)
            if message.get("tool_calls"):
                calls = [{"index": k, **c} for k, c in enumerate(message["tool_calls"])]
                yield event(choice(i, {"tool_calls": calls}, None, held_logprobs[i]))
            else:
                yield event(choice(i, {"content": message["content"]}, None, held_logprobs[i]))
        yield event(choice(i, {} if choice.chat else "", reason))
    if usage:
        yield event({**choice.chunk, "choices": [], "usage": usage_body(fins[0].prompt_tokens,
                                                                        sum(f.completion_tokens for f in fins))})
    yield DONE


async def whole_stream(chunk: dict[str, Any], choice: dict[str, Any], usage: dict[str, int] | None):
    """A finished chat choice as OpenAI stream chunks: role, content or tool calls, finish, [usage], [DONE]."""
    message = choice["message"]
    head = {**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                  "finish_reason": None}]}
    yield event(head)
    if message.get("tool_calls"):
        delta = {"tool_calls": [{"index": i, **c} for i, c in enumerate(message["tool_calls"])]}
    else:
        delta = {"content": message["content"]}
    yield event({**chunk, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}]})
    yield event({**chunk, "choices": [{"index": 0, "delta": {}, "logprobs": None,
                                       "finish_reason": choice["finish_reason"]}]})
    if usage is not None:
        yield event({**chunk, "choices": [], "usage": usage})
    yield DONE
