"""``POST /v1/completions``: the legacy text completions API (as lm-eval's local-completions reads it:
token-id prompts, several prompts, ``echo`` with the prompt's log-probabilities, ``max_tokens`` 0)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from slmforge.generate import Completion
from slmforge.serve._batch import BatchRequest, Finished
from slmforge.serve._generation import (
    Call,
    check_streamable,
    check_token_ids,
    needs_batching,
    one,
    refuse_unknown,
    run_batched,
    submit_all,
    validate,
)
from slmforge.serve._models import ServedModel
from slmforge.serve._state import server, v1_router
from slmforge.serve._streaming import batched_events, completion_logprobs, sse, stream_events
from slmforge.serve.protocol import ApiError, CompletionRequest, timeout_error

# OpenAI's default when a request leaves max_tokens out.
COMPLETION_MAX_TOKENS = 16

router = v1_router()


@router.post("/completions")
async def completions(body: CompletionRequest, request: Request):
    start = time.perf_counter()
    state = server(request)
    served = state.pick(body.model, "generate")
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if prompts and isinstance(prompts[0], int):
        prompts = [prompts]  # one prompt of token ids
    if served.kind == "upstream":
        return await state.proxy(served, "/completions", body,
                                 state.admit(request, sum(len(p) for p in prompts), body.user))
    refuse_unknown(body.unknown_fields())
    if body.suffix is not None:
        prompts = _fill_in_the_middle(body, served, prompts)
    params = body.params(COMPLETION_MAX_TOKENS, served.sampling_profile(body.profile))
    zero = body.max_tokens == 0  # as OpenAI: an empty completion (echo: the prompt alone)
    if zero:
        params.max_new_tokens = 1  # only to pass validation; nothing is generated
    validate(params)
    _check(body, served, params, prompts, zero)
    user = state.admit(request, max(len(p) for p in prompts), body.user)
    call = Call(state, request, body.model, user, start, params, body.max_tokens is not None, "text_completion")
    if served.batch is not None:
        return await _batched(call, body, served, prompts, zero)
    return await _locked(call, body, served, prompts, zero)


def _fill_in_the_middle(body: CompletionRequest, served: ServedModel, prompts: list) -> list[str]:
    """Each text prompt as the prefix of a fill-in-the-middle prompt with ``body.suffix`` after the gap.

    Raises:
        ApiError: 400 for token-id prompts, echo, or a model whose tokenizer has no FIM sentinels.
    """
    if not prompts or not isinstance(prompts[0], str):
        raise ApiError(400, "suffix (fill-in-the-middle) takes text prompts; send the prompt as a string.",
                       "invalid_request_error", "prompt")
    if body.echo:
        raise ApiError(400, "echo with suffix is not supported: the prompt the model sees is rearranged around "
                       "the gap; send echo false.", "invalid_request_error", "echo")
    out = [served.fim_prompt(p, body.suffix or "") for p in prompts]
    if out[0] is None:
        raise ApiError(400, f"Model {served.name!r} cannot fill in the middle: its tokenizer has no FIM sentinel "
                       "tokens (<|fim_prefix|>, <|fim_suffix|>, <|fim_middle|>). Train it with train.fim_rate > 0 "
                       "(the code template does), or leave out suffix.", "invalid_request_error", "suffix")
    return [p for p in out if p is not None]


def _check(body: CompletionRequest, served: ServedModel, params, prompts: list, zero: bool) -> None:
    """Raises: ApiError: 400 for what this model or streaming cannot do with these prompts."""
    if not prompts:
        raise ApiError(400, "prompt is an empty list; give at least one prompt.", "invalid_request_error", "prompt")
    token_ids = not isinstance(prompts[0], str)
    if token_ids and (served.batch is None or any(not p for p in prompts)):
        raise ApiError(400, f"A prompt of token ids needs the torch engine; model {served.name!r} runs on "
                       f"{served.engine}: send the prompt as text." if served.batch is None else
                       "A prompt of token ids is an empty list; give at least one token.",
                       "invalid_request_error", "prompt")
    if body.echo and body.logprobs is not None and served.batch is not None and not served.prompt_logprobs:
        raise ApiError(400, f"echo with logprobs scores the prompt's own tokens, which the {served.engine} engine of "
                       f"model {served.name!r} cannot; it needs the torch engine.", "invalid_request_error", "logprobs")
    if body.stream and (body.echo or zero):
        raise ApiError(400, "echo and max_tokens 0 are not streamed; send them with stream false.",
                       "invalid_request_error", "stream")
    if body.stream:
        if len(prompts) != 1:
            raise ApiError(400, "Streaming takes one prompt; send a string, not a list.",
                           "invalid_request_error", "prompt")
        if served.batch is None:
            check_streamable(params)  # the batching engine streams n choices; the others one
    if served.batch is None:
        for asked, what in ((body.echo, "echo"), (body.logprobs is not None, "logprobs"),
                            (body.logit_bias, "logit_bias")):
            if asked:
                needs_batching(served, what)


async def _batched(call: Call, body: CompletionRequest, served: ServedModel, prompts: list, zero: bool):
    """On the continuous-batching engine: n choices per prompt, logprobs, echo, token-id prompts."""
    engine, params, limits = served.batch, call.params, call.state.limits
    token_ids = not isinstance(prompts[0], str)
    ids = [list(p) if token_ids else await run_in_threadpool(engine.encode, p, True) for p in prompts]
    check_token_ids(served, ids)
    for prompt_ids in ids:
        call.check_prompt_tokens(served, len(prompt_ids), 0 if zero else params.max_new_tokens)
    jobs = [BatchRequest(prompt_ids, one(params, i), served.adapter, None, body.logprobs, body.bias())
            for prompt_ids in ids for i in range(params.n)]
    if body.stream:
        handles = submit_all(engine, jobs)  # bad parameters: a 400, not a broken stream
        return sse(batched_events(handles, call.chunk, chat=False, usage=body.include_usage, hooks=call.hooks(),
                                  logprobs="completion" if body.logprobs is not None else None))
    echoed, seconds = [], 0.0
    if body.echo:
        echoed, seconds = await _echo_prompts(served, prompts, ids, body.logprobs, limits.request_timeout_s)
    if zero:
        results = [("", Finished("length", len(prompt_ids), 0), []) for prompt_ids in ids for _ in range(params.n)]
    else:
        results, took = await run_batched(engine, jobs, limits.request_timeout_s, call.request, call.meter,
                                          jobs_per_prompt=params.n)
        seconds += took
    choices, completion_tokens = [], 0
    for index, (text, fin, lps) in enumerate(results):
        before, prompt_lps = echoed[index // params.n] if body.echo else ("", None)
        logprobs = completion_logprobs(lps, len(before)) if body.logprobs is not None else None
        if prompt_lps is not None:
            logprobs = {k: prompt_lps[k] + logprobs[k] for k in logprobs}
        choices.append({"index": index, "text": before + text, "finish_reason": fin.finish_reason,
                        "logprobs": logprobs})
        completion_tokens += fin.completion_tokens
    prompt_tokens = sum(len(prompt_ids) for prompt_ids in ids)
    call.meter(prompt_tokens, completion_tokens, seconds)
    return call.answer("text_completion", choices, prompt_tokens, completion_tokens)


async def _locked(call: Call, body: CompletionRequest, served: ServedModel, prompts: list, zero: bool):
    """On an engine without our batching (onnx, llama.cpp): one request at a time under the model's lock."""
    state, params = call.state, call.params
    gen, lock = served.generator, state.lock_for(body.model)

    def check() -> list[int]:
        counts = [served.count_tokens(p, special=True) for p in prompts]
        call.check_prompt_tokens(served, max(counts), params.max_new_tokens)
        return counts

    if body.stream:
        async with state.hold(body.model, lock):
            await run_in_threadpool(check)
        return sse(stream_events(served, lock, prompts[0], params, call.chunk, chat=False, usage=body.include_usage,
                                 hooks=call.hooks(), hold=state.hold))

    def work() -> tuple[list[list[Completion]], int]:
        prompt_tokens = sum(check())
        if zero:
            return [[Completion(text="", tokens=0, finish_reason="length")] * params.n for _ in prompts], \
                prompt_tokens
        results = [gen.complete(prompts[0], params)] if len(prompts) == 1 else gen.complete_batch(prompts, params)
        return results, prompt_tokens

    # The engine (and its tokenizer) is used only under the model's lock, in a worker thread.
    (results, prompt_tokens), seconds = await state.run_locked(body.model, lock, work)
    choices, completion_tokens = [], 0
    for i, group in enumerate(results):
        for j, c in enumerate(group):
            choices.append({"index": i * params.n + j, "text": c.text, "logprobs": None,
                            "finish_reason": c.finish_reason})
            completion_tokens += c.tokens
    call.meter(prompt_tokens, completion_tokens, seconds)
    return call.answer("text_completion", choices, prompt_tokens, completion_tokens)


async def _echo_prompts(served: ServedModel, prompts: list, ids: list[list[int]], top: int | None,
                        timeout_s: float | None) -> tuple[list[tuple[str, dict[str, list] | None]], float]:
    """For ``echo``: each prompt's text and, when ``logprobs`` was asked for, its tokens in the legacy shape
    (``token_logprobs`` and ``top_logprobs`` null for the first token: nothing precedes it). The forward pass
    runs on the batching engine's thread, between its steps. Returns them and the seconds it took.
    """
    engine, gen = served.batch, served.generator

    def work() -> list[tuple[str, dict[str, list] | None]]:
        out = []
        for prompt, prompt_ids in zip(prompts, ids):
            scored = gen.prompt_logprobs(prompt_ids, top, served.adapter) if top is not None else None
            with engine.tokenizer_lock:
                text = prompt if isinstance(prompt, str) else \
                    gen.tokenizer.decode(prompt_ids, skip_special_tokens=True)
                out.append((text, None if scored is None else _echo_logprobs(gen.tokenizer, prompt_ids, scored)))
        return out

    start = time.perf_counter()
    try:
        result = await asyncio.wait_for(asyncio.wrap_future(engine.call(work)), timeout_s)
    except asyncio.TimeoutError:
        raise timeout_error(timeout_s) from None
    return result, time.perf_counter() - start


def _echo_logprobs(tokenizer, prompt_ids: list[int], scored: list) -> dict[str, list[Any]]:
    """A prompt's tokens, their log-probabilities and offsets in the legacy shape (under the tokenizer lock)."""
    name = {t: tokenizer.decode([t], skip_special_tokens=False)
            for t in {*prompt_ids, *(i for s in scored[1:] for i, _ in s[1])}}
    offsets, at = [], 0
    for t in prompt_ids:  # a special token (BOS) is not in the text: it takes no characters
        offsets.append(at)
        at += len(tokenizer.decode([t], skip_special_tokens=True))
    return {"tokens": [name[t] for t in prompt_ids],
            "token_logprobs": [None, *(lp for lp, _ in scored[1:])],
            "top_logprobs": [None, *({name[i]: v for i, v in alts} for _, alts in scored[1:])],
            "text_offset": offsets}
