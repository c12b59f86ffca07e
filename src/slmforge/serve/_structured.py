"""Structured chat output: tools and ``response_format`` checked, turned into a decoding constraint (our
engine) or a JSON schema (a grammar engine: llama.cpp), and a reply read back as tool calls."""

from __future__ import annotations

import json
import uuid
from typing import Any

from slmforge.errors import GenerateError
from slmforge.generate import (
    check_tools,
    json_schema_constraint,
    parallel_calls,
    parse_tool_calls,
    tool_call_schema,
    tool_constraint,
)
from slmforge.serve.protocol import ApiError, ChatRequest


def tool_setup(body: ChatRequest) -> tuple[list[dict[str, Any]] | None, Any]:
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


def constraint_for(engine, body: ChatRequest, tools, choice, max_tokens: int):
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


def grammar_schema(body: ChatRequest, tools, choice, parallel: bool = False) -> dict[str, Any]:
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


def assistant_message(text: str, reason: str, tools: list | None) -> tuple[dict[str, Any], str]:
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
