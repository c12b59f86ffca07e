"""Two server replicas on 127.0.0.1 share keys' quotas, rate limits and usage through a real redis-server
(started here; `make test` installs the Debian package)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time

import openai
import pytest

from slmforge.errors import ConfigError
from slmforge.generate import Completion
from slmforge.serve import ApiKey, create_app, hash_api_key

from conftest import LiveServer

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None,
                                reason="redis-server is not installed (make test installs it)")


class Words:
    """Replies with four completion tokens."""

    def complete(self, prompt, params):
        return [Completion("one two three four", 4, "stop")]

    def chat(self, messages, params):
        return self.complete("", params)

    def stream(self, prompt, params):
        yield "one two three four"

    def complete_batch(self, prompts, params):
        return [self.complete(p, params) for p in prompts]


@pytest.fixture
def redis_url(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(tmp_path)], stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(timeout=10)


def _keys() -> list[ApiKey]:
    return [ApiKey("capped", hash_api_key("sk-capped"), quota_tokens=30),
            ApiKey("paced", hash_api_key("sk-paced"), requests_per_min=3),
            ApiKey("free", hash_api_key("sk-free"))]


def test_replicas_share_quota_rate_limit_and_usage(redis_url):
    apps = [create_app({"m": Words()}, _keys(), shared_state=redis_url) for _ in range(2)]
    with LiveServer(apps[0]) as a, LiveServer(apps[1]) as b:
        def ask(url, key, user=None):
            client = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)
            return client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], user=user)

        # every request costs prompt + 4 completion tokens; the quota of 30 runs out across both replicas
        spent, served = 0, 0
        while True:
            try:
                r = ask(a if served % 2 == 0 else b, "sk-capped")
            except openai.RateLimitError as e:
                assert "used its quota of 30 tokens" in str(e)
                break
            spent += r.usage.total_tokens
            served += 1
            assert served < 20
        assert served >= 2 and spent >= 30  # both replicas served part of it
        for url in (a, b):  # over quota on either replica
            with pytest.raises(openai.RateLimitError, match="quota"):
                ask(url, "sk-capped")
        # 3 requests a minute for the key, whichever replica gets them
        ask(a, "sk-paced"), ask(b, "sk-paced"), ask(a, "sk-paced")
        with pytest.raises(openai.RateLimitError, match="3 requests per minute"):
            ask(b, "sk-paced")
        ask(a, "sk-free", user="ana"), ask(b, "sk-free", user="ana"), ask(b, "sk-free", user="bo")
        rows = {r["name"]: r for r in apps[0].state.limiter.usage_rows()}
        assert rows == {r["name"]: r for r in apps[1].state.limiter.usage_rows()}  # one shared view
        assert rows["free"]["requests"] == 3 and rows["free"]["users"]["ana"]["requests"] == 2
        assert rows["free"]["completion_tokens"] == 12 and rows["capped"]["total_tokens"] == spent


def test_an_unreachable_redis_is_a_clear_error():
    with pytest.raises(ConfigError, match="Redis does not answer"):
        create_app({"m": Words()}, _keys(), shared_state="redis://127.0.0.1:1/0")
