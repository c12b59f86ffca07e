"""``POST /v1/chat/completions``: chat, with tools and ``response_format`` (our decoding constraint on the
batching engine, the grammar engine of llama.cpp otherwise), logprobs, n choices and streaming."""

from __future__ import annotations

import time
from typing import Any

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from slmforge.errors import GenerateError
from slmforge.generate import Completion, chat_messages_for_template, parallel_calls
from slmforge.serve._batch import BatchRequest
from slmforge.serve._generation import (
    Call,
    check_streamable,
    needs_batching,
    one,
    refuse_unknown,
    run_batched,
    submit_all,
    validate,
)
from slmforge.serve._knowledge import cite, cited_events, ground, not_in_documents_choice
from slmforge.serve._memory import remember_reply, with_memory, with_session
from slmforge.serve._models import ServedModel
from slmforge.serve._reason import chosen_strategy, reasoned_chat, trace_for
from slmforge.serve._state import ANONYMOUS, server, v1_router
from slmforge.serve._streaming import batched_events, sse, stream_events, whole_stream
from slmforge.serve._structured import assistant_message, constraint_for, grammar_schema, tool_setup
from slmforge.serve.protocol import ApiError, ChatRequest, usage_body

# Our default when a request leaves max_tokens out (OpenAI's: up to the context).
CHAT_MAX_TOKENS = 128

router = v1_router()


@router.post("/chat/completions")
async def chat_completions(body: ChatRequest, request: Request):
    start = time.perf_counter()
    state = server(request)
    strategy, strategy_n, name = chosen_strategy(state.reasoning, state.models, body)
    served = state.pick(name, "generate")
    raw = [m.plain() for m in body.messages]
    if strategy is not None:
        return await _reasoned(request, state, body, served, raw, strategy, strategy_n, start)
    if served.kind == "upstream":
        return await state.proxy(served, "/chat/completions", body,
                                 state.admit(request, sum(len(m["content"] or "") for m in raw), body.user))
    refuse_unknown([f for f in body.unknown_fields() if f != "strategy"])  # "strategy": "none" is ours
    params = body.params(CHAT_MAX_TOKENS, served.sampling_profile(body.profile))
    if body.max_completion_tokens is not None:
        params.max_new_tokens = body.max_completion_tokens
    validate(params)
    if body.stream and served.batch is None:
        check_streamable(params)
    if body.top_logprobs is not None and not body.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs: true.", "invalid_request_error", "top_logprobs")
    tools, choice = tool_setup(body)
    structured = body.response_format is not None and body.response_format.type != "text"
    # llama.cpp constrains by its own grammar engine: JSON under a schema, and forced tool calls.
    calling = bool(tools) and choice != "none"  # tools with tool_choice none are only context
    grammar = served.grammar and (structured or (calling and choice != "auto"))
    if served.batch is None:
        for asked, what in ((body.logprobs, "logprobs"), (structured and not grammar, "response_format"),
                            (calling and not grammar, "tools"), (body.logit_bias, "logit_bias")):
            if asked:
                needs_batching(served, what)
    user = state.admit(request, sum(len(m["content"] or "") for m in raw), body.user)
    explicit = body.max_tokens is not None or body.max_completion_tokens is not None
    call = Call(state, request, body.model, user, start, params, explicit, "chat.completion.chunk")
    if body.session is not None and state.memory is None:
        raise ApiError(400, "session needs the server's memory (serve.memory: true).", "invalid_request_error",
                       "session")
    if state.memory is not None:  # the caller's scope is its API key's name, never a request field
        raw = await run_in_threadpool(with_memory, state.memory, user.key, raw)
        if body.session is not None:
            def count(text: str) -> int:
                return served.count_tokens(text, special=False) or len(text) // 4

            raw = await run_in_threadpool(with_session, state.memory, user.key, body.session, raw, count)
    base = body.knowledge.base if body.knowledge else served.knowledge
    if base is not None:
        if tools or structured:
            raise ApiError(400, "A grounded chat (knowledge) cannot also use tools or response_format.",
                           "invalid_request_error", "knowledge")
        reply = await _grounded(call, body, served, raw, base)
    elif served.batch is not None:
        reply = await _batched(call, body, served, raw, tools, choice)
    else:
        reply = await _locked(call, body, served, raw, tools, choice, grammar)
    if body.session is not None:
        reply = await run_in_threadpool(remember_reply, state.memory, user.key, body.session, reply)
    return reply


async def _reasoned(request: Request, state, body: ChatRequest, served: ServedModel, raw: list[dict[str, Any]],
                    strategy: str, n: int | None, start: float):
    """A chat answered by a reasoning strategy (serve/_reason.py); a stream gets the finished reply."""
    refuse_unknown([f for f in body.unknown_fields() if f != "strategy"])
    params = body.params(CHAT_MAX_TOKENS, served.sampling_profile(body.profile) if served.kind != "upstream"
                         else None)
    if body.max_completion_tokens is not None:
        params.max_new_tokens = body.max_completion_tokens
    validate(params)
    user = state.admit(request, sum(len(m["content"] or "") for m in raw), body.user)
    call = Call(state, request, served.name, user, start, params, body.max_tokens is not None, "chat.completion.chunk")
    reply = await reasoned_chat(call, body, served, raw, strategy, n, state.reasoning)
    if body.stream:
        return sse(whole_stream(call.chunk, reply["choices"][0], reply["usage"] if body.include_usage else None))
    return reply


async def _grounded(call: Call, body: ChatRequest, served: ServedModel, raw: list[dict[str, Any]], base: str):
    """Answer from a knowledge base: retrieve, answer from the numbered sources, cite them; or say that the
    documents do not hold the answer without calling the model. A stream on the batching engine is sent as it
    is generated, the sources last; on other engines it gets the finished reply."""
    grounding = await run_in_threadpool(ground, call.state.knowledge, base, body, raw)
    if not grounding.sources:
        call.meter(0, 0, 0.0)
        reply = call.answer("chat.completion", [not_in_documents_choice()], 0, 0)
        reply["citations"] = []
    elif body.stream and served.batch is not None and call.params.n == 1:  # streamed as generated
        response = await _batched(call, body, served, grounding.messages, None, "none")
        return sse(cited_events(response.body_iterator, grounding.sources))
    else:
        whole = body.model_copy(update={"stream": False})
        if served.batch is not None:
            reply = await _batched(call, whole, served, grounding.messages, None, "none")
        else:
            reply = await _locked(call, whole, served, grounding.messages, None, "none", False)
        reply = cite(reply, grounding.sources)
    if body.stream:
        return sse(whole_stream(call.chunk, reply["choices"][0], reply["usage"] if body.include_usage else None))
    return reply


async def _batched(call: Call, body: ChatRequest, served: ServedModel, raw: list[dict[str, Any]], tools, choice):
    """On the continuous-batching engine: our decoding constraint for tools and JSON, logprobs, n choices."""
    engine, params, limits = served.batch, call.params, call.state.limits
    parallel = parallel_calls(tools, choice, body.parallel_tool_calls)
    try:
        messages = chat_messages_for_template(raw, tools or [], choice if tools else "none", parallel)
    except GenerateError as exc:
        raise ApiError(400, str(exc), "invalid_request_error", "messages") from None
    constraint = await run_in_threadpool(constraint_for, engine, body, tools, choice, params.max_new_tokens)
    try:
        text = await run_in_threadpool(engine.render_chat, messages)
    except GenerateError as exc:
        raise ApiError(400, str(exc), "invalid_request_error", "messages") from None
    ids = await run_in_threadpool(engine.encode, text, False)
    call.check_prompt_tokens(served, len(ids), params.max_new_tokens)
    top = (body.top_logprobs or 0) if body.logprobs else None
    jobs = [BatchRequest(ids, one(params, i), served.adapter, constraint, top, body.bias()) for i in range(params.n)]
    active_tools = tools if choice != "none" else None
    if body.stream:
        handles = submit_all(engine, jobs)
        return sse(batched_events(handles, call.chunk, chat=True, usage=body.include_usage, hooks=call.hooks(),
                                  logprobs="chat" if top is not None else None, tools=active_tools))
    results, seconds = await run_batched(engine, jobs, limits.request_timeout_s, call.request, call.meter,
                                         jobs_per_prompt=params.n)
    choices, completion_tokens = [], 0
    for index, (text_out, fin, lps) in enumerate(results):
        message, reason = assistant_message(text_out, fin.finish_reason, active_tools)
        choices.append({"index": index, "message": message, "finish_reason": reason,
                        "logprobs": {"content": lps} if top is not None else None})
        completion_tokens += fin.completion_tokens
    call.meter(len(ids), completion_tokens, seconds)
    return call.answer("chat.completion", choices, len(ids), completion_tokens)


async def _locked(call: Call, body: ChatRequest, served: ServedModel, raw: list[dict[str, Any]], tools, choice,
                  grammar: bool):
    """On an engine without our batching, under the model's lock; with ``grammar``, llama.cpp constrains
    the reply to a JSON schema (a stream of it is sent whole at the end)."""
    state, params = call.state, call.params
    gen, lock = served.generator, state.lock_for(body.model)
    messages = [{"role": m["role"], "content": m["content"] or ""} for m in raw]
    schema = None
    if grammar:
        parallel = parallel_calls(tools, choice, body.parallel_tool_calls)
        messages = chat_messages_for_template(raw, tools or [], choice if tools else "none", parallel)
        schema = grammar_schema(body, tools, choice, parallel)

    def check() -> int:
        count = served.count_tokens(served.render_chat(messages), special=False)
        call.check_prompt_tokens(served, count, params.max_new_tokens)
        return count

    if body.stream and schema is None:
        async with state.hold(body.model, lock):
            await run_in_threadpool(check)  # also: no chat template is a 400 now, not a broken stream
        return sse(stream_events(served, lock, messages, params, call.chunk, chat=True, usage=body.include_usage,
                                 hooks=call.hooks(), hold=state.hold))

    def work() -> tuple[list[Completion], int]:
        prompt_tokens = check()
        if schema is not None:
            return gen.chat(messages, params, json_schema=schema), prompt_tokens
        return gen.chat(messages, params), prompt_tokens

    (replies, prompt_tokens), seconds = await state.run_locked(body.model, lock, work)
    completion_tokens = sum(c.tokens for c in replies)
    call.meter(prompt_tokens, completion_tokens, seconds)
    active_tools = tools if choice != "none" else None
    choices = []
    for i, c in enumerate(replies):
        message, reason = assistant_message(c.text, c.finish_reason, active_tools)
        choices.append({"index": i, "message": message, "logprobs": None, "finish_reason": reason})
    if body.stream:  # a constrained llama.cpp reply, sent whole as one stream
        return sse(whole_stream(call.chunk, choices[0], usage_body(prompt_tokens, completion_tokens)
                                if body.include_usage else None))
    return call.answer("chat.completion", choices, prompt_tokens, completion_tokens)


@router.get("/traces/{trace_id}")
async def get_trace(trace_id: str, request: Request):
    """The internal calls of a request a reasoning strategy answered (its reply's ``slmforge.trace_id``)."""
    key = request.state.api_key
    return trace_for(server(request).reasoning, trace_id, key.name if key is not None else ANONYMOUS)
