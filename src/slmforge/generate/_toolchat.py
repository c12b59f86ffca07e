"""One tool-calling turn, or one JSON reply, over any engine; tool calls in the server's format.

An endpoint with its own function calling (``Capabilities.tools``: ``OpenAIGenerator``, so our server,
vLLM or a hosted API) gets the OpenAI messages and tools as they are. Every other engine gets the
conversation rendered as the server renders it for a plain chat template (``chat_messages_for_template``:
the tools system prompt, calls as JSON, results as user turns); an engine that constrains output to a JSON
schema (``Capabilities.grammar``: torch, llama.cpp) then writes a call that parses and validates, whenever
``tool_choice`` forces one. Under "auto" on such an engine the reply is free (a schema cannot say
"a call or plain text"); the caller validates what it gets.
"""

from __future__ import annotations

from typing import Any

from slmforge.generate import Completion, SamplingParams, as_engine
from slmforge.generate._tools import (
    _effective_choice,
    chat_messages_for_template,
    check_tools,
    parse_tool_calls,
    tool_call_schema,
)


def chat_with_tools(gen: Any, messages: list[dict[str, Any]], tools: list[dict[str, Any]],
                    tool_choice: Any = "auto", params: SamplingParams | None = None) -> list[Completion]:
    """``params.n`` assistant replies to an OpenAI conversation that may call ``tools``.

    Args:
        gen: Any ``Generator``.
        messages: OpenAI messages: system/user/assistant (with ``tool_calls``) and ``tool`` results.
        tools: OpenAI tools (``{"type": "function", "function": {"name", "description", "parameters"}}``).
        tool_choice: "auto", "required", "none" or ``{"type": "function", "function": {"name": ...}}``.
        params: Sampling (default: greedy, 256 tokens).

    Returns:
        Completions whose ``tool_calls`` is ``[{"name", "arguments"}]`` when the reply is calls the engine
        parsed (an endpoint's own, or our parse of the text, valid against the tools), else None with the
        reply in ``text``.

    Raises:
        GenerateError: Invalid tools or tool_choice, malformed messages, or the engine's own error.
    """
    params = params or SamplingParams(max_new_tokens=256)
    engine = as_engine(gen)
    check_tools(tools, tool_choice)
    if engine.capabilities.tools:
        return gen.chat_tools(messages, params, tools=tools, tool_choice=tool_choice)
    choice = _effective_choice(tools, tool_choice)
    plain = chat_messages_for_template(messages, tools, choice, parallel=False)
    forced = choice not in ("auto", "none")
    replies = chat_json(gen, plain, params, tool_call_schema(tools, choice) if forced else None)
    for reply in replies:
        if choice != "none":
            reply.tool_calls = parse_tool_calls(reply.text, tools)
    return replies


def chat_json(gen: Any, messages: list[dict[str, Any]], params: SamplingParams,
              schema: dict[str, Any] | None) -> list[Completion]:
    """``params.n`` replies that are JSON valid under ``schema`` on an engine that constrains output
    (``Capabilities.grammar``: torch, llama.cpp); elsewhere (or without a schema) plain replies, for the
    caller to parse leniently."""
    if schema is not None and as_engine(gen).capabilities.grammar:
        return gen.chat(messages, params, json_schema=schema)
    return gen.chat(messages, params)
