"""Load testing an OpenAI-compatible server: throughput, latency percentiles and what a token costs.

    from slmforge.serve.bench import BENCH_PROMPTS, cost_report, run_load, start_server

    with start_server("runs/sft", max_batch_size=16) as server:
        result = run_load(server.base_url, "sft", concurrency=8, requests=64, prompts=BENCH_PROMPTS,
                          max_tokens=64)
    print(result.as_dict(), cost_report(result, ProjectConfig().serve.cost))

``run_load`` runs exactly ``concurrency`` clients, each sending streamed chat completions back to
back until ``requests`` have been sent in all. Per request it records the latency (send to the last
byte), the time to first token (send to the first chunk with text) and the completion tokens from
the final usage chunk (``stream_options: {"include_usage": true}``). Lengths are bounded by a fixed
``max_tokens``; a model may stop earlier at its end-of-sequence token, so reports give the real mean
tokens per request rather than assume ``max_tokens`` (OpenAI's API has no field to ignore EOS, and
the server rejects unknown fields).

httpx is imported inside the functions that use it, so importing this module stays cheap.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from slmforge.errors import SlmForgeError
from slmforge.serve._bench_server import ServerProcess, free_port, start_server

if TYPE_CHECKING:
    from slmforge.config import ServeCostConfig

__all__ = ["BENCH_PROMPTS", "BenchError", "LoadResult", "RequestRecord", "ServerProcess", "check_server",
           "cost_report", "free_port", "percentile", "run_load", "run_load_async", "start_server"]
# The server subprocess (free_port, ServerProcess, start_server) lives in the private _bench_server.

# A fixed list of domain-like questions (the quickstart domain is Python's documentation), so runs are
# comparable: request i always sends BENCH_PROMPTS[i % len(BENCH_PROMPTS)].
BENCH_PROMPTS: tuple[str, ...] = (
    "What does json.dumps do?",
    "How do I read a file line by line in Python?",
    "What is the difference between a list and a tuple?",
    "How do I sort a dictionary by its values?",
    "What does the with statement do?",
    "How do I create a virtual environment?",
    "What is a generator in Python?",
    "How do I format a string with f-strings?",
    "What does enumerate return?",
    "How do I handle an exception in Python?",
    "What is the difference between == and is?",
    "How do I join a list of strings?",
    "What does os.path.join do?",
    "How do I parse command line arguments with argparse?",
    "What is a decorator?",
    "How do I copy a list without changing the original?",
)

_HOUR_S = 3600.0
_DAY_H = 24.0


class BenchError(SlmForgeError):
    """A load test cannot run: the server is unreachable, refuses the key, lacks the model, or would not start."""


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class RequestRecord:
    """One request of a load test.

    Attributes:
        ok: The request got a 200 and a stream without an error event.
        status: The HTTP status; None when no response came (connection refused, timeout).
        latency_s: Seconds from sending the request to the last byte of the answer.
        ttft_s: Seconds from sending the request to the first chunk with text; None if no text came.
        completion_tokens: From the final usage chunk (else the number of text chunks).
        prompt_tokens: From the final usage chunk (0 if the server sent none).
        error: What went wrong, for a failed request.
    """

    ok: bool
    status: int | None
    latency_s: float
    ttft_s: float | None = None
    completion_tokens: int = 0
    prompt_tokens: int = 0
    error: str | None = None

    @property
    def error_kind(self) -> str:
        """``"http_<status>"``, ``"stream_error"`` (an error event in a 200 stream) or ``"connection"``."""
        if self.status is None:
            return "connection"
        return "stream_error" if self.status == 200 else f"http_{self.status}"


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0-100) with linear interpolation between ranks (numpy's default).

    Returns None for no values.
    """
    if not values:
        return None
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q must be within 0 and 100, got {q}")
    s = sorted(values)
    pos = (len(s) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


@dataclass
class LoadResult:
    """What a load test measured. Throughput counts successful requests only, over the whole wall time.

    Attributes:
        model: The model name sent in each request.
        concurrency: Clients that sent requests back to back.
        requests: Requests sent in all.
        max_tokens: ``max_tokens`` of every request.
        wall_s: Seconds from the first request sent to the last answer received.
        records: One per request, in the order they finished.
    """

    model: str
    concurrency: int
    requests: int
    max_tokens: int
    wall_s: float
    records: list[RequestRecord] = field(default_factory=list)

    @property
    def succeeded(self) -> list[RequestRecord]:
        return [r for r in self.records if r.ok]

    @property
    def error_count(self) -> int:
        return sum(1 for r in self.records if not r.ok)

    @property
    def errors_by_kind(self) -> dict[str, int]:
        """Failed requests by ``RequestRecord.error_kind`` (``http_429``, ``connection``...)."""
        counts: dict[str, int] = {}
        for r in self.records:
            if not r.ok:
                counts[r.error_kind] = counts.get(r.error_kind, 0) + 1
        return dict(sorted(counts.items()))

    @property
    def completion_tokens(self) -> int:
        return sum(r.completion_tokens for r in self.succeeded)

    @property
    def prompt_tokens(self) -> int:
        return sum(r.prompt_tokens for r in self.succeeded)

    @property
    def tokens_per_s(self) -> float:
        """Completion tokens of successful requests per second of wall time."""
        return self.completion_tokens / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def requests_per_s(self) -> float:
        """Successful requests per second of wall time."""
        return len(self.succeeded) / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def mean_completion_tokens(self) -> float:
        ok = self.succeeded
        return self.completion_tokens / len(ok) if ok else 0.0

    @property
    def mean_prompt_tokens(self) -> float:
        ok = self.succeeded
        return self.prompt_tokens / len(ok) if ok else 0.0

    def latency_percentiles(self) -> dict[str, float | None]:
        """P50/P95/P99 of the latency of successful requests, in seconds."""
        values = [r.latency_s for r in self.succeeded]
        return {f"p{q}": percentile(values, q) for q in (50, 95, 99)}

    def ttft_percentiles(self) -> dict[str, float | None]:
        """P50/P95/P99 of the time to first token of successful requests, in seconds."""
        values = [r.ttft_s for r in self.succeeded if r.ttft_s is not None]
        return {f"p{q}": percentile(values, q) for q in (50, 95, 99)}

    def as_dict(self, records: bool = False) -> dict[str, Any]:
        """JSON-able summary; ``records=True`` adds every request's record."""
        def rounded(d: dict[str, float | None]) -> dict[str, float | None]:
            return {k: None if v is None else round(v, 4) for k, v in d.items()}

        out: dict[str, Any] = {
            "model": self.model,
            "concurrency": self.concurrency,
            "requests": self.requests,
            "max_tokens": self.max_tokens,
            "succeeded": len(self.succeeded),
            "errors": self.error_count,
            "errors_by_kind": self.errors_by_kind,
            "wall_s": round(self.wall_s, 4),
            "tokens_per_s": round(self.tokens_per_s, 2),
            "requests_per_s": round(self.requests_per_s, 3),
            "completion_tokens": self.completion_tokens,
            "prompt_tokens": self.prompt_tokens,
            "mean_completion_tokens": round(self.mean_completion_tokens, 2),
            "mean_prompt_tokens": round(self.mean_prompt_tokens, 2),
            "latency_s": rounded(self.latency_percentiles()),
            "ttft_s": rounded(self.ttft_percentiles()),
        }
        if records:
            out["records"] = [asdict(r) for r in self.records]
        return out


# --------------------------------------------------------------------------- the load generator


def _api_root(base_url: str) -> str:
    """``http://host:port`` from ``http://host:port``, ``.../`` or ``.../v1``."""
    root = base_url.rstrip("/")
    return root[: -len("/v1")] if root.endswith("/v1") else root


async def _check_server(client: Any, root: str, model: str | None, headers: dict[str, str]) -> str:
    """The model to bench: ``model``, checked against GET /v1/models, or the server's first model.

    Raises:
        BenchError: The server cannot be reached, refuses the key or does not serve ``model``.
    """
    import httpx

    try:
        resp = await client.get(f"{root}/v1/models", headers=headers, timeout=10)
    except httpx.HTTPError as exc:
        raise BenchError(f"Could not reach a server at {root}: {type(exc).__name__}: {exc or 'no answer'}. "
                         "Is `slmforge serve` running there?") from None
    if resp.status_code == 401:
        raise BenchError(f"The server at {root} refused the request (401): give its API key with --api-key "
                         "or the SLMFORGE_API_KEY environment variable.")
    if resp.status_code != 200:
        raise BenchError(f"GET {root}/v1/models answered {resp.status_code}: {resp.text[:200]}. "
                         "Is this an OpenAI-compatible server?")
    try:
        names = [m["id"] for m in resp.json()["data"]]
    except (ValueError, KeyError, TypeError):
        raise BenchError(f"GET {root}/v1/models did not return OpenAI's model list; is this an "
                         "OpenAI-compatible server?") from None
    if model is None:
        if not names:
            raise BenchError(f"The server at {root} lists no model.")
        return names[0]
    if model not in names:
        raise BenchError(f"The server at {root} does not serve a model named {model!r}; it serves: "
                         f"{', '.join(names) or '(none)'}.")
    return model


def check_server(base_url: str, model: str | None = None, api_key: str | None = None) -> str:
    """The model a load test would use: ``model`` if the server lists it, else the server's first model.

    Raises:
        BenchError: The server cannot be reached, refuses the key or does not serve ``model``.
    """
    import httpx

    async def check() -> str:
        async with httpx.AsyncClient() as client:
            headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
            return await _check_server(client, _api_root(base_url), model, headers)

    return asyncio.run(check())


async def _one_request(client: Any, url: str, body: dict[str, Any], headers: dict[str, str]) -> RequestRecord:
    import httpx

    t0 = time.perf_counter()
    ttft: float | None = None
    chunks = 0
    usage: dict[str, int] | None = None
    try:
        async with client.stream("POST", url, json=body, headers=headers) as resp:
            if resp.status_code != 200:
                raw = await resp.aread()
                try:
                    message = json.loads(raw)["error"]["message"]
                except (ValueError, KeyError, TypeError):
                    message = raw.decode("utf-8", "replace")[:200]
                return RequestRecord(False, resp.status_code, time.perf_counter() - t0, error=message)
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[len("data:"):].strip()
                if data == "[DONE]":
                    break
                payload = json.loads(data)
                if "error" in payload:
                    message = str((payload["error"] or {}).get("message", payload["error"]))
                    return RequestRecord(False, 200, time.perf_counter() - t0, error=message)
                for choice in payload.get("choices") or []:
                    if (choice.get("delta") or {}).get("content") or choice.get("text"):  # chat, or completions
                        chunks += 1
                        if ttft is None:
                            ttft = time.perf_counter() - t0
                if payload.get("usage"):
                    usage = payload["usage"]
            latency = time.perf_counter() - t0
    except (httpx.HTTPError, ValueError) as exc:
        status = None if isinstance(exc, httpx.TransportError) else 200
        return RequestRecord(False, status, time.perf_counter() - t0, error=f"{type(exc).__name__}: {exc}")
    completion = int(usage["completion_tokens"]) if usage else chunks
    prompt = int(usage.get("prompt_tokens", 0)) if usage else 0
    return RequestRecord(True, 200, latency, ttft, completion, prompt)


async def run_load_async(
    base_url: str,
    model: str | None,
    concurrency: int,
    requests: int,
    prompts: Sequence[str] = BENCH_PROMPTS,
    max_tokens: int = 64,
    api_key: str | None = None,
    temperature: float = 0.0,
    timeout_s: float = 300.0,
    on_result: Callable[[RequestRecord], None] | None = None,
    extra_body: dict[str, Any] | None = None,
    completions: bool = False,
) -> LoadResult:
    """``run_load`` for code already inside an event loop; same arguments and result."""
    import httpx

    if concurrency < 1 or requests < 1 or max_tokens < 1:
        raise BenchError(f"concurrency, requests and max_tokens must be at least 1 "
                         f"(got {concurrency}, {requests}, {max_tokens}).")
    if not prompts:
        raise BenchError("No prompts to send.")
    root = _api_root(base_url)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=concurrency + 1, max_keepalive_connections=concurrency + 1)
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout_s, connect=10), limits=limits) as client:
        model = await _check_server(client, root, model, headers)
        url = f"{root}/v1/completions" if completions else f"{root}/v1/chat/completions"
        records: list[RequestRecord] = []
        next_index = 0

        async def worker() -> None:
            nonlocal next_index
            while next_index < requests:
                i = next_index
                next_index += 1  # no await between the check and the increment: no race in one event loop
                ask = ({"prompt": prompts[i % len(prompts)]} if completions
                       else {"messages": [{"role": "user", "content": prompts[i % len(prompts)]}]})
                body = {"model": model, **ask,
                        "max_tokens": max_tokens, "temperature": temperature, "stream": True,
                        "stream_options": {"include_usage": True}, **(extra_body or {})}
                record = await _one_request(client, url, body, headers)
                records.append(record)
                if on_result is not None:
                    on_result(record)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return LoadResult(model=model, concurrency=concurrency, requests=requests, max_tokens=max_tokens, wall_s=wall,
                      records=records)


def run_load(
    base_url: str,
    model: str | None,
    concurrency: int,
    requests: int,
    prompts: Sequence[str] = BENCH_PROMPTS,
    max_tokens: int = 64,
    api_key: str | None = None,
    temperature: float = 0.0,
    timeout_s: float = 300.0,
    on_result: Callable[[RequestRecord], None] | None = None,
    extra_body: dict[str, Any] | None = None,
    completions: bool = False,
) -> LoadResult:
    """Load-test an OpenAI-compatible server with streamed chat completions.

    Exactly ``concurrency`` clients each send requests back to back until ``requests`` have been sent;
    request ``i`` asks ``prompts[i % len(prompts)]``. Failed requests are recorded, not raised.

    Args:
        base_url: The server, ``http://host:port`` (a trailing ``/v1`` is accepted).
        model: The model name; None picks the first model the server lists.
        concurrency: Clients sending at once.
        requests: Requests in all.
        prompts: User messages to cycle through.
        max_tokens: ``max_tokens`` of each request (a model may stop earlier at end-of-sequence).
        api_key: Sent as ``Authorization: Bearer KEY``.
        temperature: 0 (greedy) by default, so runs of the same model produce the same lengths.
        timeout_s: Seconds one request may take before it counts as a connection error.
        on_result: Called with each finished request's record (for a progress bar).
        extra_body: More request fields, e.g. ``{"ignore_eos": True}`` (an slmforge and vLLM extension) so
            every reply is exactly ``max_tokens`` long and runs compare decoding at a fixed length.
        completions: Send each prompt as a plain text completion (/v1/completions) instead of a chat message
            (for a model without a chat template).

    Returns:
        The measurements.

    Raises:
        BenchError: Bad counts, or the server is unreachable, refuses the key or lacks the model
            (checked with GET /v1/models before the load starts).
    """
    return asyncio.run(run_load_async(base_url, model, concurrency, requests, prompts, max_tokens, api_key,
                                      temperature, timeout_s, on_result, extra_body, completions))


# --------------------------------------------------------------------------- cost


def cost_report(result: LoadResult, cost: ServeCostConfig,
                prompt_tokens_per_request: float | None = None) -> dict[str, Any]:
    """What a token costs on this hardware at the measured throughput, against the API it replaces.

    The hardware is paid by the hour whether busy or not, so its price per token assumes the server
    runs at the measured throughput all the time: ``hardware_usd_per_hour / (tokens_per_s * 3600) * 1000``
    per 1K output tokens. The API's price per 1K is for the same mix of prompt and output tokens per
    request, so the two compare like for like (the ratio is the same per 1K output or per 1K total).

    Args:
        result: A load test's result.
        cost: Prices (``serve.cost`` in the project file).
        prompt_tokens_per_request: Prompt tokens per request to price; None uses the measured mean.

    Returns:
        A JSON-able dict: ``usd_per_1k_output_tokens`` and ``usd_per_1k_total_tokens`` (this hardware),
        ``api_usd_per_1k_output_tokens`` and ``api_usd_per_1k_total_tokens``, ``cost_ratio`` (ours / API;
        below 1 is cheaper), ``usd_per_request`` and ``api_usd_per_request``,
        ``break_even_requests_per_day`` (requests a day at which a day of the machine, 24 h x its price,
        equals the API's bill) and ``capacity_requests_per_day`` (what the machine serves at the measured
        rate). Values that cannot be computed (no tokens generated, a free API) are None.
    """
    prompt = result.mean_prompt_tokens if prompt_tokens_per_request is None else float(prompt_tokens_per_request)
    completion = result.mean_completion_tokens
    hw = cost.hardware_usd_per_hour
    tps = result.tokens_per_s
    total_tps = tps * (prompt + completion) / completion if completion > 0 else 0.0
    ours_out = hw / (tps * _HOUR_S) * 1000 if tps > 0 else None
    ours_total = hw / (total_tps * _HOUR_S) * 1000 if total_tps > 0 else None
    ours_request = hw / (result.requests_per_s * _HOUR_S) if result.requests_per_s > 0 else None
    api_request = (prompt * cost.api_usd_per_1m_input_tokens + completion * cost.api_usd_per_1m_output_tokens) / 1e6
    api_out = api_request / completion * 1000 if completion > 0 else None
    api_total = api_request / (prompt + completion) * 1000 if prompt + completion > 0 else None
    ratio = ours_out / api_out if ours_out is not None and api_out else None
    break_even = hw * _DAY_H / api_request if api_request > 0 else None

    def r(v: float | None, digits: int = 8) -> float | None:  # significant digits: prices can be 1e-6 $
        return None if v is None else float(f"{v:.{digits}g}")

    return {
        "hardware_usd_per_hour": hw,
        "api_name": cost.api_name,
        "api_usd_per_1m_input_tokens": cost.api_usd_per_1m_input_tokens,
        "api_usd_per_1m_output_tokens": cost.api_usd_per_1m_output_tokens,
        "prompt_tokens_per_request": round(prompt, 2),
        "completion_tokens_per_request": round(completion, 2),
        "usd_per_1k_output_tokens": r(ours_out),
        "usd_per_1k_total_tokens": r(ours_total),
        "api_usd_per_1k_output_tokens": r(api_out),
        "api_usd_per_1k_total_tokens": r(api_total),
        "cost_ratio": r(ratio, 6),
        "usd_per_request": r(ours_request),
        "api_usd_per_request": r(api_request),
        "break_even_requests_per_day": None if break_even is None else round(break_even, 1),
        "capacity_requests_per_day": round(result.requests_per_s * _HOUR_S * _DAY_H, 1),
    }
