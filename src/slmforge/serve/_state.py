"""What every route shares: the models, keys, limits, limiter, metrics and locks of one app.

One ``ServerState`` is made by ``build_app`` and kept on ``app.state.server``; handlers reach it with
``server(request)``. Its methods are the steps every generating request goes through: pick the model,
admit the caller (size and key limits), wait for the engine, meter what it used.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from slmforge.serve._hash import hash_api_key
from slmforge.serve._keys import ApiKey
from slmforge.serve._limits import KeyLimiter, LimitExceeded, Metered, Metrics
from slmforge.serve._models import ServedModel
from slmforge.serve._upstream import UpstreamError
from slmforge.serve.protocol import ApiError, timeout_error

ANONYMOUS = "anonymous"  # the usage name of requests to a server run without keys


@dataclass(frozen=True)
class PromptLimits:
    """Request size limits; None: no limit (the model's context length is always enforced)."""

    max_prompt_chars: int | None = None
    max_prompt_tokens: int | None = None
    request_timeout_s: float | None = None  # seconds of generation, counted once the model is free


@dataclass
class ServerState:
    """The shared state of one app (``app.state.server``).

    ``guarded``: with keys, what describes the server (metrics: models, traffic; the schema) needs a key
    too, unless the operator makes it public (a Prometheus scraper without a key, a browsable /docs).
    ``locks``: engines without our continuous batching take one request at a time (they are not safe to
    call from two threads at once), or as many as their own slots (llama.cpp with parallel > 1); made
    lazily, because an asyncio primitive belongs to the loop that first uses it.
    """

    models: dict[str, ServedModel]
    keys: list[ApiKey] | None
    limits: PromptLimits
    limiter: KeyLimiter
    metrics: Metrics
    guarded: bool = False
    created: int = field(default_factory=lambda: int(time.time()))
    locks: dict[str, asyncio.Semaphore] = field(default_factory=dict)
    knowledge: dict[str, Any] = field(default_factory=dict)  # name -> serve._knowledge.KnowledgeBase
    memory: Any = None  # serve._memory.ServerMemory when serve.memory is on
    reasoning: Any = None  # serve._reason.Reasoning: strategies per request, their traces

    def pick(self, name: str, kind: str) -> ServedModel:
        """The model a request names, of the kind the endpoint serves (an upstream serves every kind).

        Raises:
            ApiError: 404 for an unknown name, 400 for a model of another kind.
        """
        served = self.models.get(name)
        if served is None:
            raise ApiError(404, f"The model {name!r} does not exist; known models: {', '.join(self.models)}.",
                           "invalid_request_error", "model", "model_not_found")
        if served.kind != kind and served.kind != "upstream":
            what = {"embed": "an embedding model (use /v1/embeddings)",
                    "generate": "a text generation model (use /v1/chat/completions or /v1/completions)"}[served.kind]
            raise ApiError(400, f"The model {name!r} is {what}.", "invalid_request_error", "model")
        return served

    def lock_for(self, name: str) -> asyncio.Semaphore:
        """The model's semaphore: one per engine object, shared by every name that serves it."""
        if name not in self.locks:
            gen = self.models[name].generator
            twin = next((n for n in self.locks if self.models[n].generator is gen), None)
            self.locks[name] = self.locks[twin] if twin else asyncio.Semaphore(self.models[name].slots)
        return self.locks[name]

    def admit(self, request: Request, prompt_chars: int, end_user: str | None = None) -> Metered:
        """Check the prompt's size and the key's limits; returns who usage is metered under: the key's
        name and the request's ``user`` (the client's own end user, kept per key)."""
        limit = self.limits.max_prompt_chars
        if limit is not None and prompt_chars > limit:
            raise ApiError(413, f"The prompt has {prompt_chars} characters; this server accepts at most "
                           f"{limit}.", "invalid_request_error", None, "prompt_too_large")
        key: ApiKey | None = request.state.api_key
        if key is None:
            self.limiter.count(ANONYMOUS, end_user)
            return Metered(ANONYMOUS, end_user)
        try:
            self.limiter.admit(key, end_user)
        except LimitExceeded as exc:
            headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after is not None else None
            raise ApiError(429, exc.message, "insufficient_quota" if exc.retry_after is None else "requests",
                           None, exc.code, headers) from None
        return Metered(key.name, end_user)

    async def _acquire(self, model: str, lock: asyncio.Semaphore) -> None:
        self.metrics.queue_depth[model] += 1
        try:
            await lock.acquire()
        finally:
            self.metrics.queue_depth[model] -= 1

    @asynccontextmanager
    async def hold(self, model: str, lock: asyncio.Semaphore):
        """The model's lock for the block, counted in the queue depth while waiting for it."""
        await self._acquire(model, lock)
        try:
            yield
        finally:
            lock.release()

    async def run_locked(self, model: str, lock: asyncio.Semaphore, work):
        """``work()`` in a worker thread under the model's lock -> (its result, seconds it took).

        On timeout the client gets a 504 at once, but the lock is held until the thread ends: an
        engine cannot be stopped mid-call, and must not be entered by two threads.
        """
        await self._acquire(model, lock)
        start = time.perf_counter()
        try:
            task = asyncio.ensure_future(run_in_threadpool(work))
        except BaseException:
            lock.release()
            raise

        def release(t: asyncio.Future) -> None:
            lock.release()
            if not t.cancelled():
                t.exception()  # retrieved, so an abandoned task's error is not logged as "never retrieved"

        task.add_done_callback(release)
        try:
            result = await asyncio.wait_for(asyncio.shield(task), self.limits.request_timeout_s)
        except asyncio.TimeoutError:
            raise timeout_error(self.limits.request_timeout_s) from None
        return result, time.perf_counter() - start

    def finished(self, user: Metered, model: str, prompt_tokens: int, completion_tokens: int,
                 seconds: float) -> None:
        """Meter a request's tokens under its key and user, and count them in the model's metrics."""
        self.limiter.record(user, prompt_tokens, completion_tokens)
        self.metrics.observe_generation(model, prompt_tokens, completion_tokens, seconds)

    async def proxy(self, served: ServedModel, path: str, body: BaseModel, user: Metered):
        """Forward a request to an upstream endpoint, metering its usage under the caller's key."""
        payload = body.model_dump(exclude_unset=True, by_alias=True)
        start = time.perf_counter()
        try:
            if not payload.get("stream"):
                answer = await served.upstream.post(path, payload)
                usage = answer.get("usage") or {}
                self.finished(user, served.name, int(usage.get("prompt_tokens") or 0),
                              int(usage.get("completion_tokens") or 0), time.perf_counter() - start)
                return {**answer, "model": served.name}
            events = await served.upstream.stream(path, payload)  # errors come here, before any byte
        except UpstreamError as exc:
            raise ApiError(exc.status, exc.message, exc.type, exc.param, exc.code, exc.headers) from None
        return StreamingResponse(self._relay(events, served.name, user, start), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def _relay(self, events, name: str, user: Metered, start: float) -> AsyncIterator[bytes]:
        """Pass an upstream stream through, timing its first event and metering its usage at the end."""
        first = True
        try:
            async for event in events:
                if first:
                    first = False
                    self.metrics.ttft[name].observe(time.perf_counter() - start)
                yield event
        finally:
            with anyio.CancelScope(shield=True):
                await events.aclose()
            usage = getattr(events, "usage", None) or {}
            self.finished(user, name, int(usage.get("prompt_tokens") or 0),
                          int(usage.get("completion_tokens") or 0), time.perf_counter() - start)

    def batch_engines(self) -> dict[str, Any]:
        """Each batching engine under the first name that serves it (adapters share their base's engine)."""
        out: dict[str, Any] = {}
        for name, m in self.models.items():
            if m.batch is not None and all(e is not m.batch for e in out.values()):
                out[name] = m.batch
        return out


def server(request: Request) -> ServerState:
    """The state of the app serving ``request``."""
    return request.app.state.server


def match_key(keys: list[ApiKey], key: str) -> ApiKey | None:
    """The record of a plain key among ``keys`` (None: empty or unknown). Compares against every digest, so
    timing does not tell which (or whether any) matched first. The one check for /v1 and the dashboard."""
    digest = hash_api_key(key) if key else ""
    found = None
    for known in keys:
        if hmac.compare_digest(digest, known.sha256):
            found = found or known
    return found


# A dependency rather than an http middleware: starlette's BaseHTTPMiddleware wraps streamed
# bodies and hides a client's disconnect from them, so an abandoned stream would run to its end.
async def require_key(request: Request) -> None:
    """Find the request's key (``request.state.api_key``; None on a server without keys).

    Raises:
        ApiError: 401 for a missing or unknown key.
    """
    request.state.api_key = None
    keys = server(request).keys
    if keys is None:
        return
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    given = key.strip() if scheme.lower() == "bearer" else ""
    found = match_key(keys, given)
    request.state.api_key = found
    if found is None:
        what = "Invalid API key" if given else "Missing API key"
        raise ApiError(401, f"{what}: send 'Authorization: Bearer <key>'.", "invalid_request_error",
                       code="invalid_api_key")


async def require_key_if_guarded(request: Request) -> None:
    """``require_key`` where the server's description is guarded (keys on, ``public_metrics`` off)."""
    if server(request).guarded:
        await require_key(request)


def v1_router() -> APIRouter:
    """A router under ``/v1`` whose every route needs the API key (when the server has keys)."""
    return APIRouter(prefix="/v1", dependencies=[Depends(require_key)])
