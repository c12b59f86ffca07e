"""``POST /v1/embeddings``: vectors from a sentence-transformers model (or an upstream's)."""

from __future__ import annotations

import time

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from slmforge.errors import ModelError
from slmforge.serve._generation import refuse_unknown
from slmforge.serve._state import server, v1_router
from slmforge.serve.protocol import ApiError, EmbeddingRequest

router = v1_router()


@router.post("/embeddings")
async def embeddings(body: EmbeddingRequest, request: Request):
    state = server(request)
    served = state.pick(body.model, "embed")
    texts = [body.input] if isinstance(body.input, str) else body.input
    user = state.admit(request, sum(len(t) for t in texts if isinstance(t, str)), body.user)
    if served.kind == "upstream":
        return await state.proxy(served, "/embeddings", body, user)
    refuse_unknown(body.unknown_fields())
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
    state.finished(user, served.name, tokens, 0, time.perf_counter() - start)
    data = [{"object": "embedding", "index": i,
             "embedding": _b64_floats(v) if body.encoding_format == "base64" else v}
            for i, v in enumerate(vectors)]
    return {"object": "list", "data": data, "model": served.name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def _b64_floats(vector: list[float]) -> str:
    """``encoding_format: base64``: little-endian float32s, as OpenAI's clients decode them."""
    import array
    import base64

    return base64.b64encode(array.array("f", vector).tobytes()).decode("ascii")
