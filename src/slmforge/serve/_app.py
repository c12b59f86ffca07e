"""The FastAPI app behind ``slmforge.serve.create_app``: request schemas, routes, errors, streaming."""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any, Literal

import anyio
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from slmforge.errors import GenerateError
from slmforge.generate import Completion, Generator, SamplingParams
from slmforge.serve._hash import hash_api_key

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

    def __init__(self, status: int, message: str, type_: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def _error(status: int, message: str, type_: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(body, status_code=status, headers=headers)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    problems, param = [], None
    for e in exc.errors():
        loc = [str(p) for p in e.get("loc", ()) if p != "body"]
        where = ".".join(loc) or "body"
        param = param or (where if loc else None)
        problems.append(f"{where}: {e.get('msg', 'invalid')}")
    return "Invalid request: " + "; ".join(problems[:5]) + ".", param


# --------------------------------------------------------------------------- app


def build_app(models: dict[str, Generator], key_digests: set[str] | None) -> FastAPI:
    app = FastAPI(title="slmforge", docs_url=None, redoc_url=None, openapi_url=None)
    created = int(time.time())
    # One request per model at a time: engines are not safe to call from two threads at once.
    # Created lazily because an asyncio.Lock belongs to the loop that first uses it.
    locks: dict[str, asyncio.Lock] = {}

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return _error(exc.status, exc.message, exc.type, exc.param, exc.code)

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
        if key_digests is None:
            return
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        digest = hash_api_key(key.strip()) if scheme.lower() == "bearer" and key.strip() else ""
        # Compare against every digest, so timing does not tell which (or whether any) matched first.
        ok = False
        for known in key_digests:
            ok |= hmac.compare_digest(digest, known)
        if not ok:
            what = "Invalid API key" if digest else "Missing API key"
            raise ApiError(401, f"{what}: send 'Authorization: Bearer <key>'.", "invalid_request_error",
                           code="invalid_api_key")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_key)])

    def pick(name: str) -> tuple[Generator, asyncio.Lock]:
        if name not in models:
            raise ApiError(404, f"The model {name!r} does not exist; known models: {', '.join(models)}.",
                           "invalid_request_error", "model", "model_not_found")
        return models[name], locks.setdefault(name, asyncio.Lock())

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
    async def completions(body: CompletionRequest):
        gen, lock = pick(body.model)
        params = body.params(_COMPLETION_MAX_TOKENS)
        _validate(params)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts:
            raise ApiError(400, "prompt is an empty list; give at least one prompt.", "invalid_request_error", "prompt")
        rid, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            if len(prompts) != 1:
                raise ApiError(400, "Streaming takes one prompt; send a string, not a list.",
                               "invalid_request_error", "prompt")
            _check_streamable(params)
            chunk = {"id": rid, "object": "text_completion", "created": now, "model": body.model}
            events = _stream_events(gen, lock, prompts[0], params, chunk, chat=False, usage=body.include_usage)
            return _sse(events)

        def work() -> tuple[list[list[Completion]], int]:
            results = [gen.complete(prompts[0], params)] if len(prompts) == 1 else gen.complete_batch(prompts, params)
            return results, sum(_count_tokens(gen, p, special=True) for p in prompts)

        # The engine (and its tokenizer) is used only under the model's lock, in a worker thread.
        async with lock:
            results, prompt_tokens = await run_in_threadpool(work)
        choices, completion_tokens = [], 0
        for i, group in enumerate(results):
            for j, c in enumerate(group):
                choices.append({"index": i * params.n + j, "text": c.text, "logprobs": None,
                                "finish_reason": c.finish_reason})
                completion_tokens += c.tokens
        return {"id": rid, "object": "text_completion", "created": now, "model": body.model,
                "choices": choices, "usage": _usage(prompt_tokens, completion_tokens)}

    @v1.post("/chat/completions")
    async def chat_completions(body: ChatRequest):
        gen, lock = pick(body.model)
        params = body.params(_CHAT_MAX_TOKENS)
        if body.max_completion_tokens is not None:
            params.max_new_tokens = body.max_completion_tokens
        _validate(params)
        messages = [m.plain() for m in body.messages]
        rid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            _check_streamable(params)
            _render(gen, messages)  # no chat template: a 400 now, not a broken stream
            chunk = {"id": rid, "object": "chat.completion.chunk", "created": now, "model": body.model}
            return _sse(_stream_events(gen, lock, messages, params, chunk, chat=True, usage=body.include_usage))

        def work() -> tuple[list[Completion], int]:
            return gen.chat(messages, params), _count_tokens(gen, _render(gen, messages), special=False)

        async with lock:
            replies, prompt_tokens = await run_in_threadpool(work)
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
                         chunk: dict[str, Any], chat: bool, usage: bool) -> AsyncIterator[str]:
    """OpenAI chunks for one streamed sequence, then ``data: [DONE]``.

    Each ``next()`` of the engine's iterator runs in a worker thread. If the client goes away the
    iterator is closed (in a thread), which stops the engine's generation.
    """

    def choice(delta_or_text, finish: str | None) -> dict[str, Any]:
        body = {"delta": delta_or_text} if chat else {"text": delta_or_text}
        return {**chunk, "choices": [{"index": 0, **body, "logprobs": None, "finish_reason": finish}]}

    async with lock:
        pieces: list[str] = []
        try:
            it: Iterator[str] = await anyio.to_thread.run_sync(gen.stream, prompt, params)
        except GenerateError as exc:
            yield _event({"error": {"message": str(exc), "type": "invalid_request_error", "param": None,
                                    "code": None}})
            yield "data: [DONE]\n\n"
            return
        try:
            if chat:
                yield _event(choice({"role": "assistant", "content": ""}, None))
            while True:
                piece = await anyio.to_thread.run_sync(next, it, _END)
                if piece is _END:
                    break
                pieces.append(piece)
                yield _event(choice({"content": piece} if chat else piece, None))
        except GenerateError as exc:
            yield _event({"error": {"message": str(exc), "type": "server_error", "param": None, "code": None}})
            yield "data: [DONE]\n\n"
            return
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                with anyio.CancelScope(shield=True):  # also when the client went away and we are cancelled
                    await anyio.to_thread.run_sync(close)

        def count() -> tuple[int, int]:
            text = _render(gen, prompt) if chat else prompt
            return _count_tokens(gen, text, special=not chat), _count_tokens(gen, "".join(pieces), special=False)

        prompt_tokens, completion_tokens = await anyio.to_thread.run_sync(count)
    # The stream yields text only, so the finish reason is inferred from the re-tokenized text: a reply
    # that used its whole token budget is "length"; a shorter one ended at end-of-sequence or a stop string.
    finish = "length" if completion_tokens >= params.max_new_tokens else "stop"
    yield _event(choice({} if chat else "", finish))
    if usage:
        yield _event({**chunk, "choices": [], "usage": _usage(prompt_tokens, completion_tokens)})
    yield "data: [DONE]\n\n"
