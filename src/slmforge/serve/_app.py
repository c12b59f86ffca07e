"""The FastAPI app behind ``slmforge.serve.create_app``: request schemas, routes, errors, streaming."""

from __future__ import annotations

import asyncio
import hmac
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import Any, Literal

import anyio
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from slmforge.config import SamplingProfile
from slmforge.errors import GenerateError, ModelError
from slmforge.generate import (Completion, Generator, SamplingParams, chat_messages_for_template, check_tools,
                               json_schema_constraint, parallel_calls, parse_tool_calls, tool_call_schema,
                               tool_constraint)
from slmforge.serve._batch import BatchRequest, Finished, Handle, TokenEvent
from slmforge.serve._hash import hash_api_key
from slmforge.serve._keys import ApiKey
from slmforge.serve._limits import KeyLimiter, LimitExceeded, Metered, Metrics
from slmforge.serve._models import ServedModel
from slmforge.serve._upstream import UpstreamError

# Defaults when a request leaves a field out: OpenAI's, except chat max_tokens (OpenAI: up to the context).
_COMPLETION_MAX_TOKENS = 16
_CHAT_MAX_TOKENS = 128


# --------------------------------------------------------------------------- request schemas


class _Request(BaseModel):
    # Fields outside OpenAI's API (and the few extensions below) are refused with a 400 for local models,
    # rather than silently ignored: a client asking for penalties we do not implement should know. They
    # are kept (extra="allow") so a proxied model can pass them upstream.
    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=16)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: dict[str, bool] | None = None  # {"include_usage": true} adds a final usage chunk
    user: str | None = None  # the client's end user: usage is metered per key and per user
    # Extensions (as in vLLM): a sampling profile of the model or project, and more sampling knobs.
    profile: str | None = None
    top_k: int | None = Field(default=None, ge=1)
    repetition_penalty: float | None = Field(default=None, gt=0.0)
    ignore_eos: bool = False  # keep generating to max_tokens (benchmarks)
    logit_bias: dict[str, float] | None = None  # token id (as a string) -> bias in [-100, 100]

    def bias(self) -> dict[int, float] | None:
        """``logit_bias`` with integer ids.

        Raises:
            ApiError: A key that is not a token id, or a bias outside [-100, 100].
        """
        if not self.logit_bias:
            return None
        out = {}
        for key, value in self.logit_bias.items():
            if not key.strip().isdigit() or not -100 <= value <= 100:
                raise ApiError(400, f"logit_bias maps token ids (strings of digits) to numbers in [-100, 100]; got "
                               f"{key!r}: {value}.", "invalid_request_error", "logit_bias")
            out[int(key)] = float(value)
        return out

    def params(self, default_max_tokens: int, profile: SamplingProfile | None) -> SamplingParams:
        """The profile's values (or OpenAI's defaults: temperature 1), overridden by what the request sets."""
        if profile is not None:
            params = SamplingParams.from_profile(profile)
        else:
            params = SamplingParams(max_new_tokens=default_max_tokens, temperature=1.0)
        if self.max_tokens is not None:
            params.max_new_tokens = self.max_tokens
        for name in ("temperature", "top_k", "repetition_penalty", "seed"):
            if getattr(self, name) is not None:
                setattr(params, name, getattr(self, name))
        if self.top_p is not None:
            params.top_p = self.top_p if self.top_p < 1.0 else None
        if self.stop is not None:
            params.stop = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        params.n, params.ignore_eos = self.n, self.ignore_eos
        return params

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))

    def unknown_fields(self) -> list[str]:
        return sorted(self.model_extra or {})


class CompletionRequest(_Request):
    # Text, several texts, or token ids (one list, or one per prompt), as the legacy API and vLLM take them.
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=None, ge=0)  # 0: no completion (with echo, the prompt's logprobs alone)
    logprobs: int | None = Field(default=None, ge=0, le=20)  # the legacy API: the top-k count
    echo: bool = False  # the prompt before the completion, and with logprobs its tokens' (the first null)

    # The legacy API has no max_completion_tokens; nothing more to add.


class _TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class _FunctionCall(BaseModel):
    name: str
    arguments: str


class _ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: _FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[_TextPart] | None = None
    name: str | None = None  # accepted, unused
    tool_calls: list[_ToolCall] | None = None
    tool_call_id: str | None = None

    def plain(self) -> dict[str, Any]:
        text = self.content if isinstance(self.content, str) or self.content is None else \
            "".join(p.text for p in self.content)
        out: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role, "content": text}
        if self.tool_calls:
            out["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


class _JsonSchemaFormat(BaseModel):
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: _JsonSchemaFormat | None = None


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)  # the newer name of max_tokens
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None  # None = true, OpenAI's default: a reply may hold several calls


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = None

    def unknown_fields(self) -> list[str]:
        return sorted(self.model_extra or {})


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
              "/v1/embeddings", "/v1/usage")


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


def _add_guarded_docs(app: FastAPI, require_key) -> None:
    """``/openapi.json``, ``/docs`` and ``/redoc`` behind the API key (FastAPI's own routes take no dependency).

    A browser sends no bearer key, so with keys on the pages are for clients that send one; set
    ``serve.public_metrics`` to browse them."""
    from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html

    guard = [Depends(require_key)]

    @app.get("/openapi.json", include_in_schema=False, dependencies=guard)
    async def openapi():
        return JSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False, dependencies=guard)
    async def docs():
        return get_swagger_ui_html(openapi_url="/openapi.json", title=f"{app.title} - Swagger UI")

    @app.get("/redoc", include_in_schema=False, dependencies=guard)
    async def redoc():
        return get_redoc_html(openapi_url="/openapi.json", title=f"{app.title} - ReDoc")


def build_app(models: dict[str, ServedModel], keys: list[ApiKey] | None, prompt_limits: PromptLimits,
              limiter: KeyLimiter, metrics: Metrics, closers: list[Any] | None = None,
              shutdown_timeout_s: float = 30.0, public_metrics: bool = False) -> FastAPI:
    # With keys, what describes the server (metrics: models, traffic; the schema) needs a key too,
    # unless the operator makes it public (a Prometheus scraper without a key, a browsable /docs).
    guarded = keys is not None and not public_metrics
    engines = {id(m.batch): m.batch for m in models.values() if m.batch is not None}

    @asynccontextmanager
    async def lifespan(_app):
        try:
            yield
        finally:
            # uvicorn has already waited for in-flight requests; the engines end their last sequences.
            for engine in engines.values():
                await anyio.to_thread.run_sync(engine.stop, shutdown_timeout_s)
            for closer in closers or []:
                close = getattr(closer, "aclose", None)
                if close is not None:
                    await close()
                elif hasattr(closer, "stop"):
                    await anyio.to_thread.run_sync(closer.stop)

    app = FastAPI(title="slmforge", description="An OpenAI-compatible API over your own models.",
                  version=_version(), lifespan=lifespan,
                  **({"openapi_url": None, "docs_url": None, "redoc_url": None} if guarded else {}))
    app.add_middleware(_RequestMetrics, metrics=metrics)
    created = int(time.time())
    for name, engine in _engine_names(models).items():
        metrics.running[name] = (lambda e=engine: e.busy)
        metrics.waiting[name] = (lambda e=engine: e.waiting)
        engine.on_step = (lambda size, n=name: metrics.observe_batch(n, size))
    # Engines without our continuous batching take one request at a time (they are not safe to call from
    # two threads at once), or as many as their own slots (llama.cpp with parallel > 1). Created lazily
    # because an asyncio primitive belongs to the loop that first uses it.
    locks: dict[str, asyncio.Semaphore] = {}

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

    def pick(name: str, kind: str) -> ServedModel:
        served = models.get(name)
        if served is None:
            raise ApiError(404, f"The model {name!r} does not exist; known models: {', '.join(models)}.",
                           "invalid_request_error", "model", "model_not_found")
        if served.kind != kind and served.kind != "upstream":
            what = {"embed": "an embedding model (use /v1/embeddings)",
                    "generate": "a text generation model (use /v1/chat/completions or /v1/completions)"}[served.kind]
            raise ApiError(400, f"The model {name!r} is {what}.", "invalid_request_error", "model")
        return served

    def lock_for(name: str) -> asyncio.Semaphore:
        if name not in locks:
            # One semaphore per engine object, shared by every name that serves it.
            gen = models[name].generator
            twin = next((n for n in locks if models[n].generator is gen), None)
            locks[name] = locks[twin] if twin else asyncio.Semaphore(max(1, int(getattr(gen, "parallel", 1))))
        return locks[name]

    def admit(request: Request, prompt_chars: int, end_user: str | None = None) -> Metered:
        """Check the prompt's size and the key's limits; returns who usage is metered under: the key's
        name and the request's ``user`` (the client's own end user, kept per key)."""
        if prompt_limits.max_prompt_chars is not None and prompt_chars > prompt_limits.max_prompt_chars:
            raise ApiError(413, f"The prompt has {prompt_chars} characters; this server accepts at most "
                           f"{prompt_limits.max_prompt_chars}.", "invalid_request_error", None, "prompt_too_large")
        key: ApiKey | None = request.state.api_key
        if key is None:
            limiter.count(_ANONYMOUS, end_user)
            return Metered(_ANONYMOUS, end_user)
        try:
            limiter.admit(key, end_user)
        except LimitExceeded as exc:
            headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after is not None else None
            raise ApiError(429, exc.message, "insufficient_quota" if exc.retry_after is None else "requests",
                           None, exc.code, headers) from None
        return Metered(key.name, end_user)

    @asynccontextmanager
    async def hold(model: str, lock: asyncio.Semaphore):
        metrics.queue_depth[model] += 1
        try:
            await lock.acquire()
        finally:
            metrics.queue_depth[model] -= 1
        try:
            yield
        finally:
            lock.release()

    async def run_locked(model: str, lock: asyncio.Semaphore, work):
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
        try:
            result = await asyncio.wait_for(asyncio.shield(task), prompt_limits.request_timeout_s)
        except asyncio.TimeoutError:
            raise _timeout_error(prompt_limits.request_timeout_s) from None
        return result, time.perf_counter() - start

    def finished(user: Metered, model: str, prompt_tokens: int, completion_tokens: int, seconds: float) -> None:
        limiter.record(user, prompt_tokens, completion_tokens)
        metrics.observe_generation(model, prompt_tokens, completion_tokens, seconds)

    async def proxy(served: ServedModel, path: str, body: BaseModel, request: Request, user: Metered):
        """Forward a request to an upstream endpoint, metering its usage under the caller's key."""
        payload = body.model_dump(exclude_unset=True, by_alias=True)
        start = time.perf_counter()
        try:
            if not payload.get("stream"):
                answer = await served.upstream.post(path, payload)
                usage = answer.get("usage") or {}
                finished(user, served.name, int(usage.get("prompt_tokens") or 0),
                         int(usage.get("completion_tokens") or 0), time.perf_counter() - start)
                return {**answer, "model": served.name}
            events = await served.upstream.stream(path, payload)  # errors come here, before any byte
        except UpstreamError as exc:
            raise ApiError(exc.status, exc.message, exc.type, exc.param, exc.code, exc.headers) from None
        return StreamingResponse(_relay(events, served.name, user, start, finished, metrics),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.get("/metrics", dependencies=[Depends(require_key)] if guarded else [])
    async def prometheus_metrics():
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    if guarded:
        _add_guarded_docs(app, require_key)

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

    def card(name: str) -> dict[str, Any]:
        m = models[name]
        return {"id": name, "object": "model", "created": created, "owned_by": "slmforge",
                "engine": m.engine, "kind": m.kind, **({"adapter": m.adapter} if m.adapter else {}),
                "profiles": sorted(m.profiles), "default_profile": m.profile}

    @v1.get("/models")
    async def list_models():
        return {"object": "list", "data": [card(n) for n in models]}

    @v1.get("/models/{name}")
    async def get_model(name: str):
        if name not in models:
            pick(name, "generate")
        return card(name)

    @v1.post("/embeddings")
    async def embeddings(body: EmbeddingRequest, request: Request):
        served = pick(body.model, "embed")
        texts = [body.input] if isinstance(body.input, str) else body.input
        user = admit(request, sum(len(t) for t in texts if isinstance(t, str)), body.user)
        if served.kind == "upstream":
            return await proxy(served, "/embeddings", body, request, user)
        _refuse_unknown(body.unknown_fields())
        if not texts or not all(isinstance(t, str) for t in texts):
            raise ApiError(400, "input must be a string or a non-empty list of strings (token-id input is not "
                           "supported).", "invalid_request_error", "input")
        if any(not t for t in texts):
            raise ApiError(400, "input holds an empty string; every input needs some text.",
                           "invalid_request_error", "input")
        start = time.perf_counter()
        try:
            vectors, tokens = await run_in_threadpool(served.embedder.embed, list(texts), body.dimensions)
        except ModelError as exc:
            raise ApiError(400, str(exc), "invalid_request_error", "dimensions") from None
        finished(user, served.name, tokens, 0, time.perf_counter() - start)
        data = [{"object": "embedding", "index": i,
                 "embedding": _b64_floats(v) if body.encoding_format == "base64" else v}
                for i, v in enumerate(vectors)]
        return {"object": "list", "data": data, "model": served.name,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    @v1.post("/completions")
    async def completions(body: CompletionRequest, request: Request):
        start = time.perf_counter()
        served = pick(body.model, "generate")
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if prompts and isinstance(prompts[0], int):
            prompts = [prompts]  # one prompt of token ids
        if served.kind == "upstream":
            return await proxy(served, "/completions", body, request,
                               admit(request, sum(len(p) for p in prompts), body.user))
        _refuse_unknown(body.unknown_fields())
        params = body.params(_COMPLETION_MAX_TOKENS, _profile(served, body.profile))
        zero = body.max_tokens == 0  # as OpenAI: an empty completion (echo: the prompt alone)
        if zero:
            params.max_new_tokens = 1  # only to pass validation; nothing is generated
        _validate(params)
        if not prompts:
            raise ApiError(400, "prompt is an empty list; give at least one prompt.", "invalid_request_error", "prompt")
        token_ids = not isinstance(prompts[0], str)
        if token_ids and (served.batch is None or any(not p for p in prompts)):
            raise ApiError(400, f"A prompt of token ids needs the torch engine; model {served.name!r} runs on "
                           f"{served.engine}: send the prompt as text." if served.batch is None else
                           "A prompt of token ids is an empty list; give at least one token.",
                           "invalid_request_error", "prompt")
        if body.stream and (body.echo or zero):
            raise ApiError(400, "echo and max_tokens 0 are not streamed; send them with stream false.",
                           "invalid_request_error", "stream")
        if body.stream:
            if len(prompts) != 1:
                raise ApiError(400, "Streaming takes one prompt; send a string, not a list.",
                               "invalid_request_error", "prompt")
            if served.batch is None:
                _check_streamable(params)  # the batching engine streams n choices; the others one
        if served.batch is None:
            for asked, what in ((body.echo, "echo"), (body.logprobs is not None, "logprobs"),
                                (body.logit_bias, "logit_bias")):
                if asked:
                    _needs_batching(served, what)
        user = admit(request, max(len(p) for p in prompts), body.user)
        explicit = body.max_tokens is not None
        rid, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        chunk = {"id": rid, "object": "text_completion", "created": now, "model": body.model}

        if served.batch is not None:
            engine = served.batch
            ids = [list(p) if token_ids else await run_in_threadpool(engine.encode, p, True) for p in prompts]
            _check_token_ids(served.generator, ids)
            for one in ids:
                _check_prompt_tokens(served.generator, len(one), 0 if zero else params.max_new_tokens, explicit,
                                     prompt_limits)
            jobs = [BatchRequest(one, _one(params, i), served.adapter, None, body.logprobs, body.bias())
                    for one in ids for i in range(params.n)]
            if body.stream:
                hooks = _StreamHooks(body.model, user, start, metrics, finished, prompt_limits.request_timeout_s)
                handles = _submit_all(engine, jobs)  # bad parameters: a 400, not a broken stream
                return _sse(_batched_events(handles, chunk, chat=False, usage=body.include_usage,
                                            hooks=hooks, logprobs="completion" if body.logprobs is not None else None))
            echoed, seconds = [], 0.0
            if body.echo:
                echoed, seconds = await _echo_prompts(served, prompts, ids, body.logprobs,
                                                      prompt_limits.request_timeout_s)
            if zero:
                results = [("", Finished("length", len(one), 0), []) for one in ids for _ in range(params.n)]
            else:
                results, took = await _run_batched(
                    engine, jobs, prompt_limits.request_timeout_s, request,
                    lambda p, c, t: finished(user, body.model, p, c, t), jobs_per_prompt=params.n)
                seconds += took
            choices, completion_tokens = [], 0
            for index, (text, fin, lps) in enumerate(results):
                before, prompt_lps = echoed[index // params.n] if body.echo else ("", None)
                logprobs = _completion_logprobs(lps, len(before)) if body.logprobs is not None else None
                if prompt_lps is not None:
                    logprobs = {k: prompt_lps[k] + logprobs[k] for k in logprobs}
                choices.append({"index": index, "text": before + text, "finish_reason": fin.finish_reason,
                                "logprobs": logprobs})
                completion_tokens += fin.completion_tokens
            prompt_tokens = sum(len(one) for one in ids)
            finished(user, body.model, prompt_tokens, completion_tokens, seconds)
            return {"id": rid, "object": "text_completion", "created": now, "model": body.model,
                    "choices": choices, "usage": _usage(prompt_tokens, completion_tokens)}

        gen, lock = served.generator, lock_for(body.model)

        def check() -> list[int]:
            counts = [_count_tokens(gen, p, special=True) for p in prompts]
            _check_prompt_tokens(gen, max(counts), params.max_new_tokens, explicit, prompt_limits)
            return counts

        if body.stream:
            async with hold(body.model, lock):
                await run_in_threadpool(check)
            done = _StreamHooks(body.model, user, start, metrics, finished, prompt_limits.request_timeout_s)
            events = _stream_events(gen, lock, prompts[0], params, chunk, chat=False, usage=body.include_usage,
                                    hooks=done, hold=hold)
            return _sse(events)

        def work() -> tuple[list[list[Completion]], int]:
            prompt_tokens = sum(check())
            if zero:
                return [[Completion(text="", tokens=0, finish_reason="length")] * params.n for _ in prompts], \
                    prompt_tokens
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
        served = pick(body.model, "generate")
        raw = [m.plain() for m in body.messages]
        if served.kind == "upstream":
            return await proxy(served, "/chat/completions", body, request,
                               admit(request, sum(len(m["content"] or "") for m in raw), body.user))
        _refuse_unknown(body.unknown_fields())
        params = body.params(_CHAT_MAX_TOKENS, _profile(served, body.profile))
        if body.max_completion_tokens is not None:
            params.max_new_tokens = body.max_completion_tokens
        _validate(params)
        if body.stream and served.batch is None:
            _check_streamable(params)
        if body.top_logprobs is not None and not body.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true.", "invalid_request_error", "top_logprobs")
        tools, choice = _tool_setup(body)
        structured = body.response_format is not None and body.response_format.type != "text"
        # llama.cpp constrains by its own grammar engine: JSON under a schema, and forced tool calls.
        calling = bool(tools) and choice != "none"  # tools with tool_choice none are only context
        grammar = served.batch is None and served.engine == "llama.cpp" and (structured or (calling and choice != "auto"))
        if served.batch is None:
            for asked, what in ((body.logprobs, "logprobs"), (structured and not grammar, "response_format"),
                                (calling and not grammar, "tools"), (body.logit_bias, "logit_bias")):
                if asked:
                    _needs_batching(served, what)
        user = admit(request, sum(len(m["content"] or "") for m in raw), body.user)
        explicit = body.max_tokens is not None or body.max_completion_tokens is not None
        rid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        chunk = {"id": rid, "object": "chat.completion.chunk", "created": now, "model": body.model}

        if served.batch is not None:
            engine = served.batch
            parallel = parallel_calls(tools, choice, body.parallel_tool_calls)
            try:
                messages = chat_messages_for_template(raw, tools or [], choice if tools else "none", parallel)
            except GenerateError as exc:
                raise ApiError(400, str(exc), "invalid_request_error", "messages") from None
            constraint = await run_in_threadpool(_constraint_for, engine, body, tools, choice, params.max_new_tokens)
            try:
                text = await run_in_threadpool(engine.render_chat, messages)
            except GenerateError as exc:
                raise ApiError(400, str(exc), "invalid_request_error", "messages") from None
            ids = await run_in_threadpool(engine.encode, text, False)
            _check_prompt_tokens(served.generator, len(ids), params.max_new_tokens, explicit, prompt_limits)
            top = (body.top_logprobs or 0) if body.logprobs else None
            jobs = [BatchRequest(ids, _one(params, i), served.adapter, constraint, top, body.bias())
                    for i in range(params.n)]
            if body.stream:
                hooks = _StreamHooks(body.model, user, start, metrics, finished, prompt_limits.request_timeout_s)
                handles = _submit_all(engine, jobs)
                return _sse(_batched_events(handles, chunk, chat=True, usage=body.include_usage, hooks=hooks,
                                            logprobs="chat" if top is not None else None,
                                            tools=tools if choice != "none" else None))
            results, seconds = await _run_batched(engine, jobs, prompt_limits.request_timeout_s, request,
                                                  lambda p, c, t: finished(user, body.model, p, c, t),
                                                  jobs_per_prompt=params.n)
            choices, completion_tokens = [], 0
            for index, (text_out, fin, lps) in enumerate(results):
                message, reason = _assistant_message(text_out, fin.finish_reason, tools if choice != "none" else None)
                choices.append({"index": index, "message": message, "finish_reason": reason,
                                "logprobs": {"content": lps} if top is not None else None})
                completion_tokens += fin.completion_tokens
            finished(user, body.model, len(ids), completion_tokens, seconds)
            return {"id": rid, "object": "chat.completion", "created": now, "model": body.model,
                    "choices": choices, "usage": _usage(len(ids), completion_tokens)}

        gen, lock = served.generator, lock_for(body.model)
        messages = [{"role": m["role"], "content": m["content"] or ""} for m in raw]
        schema = None
        if grammar:
            parallel = parallel_calls(tools, choice, body.parallel_tool_calls)
            messages = chat_messages_for_template(raw, tools or [], choice if tools else "none", parallel)
            schema = _grammar_schema(body, tools, choice, parallel)

        def check() -> int:
            count = _count_tokens(gen, _render(gen, messages), special=False)
            _check_prompt_tokens(gen, count, params.max_new_tokens, explicit, prompt_limits)
            return count

        if body.stream and schema is None:
            async with hold(body.model, lock):
                await run_in_threadpool(check)  # also: no chat template is a 400 now, not a broken stream
            done = _StreamHooks(body.model, user, start, metrics, finished, prompt_limits.request_timeout_s)
            return _sse(_stream_events(gen, lock, messages, params, chunk, chat=True, usage=body.include_usage,
                                       hooks=done, hold=hold))

        def work() -> tuple[list[Completion], int]:
            prompt_tokens = check()
            if schema is not None:
                return gen.chat(messages, params, json_schema=schema), prompt_tokens
            return gen.chat(messages, params), prompt_tokens

        (replies, prompt_tokens), seconds = await run_locked(body.model, lock, work)
        completion_tokens = sum(c.tokens for c in replies)
        finished(user, body.model, prompt_tokens, completion_tokens, seconds)
        active_tools = tools if choice != "none" else None
        choices = []
        for i, c in enumerate(replies):
            message, reason = _assistant_message(c.text, c.finish_reason, active_tools)
            choices.append({"index": i, "message": message, "logprobs": None, "finish_reason": reason})
        if body.stream:  # a constrained llama.cpp reply, sent whole as one stream
            return _sse(_whole_stream(chunk, choices[0], _usage(prompt_tokens, completion_tokens)
                                      if body.include_usage else None))
        return {"id": rid, "object": "chat.completion", "created": now, "model": body.model,
                "choices": choices, "usage": _usage(prompt_tokens, completion_tokens)}

    app.include_router(v1)
    return app


# --------------------------------------------------------------------------- batched generation


def _engine_names(models: dict[str, ServedModel]) -> dict[str, Any]:
    """Each batching engine under the first name that serves it (adapters share their base's engine)."""
    out: dict[str, Any] = {}
    for name, m in models.items():
        if m.batch is not None and all(e is not m.batch for e in out.values()):
            out[name] = m.batch
    return out


def _one(params: SamplingParams, i: int) -> SamplingParams:
    """The i-th of n choices as its own sequence; a seeded request seeds choice i with seed + i."""
    return replace(params, n=1, seed=None if params.seed is None else params.seed + i, stop=list(params.stop))


def _submit_all(engine, jobs: list[BatchRequest]) -> list:
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


async def _run_batched(engine, jobs: list[BatchRequest], timeout_s: float | None, request: Request,
                       meter, jobs_per_prompt: int = 1) -> tuple[list, float]:
    """Submit every sequence, wait for all -> ([(text, Finished, logprob entries)], seconds).

    A client that disconnects, or a request past the timeout, frees its slots at the next step; what it
    had generated by then is still metered (``meter(prompt_tokens, completion_tokens, seconds)``).
    """
    start = time.perf_counter()
    handles = _submit_all(engine, jobs)

    async def collect(handle) -> tuple[str, Finished, list[dict[str, Any]]]:
        text, entries = [], []
        async for event in handle.events():
            if isinstance(event, Finished):
                if event.error:
                    raise ApiError(500, event.error, "server_error")
                return "".join(text), event, entries
            text.append(event.text)
            entries.extend(event.logprobs)
        raise ApiError(500, "The engine stopped before the reply ended.", "server_error")

    async def gone() -> None:
        # uvicorn does not cancel a plain (non-streaming) handler when its client leaves: poll for it.
        while not await request.is_disconnected():
            await asyncio.sleep(0.25)

    work = asyncio.ensure_future(asyncio.gather(*(collect(h) for h in handles)))
    watch = asyncio.ensure_future(gone())
    try:
        done, _ = await asyncio.wait({work, watch}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        if work in done:
            return work.result(), time.perf_counter() - start
        prompts = sum(h.prompt_tokens for h in handles) // max(1, jobs_per_prompt)  # n choices share a prompt
        meter(prompts, sum(h.completion_tokens for h in handles), time.perf_counter() - start)
        if watch in done:
            raise ApiError(499, "The client closed the connection.", "invalid_request_error")
        raise _timeout_error(timeout_s)
    finally:
        watch.cancel()
        if not work.done():
            work.cancel()
        for h in handles:
            h.cancel()  # a no-op for finished ones; frees the slots of the rest


async def _batched_events(handles: list, chunk: dict[str, Any], chat: bool, usage: bool,
                          hooks: _StreamHooks, logprobs: str | None, tools: list | None = None) -> AsyncIterator[str]:
    """OpenAI chunks for n sequences (choice ``index`` i) from the batching engine, then ``data: [DONE]``.

    With tools a reply is held until it ends: whether it is a tool call is known only then.
    """

    offsets = [0] * len(handles)  # characters of logprob tokens sent so far, per choice

    def choice(index: int, delta_or_text, finish: str | None, entries=None) -> dict[str, Any]:
        body = {"delta": delta_or_text} if chat else {"text": delta_or_text}
        lp = None
        if entries:
            lp = {"content": entries} if logprobs == "chat" else _completion_logprobs(entries, offsets[index])
            offsets[index] += sum(len(e["token"]) for e in entries)
        return {**chunk, "choices": [{"index": index, **body, "logprobs": lp, "finish_reason": finish}]}

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
                yield _event(choice(i, {"role": "assistant", "content": ""}, None))
        while any(f is None for f in fins):
            # Everything that arrived since the last chunk goes out as one chunk: one token per chunk when
            # the server keeps up, several when it is busy.
            try:
                index, events = await asyncio.wait_for(
                    arrived.get(), None if deadline is None else max(0.0, deadline - time.perf_counter()))
            except asyncio.TimeoutError:
                yield _timeout_event(hooks.timeout_s)
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
                yield _event(choice(index, {"content": text} if chat else text, None, entries))
    finally:
        for task in pumps:
            task.cancel()
        for handle in handles:
            handle.cancel()
        # Metered also when the client went away or the request timed out part way.
        hooks.done(handles[0].prompt_tokens, sum(h.completion_tokens for h in handles))
    failed = next((f for f in fins if f.error), None)
    if failed is not None:
        yield _event({"error": {"message": failed.error, "type": "server_error", "param": None, "code": None}})
        yield "data: [DONE]\n\n"
        return
    for i, fin in enumerate(fins):
        reason = fin.finish_reason
        if tools is not None:
            message, reason = _assistant_message("".join(held[i]), reason, tools)
            if message.get("tool_calls"):
                calls = [{"index": k, **c} for k, c in enumerate(message["tool_calls"])]
                yield _event(choice(i, {"tool_calls": calls}, None, held_logprobs[i]))
            else:
                yield _event(choice(i, {"content": message["content"]}, None, held_logprobs[i]))
        yield _event(choice(i, {} if chat else "", reason))
    if usage:
        yield _event({**chunk, "choices": [], "usage": _usage(fins[0].prompt_tokens,
                                                               sum(f.completion_tokens for f in fins))})
    yield "data: [DONE]\n\n"


def _tool_setup(body: ChatRequest) -> tuple[list[dict[str, Any]] | None, Any]:
    """Validated tools and tool_choice (OpenAI's default: auto with tools, none without)."""
    tools = body.tools or None
    choice = body.tool_choice if body.tool_choice is not None else ("auto" if tools else "none")
    if not tools:
        if choice not in ("none", None):
            raise ApiError(400, f"tool_choice {choice!r} needs tools.", "invalid_request_error", "tool_choice")
        return None, "none"
    try:
        check_tools(tools, choice)
    except GenerateError as exc:
        raise ApiError(400, str(exc), "invalid_request_error", "tools") from None
    if choice != "none" and body.response_format is not None and body.response_format.type != "text":
        raise ApiError(400, "Use either tools or response_format in one request, not both (the reply is "
                       "constrained to one shape).", "invalid_request_error", "response_format")
    return tools, choice


def _constraint_for(engine, body: ChatRequest, tools, choice, max_tokens: int):
    """The decoding constraint of a chat request (compiled and cached per schema), or None.

    Raises:
        ApiError: 400 for a schema or tools it cannot enforce, or a ``max_tokens`` below the shortest
            complete reply (the engine closes every reply within its budget, but not in fewer tokens).
    """
    try:
        if tools and choice != "none":
            constraint = tool_constraint(engine.tokenizer, tools, choice, eos_ids=engine.eos_ids,
                                         parallel=parallel_calls(tools, choice, body.parallel_tool_calls))
        elif body.response_format is None or body.response_format.type == "text":
            return None
        elif body.response_format.type == "json_object":
            constraint = json_schema_constraint(engine.tokenizer, None, eos_ids=engine.eos_ids)
        elif body.response_format.json_schema is None or body.response_format.json_schema.schema_ is None:
            raise GenerateError("response_format json_schema needs json_schema.schema (a JSON schema object).")
        else:
            constraint = json_schema_constraint(engine.tokenizer, body.response_format.json_schema.schema_,
                                                eos_ids=engine.eos_ids)
    except GenerateError as exc:
        raise ApiError(400, str(exc), "invalid_request_error", "tools" if tools else "response_format") from None
    if constraint is not None and constraint.min_tokens > max_tokens:
        what = "a complete tool call" if tools and choice != "none" else "the shortest JSON valid under the schema"
        raise ApiError(400, f"max_tokens is {max_tokens}, but {what} takes {constraint.min_tokens} tokens with this "
                       f"model's tokenizer; ask for max_tokens >= {constraint.min_tokens}.",
                       "invalid_request_error", "max_tokens")
    return constraint


def _grammar_schema(body: ChatRequest, tools, choice, parallel: bool = False) -> dict[str, Any]:
    """The JSON schema a grammar engine (llama.cpp) constrains a chat reply to (``parallel``: one call
    or an array of calls).

    Objects with listed properties get ``additionalProperties: false`` where the schema leaves it open,
    as the outlines-core path does: otherwise a small model invents keys until max_tokens.
    """
    if tools and choice != "none":
        return _closed(tool_call_schema(tools, choice, parallel))
    fmt = body.response_format
    if fmt.type == "json_object":
        return {"type": "object"}
    if fmt.json_schema is None or fmt.json_schema.schema_ is None:
        raise ApiError(400, "response_format json_schema needs json_schema.schema (a JSON schema object).",
                       "invalid_request_error", "response_format")
    return _closed(fmt.json_schema.schema_)


def _closed(schema: Any) -> Any:
    if isinstance(schema, list):
        return [_closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: (_closed(v) if k not in ("enum", "const", "default", "examples") else v) for k, v in schema.items()}
    if isinstance(schema.get("properties"), dict):
        out["properties"] = {k: _closed(v) for k, v in schema["properties"].items()}
        out.setdefault("additionalProperties", False)
    return out


async def _whole_stream(chunk: dict[str, Any], choice: dict[str, Any], usage: dict[str, int] | None):
    """A finished chat choice as OpenAI stream chunks: role, content or tool calls, finish, [usage], [DONE]."""
    message = choice["message"]
    head = {**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                  "finish_reason": None}]}
    yield _event(head)
    if message.get("tool_calls"):
        delta = {"tool_calls": [{"index": i, **c} for i, c in enumerate(message["tool_calls"])]}
    else:
        delta = {"content": message["content"]}
    yield _event({**chunk, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}]})
    yield _event({**chunk, "choices": [{"index": 0, "delta": {}, "logprobs": None,
                                        "finish_reason": choice["finish_reason"]}]})
    if usage is not None:
        yield _event({**chunk, "choices": [], "usage": usage})
    yield "data: [DONE]\n\n"


def _assistant_message(text: str, reason: str, tools: list | None) -> tuple[dict[str, Any], str]:
    """The reply as OpenAI's assistant message: tool calls (each with its own id) when the text is only
    calls, finishing ``tool_calls``; or ``length`` when max_tokens decided (the constraint then closed the
    calls early, so they are complete and valid, but perhaps shorter or fewer than the model meant)."""
    if tools:
        found = parse_tool_calls(text, tools)
        if found:
            calls = [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                      "function": {"name": c["name"], "arguments": json.dumps(c["arguments"])}} for c in found]
            return {"role": "assistant", "content": None, "tool_calls": calls}, \
                "length" if reason == "length" else "tool_calls"
    return {"role": "assistant", "content": text}, reason


def _completion_logprobs(entries: list[dict[str, Any]], start: int = 0) -> dict[str, Any]:
    """Chat-style per-token entries -> the legacy completions ``logprobs`` object (``text_offset`` counted
    from ``start``: a stream's later chunks continue where the earlier ones ended)."""
    offsets, at = [], start
    for e in entries:
        offsets.append(at)
        at += len(e["token"])
    return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries],
            "text_offset": offsets}


async def _echo_prompts(served: ServedModel, prompts: list, ids: list[list[int]], top: int | None,
                        timeout_s: float | None) -> tuple[list[tuple[str, dict[str, list] | None]], float]:
    """For ``echo``: each prompt's text and, when ``logprobs`` was asked for, its tokens in the legacy shape
    (``token_logprobs`` and ``top_logprobs`` null for the first token: nothing precedes it). The forward pass
    runs on the batching engine's thread, between its steps. Returns them and the seconds it took.
    """
    engine, gen = served.batch, served.generator

    def work() -> list[tuple[str, dict[str, list] | None]]:
        out = []
        for prompt, one in zip(prompts, ids):
            scored = gen.prompt_logprobs(one, top, served.adapter) if top is not None else None
            with engine.tokenizer_lock:
                text = prompt if isinstance(prompt, str) else gen.tokenizer.decode(one, skip_special_tokens=True)
                if scored is None:
                    out.append((text, None))
                    continue
                name = {t: gen.tokenizer.decode([t], skip_special_tokens=False)
                        for t in {*one, *(i for s in scored[1:] for i, _ in s[1])}}
                offsets, at = [], 0
                for t in one:  # a special token (BOS) is not in the text: it takes no characters
                    offsets.append(at)
                    at += len(gen.tokenizer.decode([t], skip_special_tokens=True))
            out.append((text, {"tokens": [name[t] for t in one],
                               "token_logprobs": [None, *(lp for lp, _ in scored[1:])],
                               "top_logprobs": [None, *({name[i]: v for i, v in alts} for _, alts in scored[1:])],
                               "text_offset": offsets}))
        return out

    start = time.perf_counter()
    try:
        result = await asyncio.wait_for(asyncio.wrap_future(engine.call(work)), timeout_s)
    except asyncio.TimeoutError:
        raise _timeout_error(timeout_s) from None
    return result, time.perf_counter() - start


def _check_token_ids(gen: Generator, ids: list[list[int]]) -> None:
    vocab = gen.model.get_input_embeddings().num_embeddings
    bad = sorted({t for one in ids for t in one if not 0 <= t < vocab})
    if bad:
        raise ApiError(400, f"The prompt holds token ids outside the vocabulary (0..{vocab - 1}): {bad[:5]}.",
                       "invalid_request_error", "prompt")


def _profile(served: ServedModel, name: str | None) -> SamplingProfile | None:
    name = name or served.profile
    if name is None:
        return None
    if name not in served.profiles:
        raise ApiError(400, f"Unknown profile {name!r} for model {served.name!r}; known: "
                       f"{', '.join(sorted(served.profiles)) or '(none)'}.", "invalid_request_error", "profile")
    return served.profiles[name]


def _refuse_unknown(fields: list[str]) -> None:
    if fields:
        raise ApiError(400, f"Unsupported field(s): {', '.join(fields)}. This server does not implement them for "
                       "local models; remove them from the request.", "invalid_request_error", fields[0])


def _needs_batching(served: ServedModel, what: str) -> None:
    raise ApiError(400, f"{what} is not available for model {served.name!r} (engine {served.engine}); it needs the "
                   "torch engine (a model folder served with continuous batching).", "invalid_request_error", what)


def _timeout_error(timeout: float | None) -> ApiError:
    return ApiError(504, f"The request took longer than this server's limit of {timeout:g} s.",
                    "timeout_error", None, "request_timeout")


def _timeout_event(timeout: float) -> str:
    """The error event and end of a stream that ran past the request timeout."""
    error = _timeout_error(timeout)
    return _event({"error": {"message": error.message, "type": error.type, "param": None, "code": error.code}}) + \
        "data: [DONE]\n\n"


def _b64_floats(vector: list[float]) -> str:
    import array
    import base64

    return base64.b64encode(array.array("f", vector).tobytes()).decode("ascii")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("slmforge")
    except PackageNotFoundError:
        return "0"


async def _relay(events, name: str, user: Metered, start: float, finished, metrics: Metrics) -> AsyncIterator[bytes]:
    """Pass an upstream stream through, timing its first event and metering its usage at the end."""
    first = True
    try:
        async for event in events:
            if first:
                first = False
                metrics.ttft[name].observe(time.perf_counter() - start)
            yield event
    finally:
        with anyio.CancelScope(shield=True):
            await events.aclose()
        usage = getattr(events, "usage", None) or {}
        finished(user, name, int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0),
                 time.perf_counter() - start)


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
    """Tokens in a prompt, by the engine's tokenizer (llama.cpp: its own ``tokenize``); 0 for an engine
    that exposes none."""
    tokenizer = getattr(gen, "tokenizer", None)
    if tokenizer is None or not callable(tokenizer):
        tokenize = getattr(gen, "tokenize", None)
        if callable(tokenize):
            try:
                return len(tokenize(text, add_special=special))
            except Exception:  # usage is informative only; never fail a request over it
                return 0
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


async def _stream_events(gen: Generator, lock: asyncio.Semaphore, prompt, params: SamplingParams,
                         chunk: dict[str, Any], chat: bool, usage: bool, hooks: _StreamHooks,
                         hold) -> AsyncIterator[str]:
    """OpenAI chunks for one streamed sequence of an engine without our batching, then ``data: [DONE]``.

    A producer thread runs the engine's iterator and hands pieces over like the batching engine does
    (``Handle``): one event-loop wake-up per drain, and what arrived meanwhile goes out as one chunk, so a
    fast engine (llama.cpp: ~0.4 ms a token) is not held to a thread hop per token. If the client goes
    away the producer stops and closes the iterator, which stops the engine's generation.
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

        handle, stop, failure = Handle(asyncio.get_running_loop()), threading.Event(), []

        def produce() -> None:
            try:
                for piece in it:
                    handle._put(TokenEvent(piece))
                    if stop.is_set():
                        break
            except Exception as exc:  # handed to the event loop below
                failure.append(exc)
            finally:
                close = getattr(it, "close", None)
                if close is not None:
                    close()
                handle._put(Finished("stop", 0, 0))

        producer = threading.Thread(target=produce, name="slmforge-stream", daemon=True)
        producer.start()
        try:
            if chat:
                yield _event(choice({"role": "assistant", "content": ""}, None))
            ended = False
            while not ended:
                try:
                    events = await asyncio.wait_for(
                        handle.drain(), None if deadline is None else max(0.0, deadline - time.perf_counter()))
                except asyncio.TimeoutError:
                    yield _timeout_event(hooks.timeout_s)
                    return
                ended = any(isinstance(e, Finished) for e in events)
                text = "".join(e.text for e in events if isinstance(e, TokenEvent))
                if text:
                    if not pieces:
                        hooks.first_piece()
                    pieces.append(text)
                    yield _event(choice({"content": text} if chat else text, None))
            if failure:
                message = str(failure[0]) if isinstance(failure[0], GenerateError) else \
                    f"Generation failed: {type(failure[0]).__name__}: {str(failure[0])[:300]}"
                yield _event({"error": {"message": message, "type": "server_error", "param": None, "code": None}})
                yield "data: [DONE]\n\n"
                return
        finally:
            stop.set()
            # Metered also when the client went away, so an abandoned stream still counts against its key.
            with anyio.CancelScope(shield=True):  # also when the client went away and we are cancelled
                await anyio.to_thread.run_sync(producer.join)
                prompt_tokens, completion_tokens = await anyio.to_thread.run_sync(count)
            hooks.done(prompt_tokens, completion_tokens)
    # The stream yields text only, so the finish reason is inferred from the re-tokenized text: a reply
    # that used its whole token budget is "length"; a shorter one ended at end-of-sequence or a stop string.
    finish = "length" if completion_tokens >= params.max_new_tokens else "stop"
    yield _event(choice({} if chat else "", finish))
    if usage:
        yield _event({**chunk, "choices": [], "usage": _usage(prompt_tokens, completion_tokens)})
    yield "data: [DONE]\n\n"
