"""What describes and watches the server: ``/health``, ``/ready``, ``/metrics``, ``/v1/models``,
``/v1/usage``, and the OpenAPI pages when they are guarded by the API key."""

from __future__ import annotations

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from slmforge.serve._keys import ApiKey
from slmforge.serve._state import require_key, require_key_if_guarded, server, v1_router

router = APIRouter()
v1 = v1_router()


@router.get("/metrics", dependencies=[Depends(require_key_if_guarded)])
async def prometheus_metrics(request: Request):
    return PlainTextResponse(server(request).metrics.render(), media_type="text/plain; version=0.0.4")


@router.get("/health")
async def health():
    return {"status": "ok"}


@router.get("/ready")
async def ready(request: Request):
    return {"status": "ready", "models": list(server(request).models)}


@v1.get("/usage")
async def usage(request: Request):
    key: ApiKey | None = request.state.api_key
    limiter = server(request).limiter
    rows = limiter.usage_rows() if key is None else limiter.usage_rows(key.name)
    return {"object": "list", "data": rows}


@v1.get("/models")
async def list_models(request: Request):
    state = server(request)
    return {"object": "list", "data": [m.card(state.created) for m in state.models.values()]}


@v1.get("/models/{name}")
async def get_model(name: str, request: Request):
    state = server(request)
    if name not in state.models:
        state.pick(name, "generate")
    return state.models[name].card(state.created)


def add_guarded_docs(app: FastAPI) -> None:
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
