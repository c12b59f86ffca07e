"""The FastAPI app behind ``slmforge.serve.create_app``: request schemas, routes, errors, streaming."""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Literal

import anyio
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from slmforge.errors import GenerateError
from slmforge.generate import Completion, Generator, SamplingParams
from slmforge.serve._hash import hash_api_key
from slmforge.serve._keys import ApiKey
from slmforge.serve._limits import KeyLimiter, LimitExceeded, Metrics

# Defaults when a request leaves a field out: OpenAI's, except chat max_tokens (OpenAI: up to the context).
_COMPLETION_MAX_TOKENS = 16
_CHAT_MAX_TOKENS = 128


# --------------------------------------------------------------------------- request schemas


class _Request(BaseModel):
    # Unknown fields are rejected (400) rather than silently ignored: a client asking for
    # logprobs or penalties we do not implement should know.
    model_config = ConfigDict(extra="forbid")

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=16)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: dict[str, bool] | None = None  # {"include_usage": true} adds a final usage chunk
    user: str | None = None  # accepted, unused

    def params(self, default_max_tokens: int) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(
            max_new_tokens=self.max_tokens or default_max_tokens,
            temperature=self.temperature,
            top_p=self.top_p if self.top_p < 1.0 else None,
            stop=stop,
            seed=self.seed,
            n=self.n,
        )

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class CompletionRequest(_Request):
    prompt: str | list[str]


class _TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: str | list[_TextPart]
    name: str | None = None  # accepted, unused

    def plain(self) -> dict[str, str]:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": self.role, "content": text}


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)  # the newer name of max_tokens


# --------------------------------------------------------------------------- errors


class ApiError(Exception):
    """An error answered in OpenAI's body shape."""

    def __init__(self, status: int, message: str, type_: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers


def _error(status: int, message: str, type_: str, param: str | None = None, code: str | None = None,
           headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    headers = {**({"WWW-Authenticate": "Bearer"} if status == 401 else {}), **(headers or {})}
    return JSONResponse(body, status_code=status, headers=headers or None)


@dataclass(frozen=True)
class PromptLimits:
    """Request size limits; None: no limit (the model's context length is always enforced)."""

    max_prompt_chars: int | None = None
    max_prompt_tokens: int | None = None
    request_timeout_s: float | None = None  # seconds of generation, counted once the model is free


_ANONYMOUS = "anonymous"  # the usage name of requests to a server run without keys
_ENDPOINTS = ("/health", "/ready", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions",
              "/v1/usage")


class _RequestMetrics:
    """Pure ASGI middleware timing every request to its last byte, by endpoint and status code.

    Not starlette's BaseHTTPMiddleware, which would hide a client's disconnect from streamed bodies.
    """

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        endpoint = path if path in _ENDPOINTS else "/v1/models/{name}" if path.startswith("/v1/models/") else "other"
        start, status = time.perf_counter(), 500

        async def timed_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, timed_send)
        finally:
            self.metrics.observe_request(endpoint, status, time.perf_counter() - start)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    problems, param = [], None
    for e in exc.errors():
        loc = [str(p) for p in e.get("loc", ()) if p != "body"]
        where = ".".join(loc) or "body"
        param = param or (where if loc else None)
        problems.append(f"{where}: {e.get('msg', 'invalid')}")
    return "Invalid request: " + "; ".join(problems[:5]) + ".", param


# --------------------------------------------------------------------------- app


def build_app(models: dict[str, Generator], keys: list[ApiKey] | None, prompt_limits: PromptLimits,
              limiter: KeyLimiter, metrics: Metrics) -> FastAPI:
    app = FastAPI(title="slmforge", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(_RequestMetrics, metrics=metrics)
    created = int(time.time())
    # One request per model at a time: engines are not safe to call from two threads at once.
    # Created lazily because an asyncio.Lock belongs to the loop that first uses it.
    locks: dict[str, asyncio.Lock] = {}

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return _error(exc.status, exc.message, exc.type, exc.param, exc.code, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return _error(400, message, "invalid_request_error", param)

    @app.exception_handler(GenerateError)
    async def _generate_error(request: Request, exc: GenerateError):
        return _error(400, str(exc), "invalid_request_error")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return _error(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", type_)

    # A dependency rather than an http middleware: starlette's BaseHTTPMiddleware wraps streamed
    # bodies and hides a client's disconnect from them, so an abandoned stream would run to its end.
    async def require_key(request: Request) -> None:
        request.state.api_key = None
        if keys is None:
            return
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        digest = hash_api_key(key.strip()) if scheme.lower() == "bearer" and key.strip() else ""
        # Compare against every digest, so timing does not tell which (or whether any) matched first.
        found = None
        for known in keys:
            if hmac.compare_digest(digest, known.sha256):
                found = found or known
        request.state.api_key = found
        if found is None:
            what = "Invalid API key" if digest else "Missing API key"
            raise ApiError(401, f"{what}: send 'Authorization: Bearer <key>'.", "invalid_request_error",
                           code="invalid_api_key")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_key)])

    def pick(name: str) -> tuple[Generator, asyncio.Lock]:
        if name not in models:
            raise ApiError(404, f"The model {name!r} does not exist; known models: {', '.join(models)}.",
                           "invalid_request_error", "model", "model_not_found")
        return models[name], locks.setdefault(name, asyncio.Lock())

    def admit(request: Request, prompt_chars: int) -> str:
        """Check the prompt's size and the key's limits; returns the name usage is metered under."""
        if prompt_limits.max_prompt_chars is not None and prompt_chars > prompt_limits.max_prompt_chars:
            raise ApiError(413, f"The prompt has {prompt_chars} characters; this server accepts at most "
                           f"{prompt_limits.max_prompt_chars}.", "invalid_request_error", None, "prompt_too_large")
        key: ApiKey | None = request.state.api_key
        if key is None:
            return _ANONYMOUS
        try:
            limiter.admit(key)
        except LimitExceeded as exc:
            headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after is not None else None
            raise ApiError(429, exc.message, "insufficient_quota" if exc.retry_after is None else "requests",
                           None, exc.code, headers) from None
        return key.name

    @asynccontextmanager
    async def hold(model: str, lock: asyncio.Lock):
        metrics.queue_depth[model] += 1
        try:
            await lock.acquire()
        finally:
            metrics.queue_depth[model] -= 1
        try:
            yield
        finally:
            lock.release()

    async def run_locked(model: str, lock: asyncio.Lock, work):
        """``work()`` in a worker thread under the model's lock -> (its result, seconds it took).

        On timeout the client gets a 504 at once, but the lock is held until the thread ends: an
        engine cannot be stopped mid-call, and must not be entered by two threads.
        """
        metrics.queue_depth[model] += 1
        try:
            await lock.acquire()
        finally:
            metrics.queue_depth[model] -= 1
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
        timeout = prompt_limits.request_timeout_s
        try:
            result = await asyncio.wait_for(asyncio.shield(task), timeout)
        except asyncio.TimeoutError:
            raise ApiError(504, f"The request took longer than this server's limit of {timeout:g} s.",
                           "timeout_error", None, "request_timeout") from None
        return result, time.perf_counter() - start

    def finished(user: str, model: str, prompt_tokens: int, completion_tokens: int, seconds: float) -> None:
        limiter.record(user, prompt_tokens, completion_tokens)
        metrics.observe_generation(model, prompt_tokens, completion_tokens, seconds)

    @app.get("/metrics")
    async def prometheus_metrics():
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    @v1.get("/usage")
    async def usage(request: Request):
        key: ApiKey | None = request.state.api_key
        rows = limiter.usage_rows() if key is None else limiter.usage_rows(key.name)
        return {"object": "list", "data": rows}

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        return {"status": "ready", "models": list(models)}

    @v1.get("/models")
    async def list_models():
        return {"object": "list",
                "data": [{"id": n, "object": "model", "created": created, "owned_by": "slmforge"} for n in models]}

    @v1.get("/models/{name}")
    async def get_model(name: str):
        pick(name)
        return {"id": name, "object": "model", "created": created, "owned_by": "slmforge"}

    @v1.post("/completions")
    async def completions(body: CompletionRequest, request: Request):
        start = time.perf_counter()
        gen, lock = pick(body.model)
        params = body.params(_COMPLETION_MAX_TOKENS)
        _validate(params)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts:
            raise ApiError(400, "prompt is an empty list; give at least one prompt.", "invalid_request_error", "prompt")
        if body.stream:
            if len(prompts) != 1:
                raise ApiError(400, "Streaming takes one prompt; send a string, not a list.",
                               "invalid_request_error", "prompt")
            _check_streamable(params)
        user = admit(request, max(len(p) for p in prompts))
        explicit = body.max_tokens is not None

        def check() -> list[int]:
            counts = [_count_tokens(gen, p, special=True) for p in prompts]
            _check_prompt_tokens(gen, max(counts), params.max_new_tokens, explicit, prompt_limits)
            return counts

        rid, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            async with hold(body.model, lock):
                await run_in_threadpool(check)
            chunk = {"id": rid, "object": "text_completion", "created": now, "model": body.model}
            done = _StreamHooks(body.model, user, start, metrics, finished, prompt_limits.request_timeout_s)
            events = _stream_events(gen, lock, prompts[0], params, chunk, chat=False, usage=body.include_usage,
                                    hooks=done, hold=hold)
            return _sse(events)

        def work() -> tuple[list[list[Completion]], int]:
            prompt_tokens = sum(check())
            results = [gen.complete(prompts[0], params)] if len(prompts) == 1 else gen.complete_batch(prompts, params)
            return results, prompt_tokens

        # The engine (and its tokenizer) is used only under the model's lock, in a worker thread.
        (results, prompt_tokens), seconds = await run_locked(body.model, lock, work)
        choices, completion_tokens = [], 0
        for i, group in enumerate(results):
            for j, c in enumerate(group):
                choices.append({"index": i * params.n + j, "text": c.text, "logprobs": None,
                                "finish_reason": c.finish_reason})
                completion_tokens += c.tokens
        finished(user, body.model, prompt_tokens, completion_tokens, seconds)
        return {"id": rid, "object": "text_completion", "created": now, "model": body.model,
                "choices": choices, "usage": _usage(prompt_tokens, completion_tokens)}

    @v1.post("/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        start = time.perf_counter()
        gen, lock = pick(body.model)
        params = body.params(_CHAT_MAX_TOKENS)
        if body.max_completion_tokens is not None:
            params.max_new_tokens = body.max_completion_tokens
        _validate(params)
        messages = [m.plain() for m in body.messages]
        if body.stream:
            _check_streamable(params)
        user = admit(request, sum(len(m["content"]) for m in messages))
        explicit = body.max_tokens is not None or body.max_completion_tokens is not None

        def check() -> int:
            count = _count_tokens(gen, _render(gen, messages), special=False)
            _check_prompt_tokens(gen, count, params.max_new_tokens, explicit, prompt_limits)
            return count

        rid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            async with hold(body.model, lock):
                await run_in_threadpool(check)  # also: no chat template is a 400 now, not a broken stream
            chunk = {"id": rid, "object": "chat.completion.chunk", "created": now, "model": body.model}
            done = _StreamHooks(body.model, user, start, metrics, finished, prompt_limits.request_timeout_s)
            return _sse(_stream_events(gen, lock, messages, params, chunk, chat=True, usage=body.include_usage,
                                       hooks=done, hold=hold))

        def work() -> tuple[list[Completion], int]:
            prompt_tokens = check()
            return gen.chat(messages, params), prompt_tokens

        (replies, prompt_tokens), seconds = await run_locked(body.model, lock, work)
        finished(user, body.model, prompt_tokens, sum(c.tokens for c in replies), seconds)
        choices = [{"index": i, "message": {"role": "assistant", "content": c.text}, "logprobs": None,
                    "finish_reason": c.finish_reason} for i, c in enumerate(replies)]
        return {"id": rid, "object": "chat.completion", "created": now, "model": body.model,
                "choices": choices, "usage": _usage(prompt_tokens, sum(c.tokens for c in replies))}

    app.include_router(v1)
    return app


# --------------------------------------------------------------------------- helpers


def _validate(params: SamplingParams) -> None:
    try:
        params.validate()
    except GenerateError as exc:
        raise ApiError(400, str(exc), "invalid_request_error") from None


def _context_length(gen: Generator) -> int | None:
    """The model's context window in tokens, where the engine exposes one."""
    for holder in (gen, getattr(getattr(gen, "model", None), "config", None)):
        for attr in ("context_length", "max_position_embeddings"):
            value = getattr(holder, attr, None)
            if isinstance(value, int) and value > 0:
                return value
    return None


def _check_prompt_tokens(gen: Generator, prompt_tokens: int, max_new_tokens: int, explicit: bool,
                         limits: PromptLimits) -> None:
    if limits.max_prompt_tokens is not None and prompt_tokens > limits.max_prompt_tokens:
        raise ApiError(413, f"The prompt has {prompt_tokens} tokens; this server accepts at most "
                       f"{limits.max_prompt_tokens}.", "invalid_request_error", None, "prompt_too_large")
    context = _context_length(gen)
    if context is None:
        return
    # A default max_tokens is not the client's request, so only an explicit one counts against the window.
    wanted = prompt_tokens + (max_new_tokens if explicit else 1)
    if wanted > context:
        asked = f" plus max_tokens {max_new_tokens} ({wanted} in all)" if explicit else ""
        raise ApiError(400, f"This model's maximum context length is {context} tokens; the prompt has "
                       f"{prompt_tokens} tokens{asked}. Shorten the prompt or lower max_tokens.",
                       "invalid_request_error", None, "context_length_exceeded")


@dataclass
class _StreamHooks:
    """What a stream reports when its first text leaves and when it ends."""

    model: str
    user: str
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


def _check_streamable(params: SamplingParams) -> None:
    if params.n != 1:
        raise ApiError(400, f"Streaming returns one sequence; n must be 1 (got {params.n}).",
                       "invalid_request_error", "n")


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _render(gen: Generator, messages: list[dict[str, str]]) -> str:
    render = getattr(gen, "render_chat", None)
    if render is None:
        return "\n".join(m["content"] for m in messages)  # only for counting: engines render their own
    try:
        return render(messages)
    except GenerateError as exc:
        raise ApiError(400, str(exc), "invalid_request_error", "messages") from None


def _count_tokens(gen: Generator, text: str, special: bool) -> int:
    """Tokens in a prompt, by the engine's tokenizer; 0 for an engine that exposes none."""
    tokenizer = getattr(gen, "tokenizer", None)
    if tokenizer is None or not callable(tokenizer):
        return 0
    try:
        return len(tokenizer(text, add_special_tokens=special)["input_ids"])
    except Exception:  # a tokenizer with another call signature: usage is informative only
        return 0


def _sse(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _event(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


_END = object()


async def _stream_events(gen: Generator, lock: asyncio.Lock, prompt, params: SamplingParams,
                         chunk: dict[str, Any], chat: bool, usage: bool, hooks: _StreamHooks,
                         hold) -> AsyncIterator[str]:
    """OpenAI chunks for one streamed sequence, then ``data: [DONE]``.

    Each ``next()`` of the engine's iterator runs in a worker thread. If the client goes away the
    iterator is closed (in a thread), which stops the engine's generation.
    """

    def choice(delta_or_text, finish: str | None) -> dict[str, Any]:
        body = {"delta": delta_or_text} if chat else {"text": delta_or_text}
        return {**chunk, "choices": [{"index": 0, **body, "logprobs": None, "finish_reason": finish}]}

    async with hold(hooks.model, lock):
        deadline = None if hooks.timeout_s is None else time.perf_counter() + hooks.timeout_s
        pieces: list[str] = []
        try:
            it: Iterator[str] = await anyio.to_thread.run_sync(gen.stream, prompt, params)
        except GenerateError as exc:
            yield _event({"error": {"message": str(exc), "type": "invalid_request_error", "param": None,
                                    "code": None}})
            yield "data: [DONE]\n\n"
            return

        def count() -> tuple[int, int]:
            text = _render(gen, prompt) if chat else prompt
            return _count_tokens(gen, text, special=not chat), _count_tokens(gen, "".join(pieces), special=False)

        try:
            if chat:
                yield _event(choice({"role": "assistant", "content": ""}, None))
            while True:
                piece = await anyio.to_thread.run_sync(next, it, _END)
                if piece is _END:
                    break
                if deadline is not None and time.perf_counter() > deadline:
                    yield _event({"error": {"message": f"The request took longer than this server's limit of "
                                            f"{hooks.timeout_s:g} s.", "type": "timeout_error", "param": None,
                                            "code": "request_timeout"}})
                    yield "data: [DONE]\n\n"
                    return
                if not pieces:
                    hooks.first_piece()
                pieces.append(piece)
                yield _event(choice({"content": piece} if chat else piece, None))
        except GenerateError as exc:
            yield _event({"error": {"message": str(exc), "type": "server_error", "param": None, "code": None}})
            yield "data: [DONE]\n\n"
            return
        finally:
            close = getattr(it, "close", None)
            # Metered also when the client went away, so an abandoned stream still counts against its key.
            with anyio.CancelScope(shield=True):  # also when the client went away and we are cancelled
                if close is not None:
                    await anyio.to_thread.run_sync(close)
                prompt_tokens, completion_tokens = await anyio.to_thread.run_sync(count)
            hooks.done(prompt_tokens, completion_tokens)
    # The stream yields text only, so the finish reason is inferred from the re-tokenized text: a reply
    # that used its whole token budget is "length"; a shorter one ended at end-of-sequence or a stop string.
    finish = "length" if completion_tokens >= params.max_new_tokens else "stop"
    yield _event(choice({} if chat else "", finish))
    if usage:
        yield _event({**chunk, "choices": [], "usage": _usage(prompt_tokens, completion_tokens)})
    yield "data: [DONE]\n\n"
