"""Keys' limits, quotas and usage shared by several ``slmforge serve`` replicas through Redis.

``RedisKeyLimiter`` keeps ``KeyLimiter``'s interface and rules (a sliding 60-second window of requests and
of finished requests' tokens, a token quota, usage per key and per end user), with the state in Redis
instead of memory, so a key's quota is spent once whichever replica serves it. The check-and-count of a
request is one Lua script, atomic across replicas. Clocks are the replicas' wall clocks (keep them in sync,
as any cluster does). Calls are synchronous and short (one round trip to a nearby Redis), made from the
event loop as ``KeyLimiter``'s are.
"""

from __future__ import annotations

import math
import time
import uuid
from typing import Any

from slmforge.errors import ConfigError
from slmforge.serve._keys import ApiKey
from slmforge.serve._limits import _WINDOW_S, MAX_USER_CHARS, MAX_USERS_PER_KEY, OTHER_USERS, LimitExceeded, Metered

# KEYS: requests window, tokens window, usage hash. ARGV: now, window, rpm, tpm, quota (-1: none), member.
# Returns {0} admitted, {1, used} quota spent, {2, wait} requests per minute, {3, wait} tokens per minute.
_ADMIT = """
local now, window = tonumber(ARGV[1]), tonumber(ARGV[2])
local rpm, tpm, quota = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - window)
local used = tonumber(redis.call('HGET', KEYS[3], 'prompt_tokens') or '0')
           + tonumber(redis.call('HGET', KEYS[3], 'completion_tokens') or '0')
if quota >= 0 and used >= quota then return {1, tostring(used)} end
if rpm >= 0 and redis.call('ZCARD', KEYS[1]) >= rpm then
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return {2, tostring(tonumber(oldest[2]) + window - now)}
end
if tpm >= 0 then
  local entries = redis.call('ZRANGE', KEYS[2], 0, -1, 'WITHSCORES')
  local total = 0
  for i = 1, #entries, 2 do total = total + tonumber(string.match(entries[i], ':(%d+)$')) end
  if total >= tpm then
    local excess, wait = total - tpm, 0
    for i = 1, #entries, 2 do
      excess = excess - tonumber(string.match(entries[i], ':(%d+)$'))
      wait = tonumber(entries[i + 1]) + window - now
      if excess < 0 then break end
    end
    return {3, tostring(wait)}
  end
end
redis.call('ZADD', KEYS[1], now, ARGV[6])
redis.call('PEXPIRE', KEYS[1], math.ceil(window * 1000))
return {0, '0'}
"""
_FIELDS = ("requests", "prompt_tokens", "completion_tokens")


class RedisKeyLimiter:
    """``KeyLimiter`` over Redis (``redis://host:port/db``), shared by every replica given the same URL and
    ``prefix``.

    Raises:
        ConfigError: The redis package is missing (``pip install slmforge[scale]``), or Redis cannot be
            reached at ``url``.
    """

    def __init__(self, url: str, prefix: str = "slmforge") -> None:
        try:
            import redis
        except ImportError:
            raise ConfigError("Shared limits need Redis' client: pip install slmforge[scale]") from None
        self.db = redis.Redis.from_url(url, decode_responses=True, socket_timeout=5)
        try:
            self.db.ping()
        except redis.RedisError as e:
            raise ConfigError(f"serve.shared_state {url}: Redis does not answer ({e}).") from None
        self.prefix = prefix
        self._admit = self.db.register_script(_ADMIT)

    def _k(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    def admit(self, key: ApiKey, user: str | None = None) -> None:
        """As ``KeyLimiter.admit``: count a request against ``key``, or refuse it.

        Raises:
            LimitExceeded: The quota is spent, or the requests/tokens per minute are used up.
        """
        none = -1
        code, value = self._admit(
            keys=[self._k("req", key.name), self._k("tok", key.name), self._k("usage", key.name)],
            args=[time.time(), _WINDOW_S, key.requests_per_min if key.requests_per_min is not None else none,
                  key.tokens_per_min if key.tokens_per_min is not None else none,
                  key.quota_tokens if key.quota_tokens is not None else none, uuid.uuid4().hex])
        code = int(code)
        if code == 1:
            raise LimitExceeded(f"The key {key.name!r} has used its quota of {key.quota_tokens} tokens ({value} "
                                "used); ask for a new key or a larger quota.", "insufficient_quota", None)
        if code in (2, 3):
            wait = max(1, math.ceil(float(value)))
            what = f"{key.requests_per_min} requests" if code == 2 else f"{key.tokens_per_min} tokens"
            raise LimitExceeded(f"Rate limit of {what} per minute reached for the key {key.name!r}; retry in "
                                f"{wait} s.", "rate_limit_exceeded", wait)
        self._count_usage(key.name, user)

    def count(self, name: str, user: str | None = None) -> None:
        """Count a request without checking limits (a server without keys)."""
        self._count_usage(name, user)

    def _count_usage(self, name: str, user: str | None) -> None:
        pipe = self.db.pipeline()
        pipe.sadd(self._k("keys"), name)
        pipe.hincrby(self._k("usage", name), "requests", 1)
        if user:
            pipe.hincrby(self._user(name, user), "requests", 1)
        pipe.execute()

    def _user(self, name: str, user: str) -> str:
        """The hash of an end user's part (past MAX_USERS_PER_KEY users, the shared OTHER_USERS)."""
        user = user[:MAX_USER_CHARS]
        users = self._k("users", name)
        if not self.db.sismember(users, user) and self.db.scard(users) >= MAX_USERS_PER_KEY:
            user = OTHER_USERS
        self.db.sadd(users, user)
        return self._k("usage", name, "user", user)

    def record(self, who: Metered | str, prompt_tokens: int, completion_tokens: int) -> None:
        """Add a finished request's tokens to the key's (and end user's) usage and the key's token window."""
        name, user = (who, None) if isinstance(who, str) else who
        targets = [self._k("usage", name)] + ([self._user(name, user)] if user else [])
        pipe = self.db.pipeline()
        for t in targets:
            pipe.hincrby(t, "prompt_tokens", prompt_tokens)
            pipe.hincrby(t, "completion_tokens", completion_tokens)
        window = self._k("tok", name)
        pipe.zadd(window, {f"{uuid.uuid4().hex}:{prompt_tokens + completion_tokens}": time.time()})
        pipe.pexpire(window, int(_WINDOW_S * 1000))
        pipe.sadd(self._k("keys"), name)
        pipe.execute()

    def _row(self, key: str) -> dict[str, int]:
        values: dict[str, Any] = self.db.hgetall(key)
        row = {f: int(values.get(f, 0)) for f in _FIELDS}
        row["total_tokens"] = row["prompt_tokens"] + row["completion_tokens"]
        return row

    def usage_rows(self, name: str | None = None) -> list[dict]:
        """As ``KeyLimiter.usage_rows``, summed over every replica."""
        names = [name] if name is not None else sorted(self.db.smembers(self._k("keys")))
        return [{"name": n, **self._row(self._k("usage", n)),
                 "users": {u: self._row(self._k("usage", n, "user", u))
                           for u in sorted(self.db.smembers(self._k("users", n)))}}
                for n in names]
