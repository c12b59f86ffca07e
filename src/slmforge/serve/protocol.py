"""OpenAI's API as this server speaks it: request models, the error type and its body shape.

The request models are pydantic, so FastAPI validates a body before a handler sees it and the OpenAPI
schema (``/openapi.json``) is written from them. Handlers live in the route modules (``_completions``,
``_chat``, ``_embeddings``, ``_admin``); what they share is in ``_state`` and ``_generation``.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from slmforge.config import SamplingProfile
from slmforge.generate import SamplingParams

__all__ = ["ApiError", "ChatMessage", "ChatRequest", "CompletionRequest", "EmbeddingRequest", "ResponseFormat",
           "error_response", "timeout_error", "usage_body", "validation_message"]


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
    suffix: str | None = None  # fill-in-the-middle: the text after the completion (code models, train.fim_rate)

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


class Knowledge(BaseModel):
    """Our extension of chat requests: answer from a knowledge base (``slmforge rag``), with citations."""

    model_config = ConfigDict(extra="forbid")
    base: str
    k: int | None = Field(default=None, ge=1, le=50)
    mode: Literal["dense", "bm25", "hybrid", "graph"] | None = None  # graph: `slmforge graph build` + vectors
    where: dict[str, str | list[str]] | None = None
    min_score: float | None = Field(default=None, ge=-1, le=1)


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)  # the newer name of max_tokens
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None  # None = true, OpenAI's default: a reply may hold several calls
    knowledge: Knowledge | None = None  # extension: ground the answer in a knowledge base
    session: str | None = Field(default=None, min_length=1, max_length=200)  # extension: a server-kept session


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


def error_response(status: int, message: str, type_: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    """OpenAI's error body; a 401 also names the scheme it wants (``WWW-Authenticate: Bearer``)."""
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    headers = {**({"WWW-Authenticate": "Bearer"} if status == 401 else {}), **(headers or {})}
    return JSONResponse(body, status_code=status, headers=headers or None)


def validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """pydantic's complaints as one message (the first five) and the first field they name."""
    problems, param = [], None
    for e in exc.errors():
        loc = [str(p) for p in e.get("loc", ()) if p != "body"]
        where = ".".join(loc) or "body"
        param = param or (where if loc else None)
        problems.append(f"{where}: {e.get('msg', 'invalid')}")
    return "Invalid request: " + "; ".join(problems[:5]) + ".", param


def timeout_error(timeout: float | None) -> ApiError:
    """The 504 of a request past ``serve.request_timeout_s`` (a stream gets it as an error event)."""
    return ApiError(504, f"The request took longer than this server's limit of {timeout:g} s.",
                    "timeout_error", None, "request_timeout")


def usage_body(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """OpenAI's ``usage`` object."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
