"""The FastAPI app behind ``slmforge.serve.create_app``: the shared state, the routers, errors, metrics.

Where things are: request models and the error body in ``protocol``; the state every route shares
(models, keys, limits, limiter, metrics, locks) in ``_state`` (``app.state.server``); one router per
concern in ``_completions``, ``_chat``, ``_embeddings`` and ``_admin`` (health, metrics, models, usage,
docs); what completions and chat share in ``_generation``; server-sent events in ``_streaming``; tools and
JSON output in ``_structured``. A new endpoint is a router module included below.
"""

from __future__ import annotations

import time
from contextlib import asynccontextmanager
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from slmforge.errors import GenerateError
from slmforge.serve import _admin, _chat, _completions, _embeddings
from slmforge.serve._keys import ApiKey
from slmforge.serve._limits import KeyLimiter, Metrics
from slmforge.serve._models import ServedModel
from slmforge.serve._state import PromptLimits, ServerState
from slmforge.serve.protocol import ApiError, error_response, validation_message

__all__ = ["PromptLimits", "build_app"]

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


def build_app(models: dict[str, ServedModel], keys: list[ApiKey] | None, prompt_limits: PromptLimits,
              limiter: KeyLimiter, metrics: Metrics, closers: list[Any] | None = None,
              shutdown_timeout_s: float = 30.0, public_metrics: bool = False,
              knowledge: dict[str, Any] | None = None, memory: Any = None, reasoning: Any = None) -> FastAPI:
    """The app over ``models``; its shared state is ``app.state.server`` (a ``ServerState``)."""
    state = ServerState(models, keys, prompt_limits, limiter, metrics, guarded=keys is not None and not public_metrics,
                        knowledge=dict(knowledge or {}), memory=memory, reasoning=reasoning)
    engines = state.batch_engines()

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
                  **({"openapi_url": None, "docs_url": None, "redoc_url": None} if state.guarded else {}))
    app.state.server = state
    app.add_middleware(_RequestMetrics, metrics=metrics)
    for name, engine in engines.items():
        metrics.running[name] = (lambda e=engine: e.busy)
        metrics.waiting[name] = (lambda e=engine: e.waiting)
        engine.on_step = (lambda size, n=name: metrics.observe_batch(n, size))
    _add_error_handlers(app)
    # The order of the routes is the order of the paths in /openapi.json.
    app.include_router(_admin.router)
    if state.guarded:
        _admin.add_guarded_docs(app)
    for router in (_admin.v1, _embeddings.router, _completions.router, _chat.router):
        app.include_router(router)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    """Every error in OpenAI's body shape: ours, pydantic's (a 400, not FastAPI's 422), the engines', 404s."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return error_response(exc.status, exc.message, exc.type, exc.param, exc.code, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        message, param = validation_message(exc)
        return error_response(400, message, "invalid_request_error", param)

    @app.exception_handler(GenerateError)
    async def _generate_error(request: Request, exc: GenerateError):
        return error_response(400, str(exc), "invalid_request_error")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_response(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", type_)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("slmforge")
    except PackageNotFoundError:
        return "0"
