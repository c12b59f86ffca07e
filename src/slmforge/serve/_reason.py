"""Reasoning strategies per chat request: what ``slmforge proxy`` is, and what ``slmforge serve`` offers too.

A request picks a strategy by its ``strategy`` field, by a model-name prefix (``sc8-mymodel``: OptiLLM's
convention), or gets the server's default (``slmforge proxy --strategy``). The strategy runs over the
named model as a ``Generator`` (an upstream through ``OpenAIGenerator``, a local engine as it is) and its
internal calls are metered together: the reply's ``usage`` counts every one, under the caller's key, with
the server's own keys, limits and metrics. The reply carries ``slmforge.trace_id``; ``GET
/v1/traces/{id}`` returns the intermediate completions to the key that made the request.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Any

from starlette.concurrency import run_in_threadpool

from slmforge.errors import SlmForgeError
from slmforge.generate import OpenAIGenerator, as_engine
from slmforge.reasoning import STRATEGIES, Budget, extractor, run_strategy, split_model_prefix
from slmforge.serve._models import ServedModel
from slmforge.serve.protocol import ApiError, ChatRequest

TRACES_KEPT = 512  # the most recent traces a server keeps (in memory)


@dataclass
class Reasoning:
    """The server's strategy settings (``reason`` in the project file)."""

    default: str | None = None  # applied to every chat request that names none (the proxy's --strategy)
    n: int = 5
    temperature: float = 0.7
    max_tokens: int = 4096
    max_seconds: float = 120.0
    extract: str = "auto"
    traces: OrderedDict[str, dict[str, Any]] = field(default_factory=OrderedDict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    endpoints: dict[str, Any] = field(default_factory=dict)  # served name -> its _CountingEndpoint

    def endpoint(self, served: ServedModel) -> _CountingEndpoint:
        """The client of an upstream model, made once (it asks the upstream for its models, and holds a
        connection pool): a request must not pay for either."""
        with self.lock:
            if served.name not in self.endpoints:
                up = served.upstream
                self.endpoints[served.name] = _CountingEndpoint(up.base_url, up.upstream_model, api_key=up._api_key,
                                                                timeout_s=up.timeout_s)
            return self.endpoints[served.name]

    def keep(self, trace: dict[str, Any]) -> str:
        trace_id = f"trace-{uuid.uuid4().hex}"
        with self.lock:
            self.traces[trace_id] = trace
            while len(self.traces) > TRACES_KEPT:
                self.traces.popitem(last=False)
        return trace_id


def chosen_strategy(reasoning: Reasoning | None, models: dict[str, ServedModel], body: ChatRequest
                    ) -> tuple[str | None, int | None, str]:
    """(strategy or None, its n or None, the served model's name) for a chat request.

    Raises:
        ApiError: 400 for an unknown strategy in the ``strategy`` field.
    """
    asked = (body.model_extra or {}).get("strategy")
    n: int | None = None
    name = body.model
    if name not in models:
        prefix, n, rest = split_model_prefix(name)
        if prefix is not None and rest in models:
            asked, name = asked or prefix, rest
    if asked is not None and (not isinstance(asked, str) or asked not in (*STRATEGIES, "none")):
        raise ApiError(400, f"Unknown strategy {asked!r}; choose one of {', '.join(STRATEGIES)} or none.",
                       "invalid_request_error", "strategy")
    strategy = asked or (reasoning.default if reasoning else None)
    return (None if strategy in (None, "none") else strategy), n, name


class _Metered:
    """A ``Generator`` over the served model that counts the prompt tokens of every call made in the thread
    that calls ``begin`` (the strategy's): an upstream's by the usage it answers, a local engine's by its
    tokenizer. Completion tokens are in the completions."""

    def __init__(self, served: ServedModel, reasoning: Reasoning) -> None:
        self.endpoint = reasoning.endpoint(served) if served.kind == "upstream" else None
        self.inner: Any = self.endpoint if self.endpoint is not None else served.generator
        self.engine = as_engine(self.inner)
        self.counted = 0

    def begin(self) -> None:
        if self.endpoint is not None:
            self.endpoint.local.prompt_tokens = 0

    @property
    def prompt_tokens(self) -> int:
        """Counted so far (read it in the thread that called ``begin``)."""
        return self.endpoint.local.prompt_tokens if self.endpoint is not None else self.counted

    def _count(self, prompt: Any) -> None:
        if self.endpoint is None:
            text = prompt if isinstance(prompt, str) else self.engine.render_chat(prompt)
            self.counted += self.engine.count_tokens(text, special=isinstance(prompt, str))

    def complete(self, prompt: str, params: Any) -> Any:
        self._count(prompt)
        return self.inner.complete(prompt, params)

    def chat(self, messages: list[dict[str, Any]], params: Any) -> Any:
        self._count(messages)
        return self.inner.chat(messages, params)

    def stream(self, prompt: Any, params: Any) -> Any:
        self._count(prompt)
        return self.inner.stream(prompt, params)

    def complete_batch(self, prompts: list[str], params: Any) -> Any:
        return [self.complete(p, params) for p in prompts]

    def render_chat(self, messages: list[dict[str, Any]]) -> str:
        return self.engine.render_chat(messages)


class _CountingEndpoint(OpenAIGenerator):
    """``OpenAIGenerator`` shared by the requests to one upstream model, adding each answer's
    ``usage.prompt_tokens`` to the calling thread's count (each request's strategy runs in one thread)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.local = threading.local()

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        answer = super()._post(path, body)
        self.local.prompt_tokens = getattr(self.local, "prompt_tokens", 0) + int(
            (answer.get("usage") or {}).get("prompt_tokens") or 0)
        return answer


async def reasoned_chat(call: Any, body: ChatRequest, served: ServedModel, raw: list[dict[str, Any]],
                        strategy: str, n: int | None, reasoning: Reasoning) -> dict[str, Any]:
    """Answer a chat request by running ``strategy`` over the served model.

    Raises:
        ApiError: 400 for what a strategy cannot combine with (tools, response_format, logprobs, n > 1).
    """
    for asked, what in ((body.tools, "tools"), (body.response_format, "response_format"),
                        (body.logprobs, "logprobs"), ((body.n or 1) > 1, "n")):
        if asked:
            raise ApiError(400, f"A reasoning strategy ({strategy}) returns one answer and cannot be combined with "
                           f"{what}; drop one of them.", "invalid_request_error", what)
    if served.kind == "upstream" and not isinstance(getattr(served.upstream, "base_url", None), str):
        raise ApiError(400, f"The model {served.name!r} cannot run strategies.", "invalid_request_error", "model")
    messages = [{"role": m["role"], "content": m["content"] or ""} for m in raw]
    params = call.params
    budget = Budget(reasoning.max_tokens, reasoning.max_seconds)
    temperature = body.temperature if body.temperature else reasoning.temperature

    def work() -> tuple[Any, int]:  # in one worker thread: the strategy's calls and their count
        gen = _Metered(served, reasoning)
        gen.begin()
        result = run_strategy(strategy, gen, messages, n=n or reasoning.n, params=params, budget=budget,
                              extract=extractor(reasoning.extract), temperature=temperature)
        return result, gen.prompt_tokens

    start = time.perf_counter()
    try:
        result, prompt_tokens = await run_in_threadpool(work)
    except SlmForgeError as e:
        raise ApiError(502 if served.kind == "upstream" else 400, f"The strategy {strategy} failed: {e}",
                       "server_error" if served.kind == "upstream" else "invalid_request_error") from None
    seconds = time.perf_counter() - start
    completion_tokens = result.tokens
    call.meter(prompt_tokens, completion_tokens, seconds)
    trace_id = reasoning.keep({"key": call.user.key, "model": served.name, "strategy": strategy,
                               "answer": result.answer, "votes": result.votes, "stopped": result.stopped,
                               "calls": [asdict(c) for c in result.calls]})
    finish = "length" if result.stopped != "done" or (result.calls and result.calls[-1].finish_reason == "length") \
        else "stop"
    choice = {"index": 0, "message": {"role": "assistant", "content": result.text}, "logprobs": None,
              "finish_reason": finish}
    reply = call.answer("chat.completion", [choice], prompt_tokens, completion_tokens)
    reply["slmforge"] = {"trace_id": trace_id, "strategy": strategy, "answer": result.answer,
                         "calls": len(result.calls), "votes": result.votes, "stopped": result.stopped}
    return reply


def trace_for(reasoning: Reasoning | None, trace_id: str, key: str | None) -> dict[str, Any]:
    """The trace ``trace_id`` for the key that made it.

    Raises:
        ApiError: 404 for an unknown id or another key's trace (no difference is shown).
    """
    trace = reasoning.traces.get(trace_id) if reasoning else None
    if trace is None or trace["key"] != key:
        raise ApiError(404, f"No trace {trace_id!r} (traces are kept for the key that made the request, the "
                       f"latest {TRACES_KEPT}).", "invalid_request_error", "trace_id", "trace_not_found")
    return {"id": trace_id, "object": "slmforge.trace", **{k: v for k, v in trace.items() if k != "key"}}
