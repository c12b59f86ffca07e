"""What the completions and chat routes share: the request checks, one generating call's context
(``Call``), and the glue to the continuous-batching engine (submit n sequences, wait for all)."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import Any

from fastapi import Request

from slmforge.errors import GenerateError
from slmforge.generate import SamplingParams
from slmforge.serve._batch import BatchRequest, Finished
from slmforge.serve._limits import Metered
from slmforge.serve._models import ServedModel
from slmforge.serve._state import ServerState
from slmforge.serve._streaming import StreamHooks
from slmforge.serve.protocol import ApiError, timeout_error, usage_body

# --------------------------------------------------------------------------- request checks


def validate(params: SamplingParams) -> None:
    """Raises: ApiError: 400 for sampling parameters the engines refuse."""
    try:
        params.validate()
    except GenerateError as exc:
        raise ApiError(400, str(exc), "invalid_request_error") from None


def refuse_unknown(fields: list[str]) -> None:
    if fields:
        raise ApiError(400, f"Unsupported field(s): {', '.join(fields)}. This server does not implement them for "
                       "local models; remove them from the request.", "invalid_request_error", fields[0])


def needs_batching(served: ServedModel, what: str) -> None:
    raise ApiError(400, f"{what} is not available for model {served.name!r} (engine {served.engine}); it needs the "
                   "torch engine or the ONNX engine (served with continuous batching).", "invalid_request_error", what)


def check_streamable(params: SamplingParams) -> None:
    if params.n != 1:
        raise ApiError(400, f"Streaming returns one sequence; n must be 1 (got {params.n}).",
                       "invalid_request_error", "n")


def check_token_ids(served: ServedModel, ids: list[list[int]]) -> None:
    vocab = served.batch.vocab_size
    bad = sorted({t for one in ids for t in one if not 0 <= t < vocab})
    if bad:
        raise ApiError(400, f"The prompt holds token ids outside the vocabulary (0..{vocab - 1}): {bad[:5]}.",
                       "invalid_request_error", "prompt")


# --------------------------------------------------------------------------- one call


@dataclass
class Call:
    """One admitted generating request: who is metered, when it started, its parameters and its ids."""

    state: ServerState
    request: Request
    model: str  # the name the client asked for (an adapter's name, not its base's)
    user: Metered
    start: float
    params: SamplingParams
    explicit: bool  # whether the client set max_tokens (only then does it count against the context)
    chunk_object: str  # "text_completion" or "chat.completion.chunk"
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        prefix = "cmpl" if self.chunk_object == "text_completion" else "chatcmpl"
        self.id = self.id or f"{prefix}-{uuid.uuid4().hex}"

    @property
    def chunk(self) -> dict[str, Any]:
        """The fields every stream chunk of this call carries."""
        return {"id": self.id, "object": self.chunk_object, "created": self.created, "model": self.model}

    def hooks(self) -> StreamHooks:
        state = self.state
        return StreamHooks(self.model, self.user, self.start, state.metrics, state.finished,
                           state.limits.request_timeout_s)

    def meter(self, prompt_tokens: int, completion_tokens: int, seconds: float) -> None:
        self.state.finished(self.user, self.model, prompt_tokens, completion_tokens, seconds)

    def answer(self, object_: str, choices: list[dict[str, Any]], prompt_tokens: int,
               completion_tokens: int) -> dict[str, Any]:
        """The whole (not streamed) reply in OpenAI's shape."""
        return {"id": self.id, "object": object_, "created": self.created, "model": self.model,
                "choices": choices, "usage": usage_body(prompt_tokens, completion_tokens)}

    def check_prompt_tokens(self, served: ServedModel, prompt_tokens: int, max_new_tokens: int) -> None:
        """Raises: ApiError: 413 past ``max_prompt_tokens``, 400 past the model's context window."""
        limits = self.state.limits
        if limits.max_prompt_tokens is not None and prompt_tokens > limits.max_prompt_tokens:
            raise ApiError(413, f"The prompt has {prompt_tokens} tokens; this server accepts at most "
                           f"{limits.max_prompt_tokens}.", "invalid_request_error", None, "prompt_too_large")
        context = served.context_length()
        if context is None:
            return
        # A default max_tokens is not the client's request, so only an explicit one counts against the window.
        wanted = prompt_tokens + (max_new_tokens if self.explicit else 1)
        if wanted > context:
            asked = f" plus max_tokens {max_new_tokens} ({wanted} in all)" if self.explicit else ""
            raise ApiError(400, f"This model's maximum context length is {context} tokens; the prompt has "
                           f"{prompt_tokens} tokens{asked}. Shorten the prompt or lower max_tokens.",
                           "invalid_request_error", None, "context_length_exceeded")


# --------------------------------------------------------------------------- batched generation


def one(params: SamplingParams, i: int) -> SamplingParams:
    """The i-th of n choices as its own sequence; a seeded request seeds choice i with seed + i."""
    return replace(params, n=1, seed=None if params.seed is None else params.seed + i, stop=list(params.stop))


def submit_all(engine, jobs: list[BatchRequest]) -> list:
    """Submit every sequence of a request; if one is refused, cancel the ones already queued."""
    loop, handles = asyncio.get_running_loop(), []
    try:
        for job in jobs:
            handles.append(engine.submit(job, loop))
    except BaseException:
        for h in handles:
            h.cancel()
        raise
    return handles


async def _collect(handle) -> tuple[str, Finished, list[dict[str, Any]]]:
    text, entries = [], []
    async for event in handle.events():
        if isinstance(event, Finished):
            if event.error:
                raise ApiError(500, event.error, "server_error")
            return "".join(text), event, entries
        text.append(event.text)
        entries.extend(event.logprobs)
    raise ApiError(500, "The engine stopped before the reply ended.", "server_error")


async def run_batched(engine, jobs: list[BatchRequest], timeout_s: float | None, request: Request,
                      meter, jobs_per_prompt: int = 1) -> tuple[list, float]:
    """Submit every sequence, wait for all -> ([(text, Finished, logprob entries)], seconds).

    A client that disconnects, or a request past the timeout, frees its slots at the next step; what it
    had generated by then is still metered (``meter(prompt_tokens, completion_tokens, seconds)``).
    """
    start = time.perf_counter()
    handles = submit_all(engine, jobs)

    async def gone() -> None:
        # uvicorn does not cancel a plain (non-streaming) handler when its client leaves: poll for it.
        while not await request.is_disconnected():
            await asyncio.sleep(0.25)

    work = asyncio.ensure_future(asyncio.gather(*(_collect(h) for h in handles)))
    watch = asyncio.ensure_future(gone())
    try:
        done, _ = await asyncio.wait({work, watch}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        if work in done:
            return work.result(), time.perf_counter() - start
        prompts = sum(h.prompt_tokens for h in handles) // max(1, jobs_per_prompt)  # n choices share a prompt
        meter(prompts, sum(h.completion_tokens for h in handles), time.perf_counter() - start)
        if watch in done:
            raise ApiError(499, "The client closed the connection.", "invalid_request_error")
        raise timeout_error(timeout_s)
    finally:
        watch.cancel()
        if not work.done():
            work.cancel()
        for h in handles:
            h.cancel()  # a no-op for finished ones; frees the slots of the rest
