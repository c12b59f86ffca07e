"""Per-key rate limits and quotas, usage metering, and Prometheus metrics, all in memory.

Pure Python (no fastapi), so the rules are tested without a server. Limits use a sliding
60-second window. Token limits count tokens of finished requests, so one request admitted
just under a limit may overshoot it; the next is refused until the window slides.

Usage is metered per key and, within a key, per end user: the ``user`` field a client sends
(OpenAI's "unique identifier of your end-user"), so a key holder serving many people sees who
used what. The field is the client's word, not an identity the server checked, and limits stay per key.
"""

from __future__ import annotations

import math
import time
from bisect import bisect_left
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

from slmforge.serve._keys import ApiKey

_WINDOW_S = 60.0
# ``user`` is chosen by the client, so what is kept of it is bounded: at most this many end users per
# key (later ones are summed under OTHER_USERS) and this many characters of each name.
MAX_USERS_PER_KEY = 10_000
MAX_USER_CHARS = 256
OTHER_USERS = "(other users)"


class Metered(NamedTuple):
    """Who a request is metered under: the key's name, and the request's ``user`` (None when not sent)."""

    key: str
    user: str | None = None


class LimitExceeded(Exception):
    """A request refused by a key's rate limit (``retry_after`` seconds) or quota (``retry_after`` None)."""

    def __init__(self, message: str, code: str, retry_after: int | None):
        super().__init__(message)
        self.message, self.code, self.retry_after = message, code, retry_after


@dataclass
class KeyUsage:
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    users: dict[str, KeyUsage] = field(default_factory=dict)  # end user -> their part (no deeper nesting)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def of_user(self, user: str) -> KeyUsage:
        """The part of an end user (created on first use; past MAX_USERS_PER_KEY, the shared OTHER_USERS)."""
        name = user[:MAX_USER_CHARS]
        if name not in self.users and len(self.users) >= MAX_USERS_PER_KEY:
            name = OTHER_USERS
        return self.users.setdefault(name, KeyUsage())

    def row(self) -> dict[str, int]:
        return {"requests": self.requests, "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens, "total_tokens": self.total_tokens}


@dataclass
class _Window:
    requests: deque[float] = field(default_factory=deque)
    tokens: deque[tuple[float, int]] = field(default_factory=deque)


class KeyLimiter:
    """Admits requests per key against its limits and meters what each key used.

    Not thread-safe: called from the event loop only.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._windows: dict[str, _Window] = defaultdict(_Window)
        self.usage: dict[str, KeyUsage] = defaultdict(KeyUsage)

    def admit(self, key: ApiKey, user: str | None = None) -> None:
        """Count a request against ``key`` (and its end ``user``, when given), or refuse it.

        Raises:
            LimitExceeded: The key's quota is spent, or its requests/tokens per minute are used up.
        """
        now = self._clock()
        w = self._windows[key.name]
        while w.requests and w.requests[0] <= now - _WINDOW_S:
            w.requests.popleft()
        while w.tokens and w.tokens[0][0] <= now - _WINDOW_S:
            w.tokens.popleft()
        used = self.usage[key.name]
        if key.quota_tokens is not None and used.total_tokens >= key.quota_tokens:
            raise LimitExceeded(f"The key {key.name!r} has used its quota of {key.quota_tokens} tokens "
                                f"({used.total_tokens} used); ask for a new key or a larger quota.",
                                "insufficient_quota", None)
        if key.requests_per_min is not None and len(w.requests) >= key.requests_per_min:
            wait = w.requests[0] + _WINDOW_S - now
            raise LimitExceeded(f"Rate limit of {key.requests_per_min} requests per minute reached for the key "
                                f"{key.name!r}; retry in {math.ceil(wait)} s.", "rate_limit_exceeded",
                                max(1, math.ceil(wait)))
        if key.tokens_per_min is not None:
            in_window = sum(t for _, t in w.tokens)
            if in_window >= key.tokens_per_min:
                # Wait until enough old tokens leave the window to bring the count under the limit.
                excess, wait = in_window - key.tokens_per_min, 0.0
                for stamp, tokens in w.tokens:
                    excess -= tokens
                    wait = stamp + _WINDOW_S - now
                    if excess < 0:
                        break
                raise LimitExceeded(f"Rate limit of {key.tokens_per_min} tokens per minute reached for the key "
                                    f"{key.name!r}; retry in {math.ceil(wait)} s.", "rate_limit_exceeded",
                                    max(1, math.ceil(wait)))
        w.requests.append(now)
        self.count(key.name, user)

    def count(self, name: str, user: str | None = None) -> None:
        """Count a request under ``name`` (and its end ``user``) without checking limits (a server without keys)."""
        used = self.usage[name]
        used.requests += 1
        if user:
            used.of_user(user).requests += 1

    def record(self, who: Metered | str, prompt_tokens: int, completion_tokens: int) -> None:
        """Add a finished request's tokens to the key's (and end user's) usage and the key's token window."""
        name, user = (who, None) if isinstance(who, str) else who
        used = self.usage[name]
        for part in (used, used.of_user(user)) if user else (used,):
            part.prompt_tokens += prompt_tokens
            part.completion_tokens += completion_tokens
        self._windows[name].tokens.append((self._clock(), prompt_tokens + completion_tokens))

    def usage_rows(self, name: str | None = None) -> list[dict]:
        """Usage per key (one key when ``name`` is given), as JSON-ready rows; ``users`` holds each end
        user's part (requests that sent no ``user`` are in the key's totals only)."""
        names = [name] if name is not None else sorted(self.usage)
        return [{"name": n, **self.usage[n].row(),
                 "users": {u: part.row() for u, part in sorted(self.usage[n].users.items())}}
                for n in names]


# --------------------------------------------------------------------------- Prometheus

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class _Histogram:
    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS):
        self.buckets, self.counts, self.sum, self.count = buckets, [0] * len(buckets), 0.0, 0

    def observe(self, value: float) -> None:
        i = bisect_left(self.buckets, value)
        if i < len(self.counts):
            self.counts[i] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str, labels: str) -> list[str]:
        sep = "," if labels else ""
        out, running = [], 0
        for bound, n in zip(self.buckets, self.counts, strict=True):
            running += n
            out.append(f'{name}_bucket{{{labels}{sep}le="{bound}"}} {running}')
        out.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.count}')
        out.append(f"{name}_sum{{{labels}}} {self.sum:.6f}")
        out.append(f"{name}_count{{{labels}}} {self.count}")
        return out


class Metrics:
    """Counters, gauges and histograms for ``GET /metrics``, written in Prometheus' text format."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, int], int] = defaultdict(int)
        self.latency: dict[str, _Histogram] = defaultdict(_Histogram)
        self.ttft: dict[str, _Histogram] = defaultdict(_Histogram)
        self.tokens_per_s: dict[str, _Histogram] = defaultdict(
            lambda: _Histogram((1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500)))
        self.prompt_tokens: dict[str, int] = defaultdict(int)
        self.completion_tokens: dict[str, int] = defaultdict(int)
        self.queue_depth: dict[str, int] = defaultdict(int)
        # Continuous batching: sequences in each forward pass, and sequences running now, per engine.
        self.batch_size: dict[str, _Histogram] = defaultdict(lambda: _Histogram((1, 2, 4, 8, 16, 32, 64, 128, 256)))
        self.running: dict[str, Callable[[], int]] = {}
        self.waiting: dict[str, Callable[[], int]] = {}  # batching engines' queues (queue_depth counts locks)

    def observe_request(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests[(endpoint, status)] += 1
        self.latency[endpoint].observe(seconds)

    def observe_generation(self, model: str, prompt_tokens: int, completion_tokens: int, seconds: float) -> None:
        self.prompt_tokens[model] += prompt_tokens
        self.completion_tokens[model] += completion_tokens
        if completion_tokens and seconds > 0:
            self.tokens_per_s[model].observe(completion_tokens / seconds)

    def observe_batch(self, engine: str, size: int) -> None:
        self.batch_size[engine].observe(size)

    def render(self) -> str:
        def esc(v: str) -> str:
            return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")

        lines = ["# HELP slmforge_requests_total HTTP requests by endpoint and status code.",
                 "# TYPE slmforge_requests_total counter"]
        lines += [f'slmforge_requests_total{{endpoint="{esc(e)}",code="{c}"}} {n}'
                  for (e, c), n in sorted(self.requests.items())]
        lines += ["# HELP slmforge_request_duration_seconds Time from request to the last byte of the answer.",
                  "# TYPE slmforge_request_duration_seconds histogram"]
        for e, h in sorted(self.latency.items()):
            lines += h.lines("slmforge_request_duration_seconds", f'endpoint="{esc(e)}"')
        lines += ["# HELP slmforge_time_to_first_token_seconds Streams: time from request to the first text.",
                  "# TYPE slmforge_time_to_first_token_seconds histogram"]
        for m, h in sorted(self.ttft.items()):
            lines += h.lines("slmforge_time_to_first_token_seconds", f'model="{esc(m)}"')
        lines += ["# HELP slmforge_tokens_per_second Completion tokens per second of generation, per request.",
                  "# TYPE slmforge_tokens_per_second histogram"]
        for m, h in sorted(self.tokens_per_s.items()):
            lines += h.lines("slmforge_tokens_per_second", f'model="{esc(m)}"')
        for name, values, help_ in (
            ("slmforge_prompt_tokens_total", self.prompt_tokens, "Prompt tokens processed."),
            ("slmforge_completion_tokens_total", self.completion_tokens, "Completion tokens generated."),
        ):
            lines += [f"# HELP {name} {help_}", f"# TYPE {name} counter"]
            lines += [f'{name}{{model="{esc(m)}"}} {n}' for m, n in sorted(values.items())]
        lines += ["# HELP slmforge_queue_depth Requests waiting for a busy model (or for a free slot in its batch).",
                  "# TYPE slmforge_queue_depth gauge"]
        depth = {**self.queue_depth, **{m: f() for m, f in self.waiting.items()}}
        lines += [f'slmforge_queue_depth{{model="{esc(m)}"}} {n}' for m, n in sorted(depth.items())]
        lines += ["# HELP slmforge_batch_size Sequences decoded together in one forward pass (continuous batching).",
                  "# TYPE slmforge_batch_size histogram"]
        for m, h in sorted(self.batch_size.items()):
            lines += h.lines("slmforge_batch_size", f'engine="{esc(m)}"')
        lines += ["# HELP slmforge_running_sequences Sequences running or waiting in a batching engine.",
                  "# TYPE slmforge_running_sequences gauge"]
        lines += [f'slmforge_running_sequences{{engine="{esc(m)}"}} {f()}' for m, f in sorted(self.running.items())]
        return "\n".join(lines) + "\n"
