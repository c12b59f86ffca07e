"""API keys, rate limits, quotas, request size limits, usage metering and /metrics of `slmforge serve`:
pure rules with a fake clock, then a real uvicorn driven by the ``openai`` client and httpx."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch

from slmforge.config import GenerateConfig
from slmforge.errors import ConfigError
from slmforge.model import build_model, save_model_folder
from slmforge.serve import ApiKey, add_key, create_app, hash_api_key, read_keys_file, revoke_key, usage_csv
from slmforge.serve._limits import KeyLimiter, LimitExceeded, Metrics
from slmforge.tokenizer import load_tokenizer

from conftest import TINY, build_tiny_tokenizer

CONTEXT = 64
TINY_CONTEXT = TINY.model_copy(update={"max_position_embeddings": CONTEXT})
PROMPT = "The garden was"


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    yield


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("serve_limits")
    tok = load_tokenizer(build_tiny_tokenizer(workdir, vocab_size=400))
    ids = {"bos": tok.bos_token_id, "eos": tok.eos_token_id, "pad": tok.pad_token_id}
    model = build_model(TINY_CONTEXT, vocab_size=len(tok), special_ids=ids, seed=0)
    with torch.no_grad():
        model.lm_head.weight.mul_(30)
        model.lm_head.weight[: 5 + 256] = 0
    folder = workdir / "tiny"
    save_model_folder(model, tok, folder, profiles=GenerateConfig().profiles, default_profile="factual")
    return folder


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_up(url: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + 40
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if proc is not None:
            assert proc.poll() is None, proc.stdout.read().decode()
        assert time.monotonic() < deadline, "the server did not come up"
        time.sleep(0.05)


# --------------------------------------------------------------------------- keys file


def test_keys_are_added_listed_and_revoked_and_never_stored_in_clear(tmp_path):
    file = tmp_path / "keys.jsonl"
    alice = add_key(file, "alice", requests_per_min=60, tokens_per_min=1000, quota_tokens=50000)
    bob = add_key(file, "bob")
    assert alice.startswith("sk-") and alice != bob and len(alice) > 40
    text = file.read_text()
    assert alice not in text and bob not in text and hash_api_key(alice) in text
    assert file.stat().st_mode & 0o777 == 0o600
    records = [json.loads(line) for line in text.splitlines()]
    assert set(records[0]) == {"name", "sha256", "created", "requests_per_min", "tokens_per_min", "quota_tokens"}
    keys = read_keys_file(file)
    assert [(k.name, k.requests_per_min, k.tokens_per_min, k.quota_tokens) for k in keys] == [
        ("alice", 60, 1000, 50000), ("bob", None, None, None)]
    with pytest.raises(ConfigError, match="already exists"):
        add_key(file, "alice")
    with pytest.raises(ConfigError, match="--rpm must be at least 1"):
        add_key(file, "carol", requests_per_min=0)
    revoke_key(file, "alice")
    assert [k.name for k in read_keys_file(file)] == ["bob"]
    with pytest.raises(ConfigError, match="No key named 'alice'"):
        revoke_key(file, "alice")


def test_plain_key_lines_still_work_and_bad_lines_say_where(tmp_path):
    file = tmp_path / "keys.txt"
    file.write_text("# old style\nsk-one\n\nsk-two\n", encoding="utf-8")
    keys = read_keys_file(file)
    assert [k.sha256 for k in keys] == [hash_api_key("sk-one"), hash_api_key("sk-two")]
    assert all(k.requests_per_min is None for k in keys)
    file.write_text('{"name": "x", "sha256": "abc"}\n', encoding="utf-8")
    with pytest.raises(ConfigError, match="line 1"):
        read_keys_file(file)
    with pytest.raises(ConfigError, match="does not exist"):
        read_keys_file(tmp_path / "missing.jsonl")


# --------------------------------------------------------------------------- limiter and metrics (pure)


def test_requests_per_minute_slide_and_say_when_to_retry():
    clock = FakeClock()
    limiter, key = KeyLimiter(clock), ApiKey(name="k", sha256="0" * 64, requests_per_min=2)
    limiter.admit(key)
    clock.now += 20
    limiter.admit(key)
    with pytest.raises(LimitExceeded) as info:
        limiter.admit(key)
    assert info.value.retry_after == 40 and info.value.code == "rate_limit_exceeded"
    clock.now += 40  # the first request leaves the window
    limiter.admit(key)
    assert limiter.usage["k"].requests == 3


def test_tokens_per_minute_and_quota():
    clock = FakeClock()
    limiter = KeyLimiter(clock)
    key = ApiKey(name="k", sha256="0" * 64, tokens_per_min=100)
    limiter.admit(key)
    limiter.record("k", 30, 30)
    clock.now += 10
    limiter.admit(key)
    limiter.record("k", 20, 30)  # 110 tokens in the window
    with pytest.raises(LimitExceeded) as info:
        limiter.admit(key)
    assert info.value.retry_after == 50  # the first 60 tokens leave at t+60
    clock.now += 50
    limiter.admit(key)

    quota = ApiKey(name="q", sha256="1" * 64, quota_tokens=10)
    limiter.admit(quota)
    limiter.record("q", 4, 8)
    with pytest.raises(LimitExceeded, match="quota of 10 tokens") as info:
        limiter.admit(quota)
    assert info.value.retry_after is None and info.value.code == "insufficient_quota"
    assert limiter.usage_rows("q") == [{"name": "q", "requests": 1, "prompt_tokens": 4, "completion_tokens": 8,
                                       "total_tokens": 12, "users": {}}]
    assert usage_csv(limiter.usage_rows("q")) == ("name,user,requests,prompt_tokens,completion_tokens,total_tokens\n"
                                                  "q,,1,4,8,12\n")


def test_usage_is_kept_per_end_user_within_a_key(monkeypatch):
    from slmforge.serve import _limits
    from slmforge.serve._limits import Metered

    limiter, key = KeyLimiter(FakeClock()), ApiKey(name="app", sha256="0" * 64, quota_tokens=100)
    for user, tokens in (("alice", 3), ("bob", 5), ("alice", 7), (None, 11)):
        limiter.admit(key, user)
        limiter.record(Metered("app", user), tokens, 1)
    limiter.count("anonymous", "carol")
    limiter.record(Metered("anonymous", "carol"), 2, 2)
    rows = {r["name"]: r for r in limiter.usage_rows()}
    part = ("requests", "prompt_tokens", "completion_tokens", "total_tokens")
    assert rows["app"] == {"name": "app", "requests": 4, "prompt_tokens": 26, "completion_tokens": 4,
                           "total_tokens": 30, "users": {"alice": dict(zip(part, (2, 10, 2, 12))),
                                                         "bob": dict(zip(part, (1, 5, 1, 6)))}}
    assert rows["anonymous"]["users"] == {"carol": {"requests": 1, "prompt_tokens": 2, "completion_tokens": 2,
                                                    "total_tokens": 4}}
    assert usage_csv([rows["app"]]).splitlines() == [
        "name,user,requests,prompt_tokens,completion_tokens,total_tokens",
        "app,,4,26,4,30", "app,alice,2,10,2,12", "app,bob,1,5,1,6"]
    # The quota is the key's, whoever the end user is.
    limiter.record(Metered("app", "dave"), 70, 0)
    with pytest.raises(LimitExceeded, match="quota"):
        limiter.admit(key, "erin")
    # ``user`` is the client's word: what is kept of it is bounded.
    monkeypatch.setattr(_limits, "MAX_USERS_PER_KEY", 2)
    for user in ("u1", "u2", "x" * 1000):
        limiter.count("many", user)
    assert sorted(limiter.usage_rows("many")[0]["users"]) == ["(other users)", "u1", "u2"]
    limiter.count("cut", "y" * 1000)
    assert list(limiter.usage_rows("cut")[0]["users"]) == ["y" * _limits.MAX_USER_CHARS]


def test_metrics_histograms_are_cumulative_prometheus_text():
    m = Metrics()
    for seconds in (0.004, 0.3, 0.3, 100.0):
        m.observe_request("/v1/completions", 200, seconds)
    m.observe_request("/v1/completions", 429, 0.001)
    text = m.render()
    assert 'slmforge_requests_total{endpoint="/v1/completions",code="200"} 4' in text
    assert 'slmforge_requests_total{endpoint="/v1/completions",code="429"} 1' in text
    assert 'slmforge_request_duration_seconds_bucket{endpoint="/v1/completions",le="0.01"} 2' in text
    assert 'slmforge_request_duration_seconds_bucket{endpoint="/v1/completions",le="0.5"} 4' in text
    assert 'slmforge_request_duration_seconds_bucket{endpoint="/v1/completions",le="60.0"} 4' in text
    assert 'slmforge_request_duration_seconds_bucket{endpoint="/v1/completions",le="+Inf"} 5' in text
    assert 'slmforge_request_duration_seconds_count{endpoint="/v1/completions"} 5' in text


# --------------------------------------------------------------------------- the server


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict[str, str]:
    file = tmp_path_factory.mktemp("keys") / "keys.jsonl"
    plain = {
        "open": add_key(file, "open"),
        "slow": add_key(file, "slow", requests_per_min=2),
        "thrifty": add_key(file, "thrifty", quota_tokens=5),
    }
    plain["file"] = str(file)
    return plain


@pytest.fixture(scope="module")
def base_url(model_dir, keys):
    import uvicorn

    from slmforge.generate import TorchGenerator

    gen = TorchGenerator.from_pretrained(model_dir, device="cpu")
    app = create_app({"tiny": gen}, api_keys=read_keys_file(keys["file"]), max_prompt_chars=200)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    _wait_up(url)
    yield url
    server.should_exit = True
    thread.join(timeout=10)


def _client(base_url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key=key, max_retries=0, timeout=30)


def test_a_key_past_its_requests_per_minute_gets_a_429_with_retry_after(base_url, keys):
    client = _client(base_url, keys["slow"])
    for _ in range(2):
        client.completions.create(model="tiny", prompt=PROMPT, max_tokens=2, temperature=0)
    with pytest.raises(openai.RateLimitError, match="2 requests per minute") as info:
        client.completions.create(model="tiny", prompt=PROMPT, max_tokens=2, temperature=0)
    assert info.value.body["code"] == "rate_limit_exceeded"
    retry_after = int(info.value.response.headers["retry-after"])
    assert 1 <= retry_after <= 60
    # Other keys are not limited by this one's window.
    _client(base_url, keys["open"]).completions.create(model="tiny", prompt=PROMPT, max_tokens=2, temperature=0)


def test_a_spent_quota_is_a_429_insufficient_quota(base_url, keys):
    client = _client(base_url, keys["thrifty"])
    client.completions.create(model="tiny", prompt=PROMPT, max_tokens=4, temperature=0)  # uses more than 5 tokens
    with pytest.raises(openai.RateLimitError, match="quota of 5 tokens") as info:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert info.value.body["code"] == "insufficient_quota"
    assert "retry-after" not in info.value.response.headers


def test_oversized_prompts_are_a_413_and_the_context_error_names_the_limit(base_url, keys):
    headers = {"Authorization": f"Bearer {keys['open']}"}
    r = httpx.post(f"{base_url}/v1/completions", headers=headers,
                   json={"model": "tiny", "prompt": "x" * 201, "max_tokens": 2})
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "prompt_too_large" and "at most 200" in r.json()["error"]["message"]
    client = _client(base_url, keys["open"])
    with pytest.raises(openai.BadRequestError, match=f"maximum context length is {CONTEXT} tokens") as info:
        client.completions.create(model="tiny", prompt=PROMPT, max_tokens=CONTEXT)
    assert info.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError, match=f"maximum context length is {CONTEXT} tokens"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi " * 60}], stream=True)


def test_usage_is_metered_per_key_and_each_key_sees_its_own(base_url, keys, model_dir):
    client = _client(base_url, keys["open"])
    before = {r["name"]: r for r in httpx.get(f"{base_url}/v1/usage",
                                               headers={"Authorization": f"Bearer {keys['open']}"}).json()["data"]}
    got = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=5, temperature=0, user="end-user-1")
    chunks = list(client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hello"}],
                                                 max_tokens=5, temperature=0, stream=True, user="end-user-2",
                                                 stream_options={"include_usage": True}))
    streamed = chunks[-1].usage
    rows = httpx.get(f"{base_url}/v1/usage", headers={"Authorization": f"Bearer {keys['open']}"}).json()["data"]
    assert [r["name"] for r in rows] == ["open"]  # only the caller's own usage
    row, old = rows[0], before["open"]
    assert row["requests"] == old["requests"] + 2
    assert row["prompt_tokens"] == old["prompt_tokens"] + got.usage.prompt_tokens + streamed.prompt_tokens
    assert row["completion_tokens"] == (old["completion_tokens"] + got.usage.completion_tokens
                                        + streamed.completion_tokens)
    # The request's `user` field: each end user's part of the key's usage.
    assert row["users"]["end-user-1"] == {"requests": 1, **got.usage.model_dump(include={
        "prompt_tokens", "completion_tokens", "total_tokens"})}
    assert row["users"]["end-user-2"] == {"requests": 1, **streamed.model_dump(include={
        "prompt_tokens", "completion_tokens", "total_tokens"})}
    assert httpx.get(f"{base_url}/v1/usage").status_code == 401


def test_metrics_count_requests_by_code_and_time_streams(base_url, keys):
    client = _client(base_url, keys["open"])
    list(client.completions.create(model="tiny", prompt=PROMPT, max_tokens=4, temperature=0, stream=True))
    httpx.get(f"{base_url}/v1/models")  # a 401
    text = httpx.get(f"{base_url}/metrics", headers={"Authorization": f"Bearer {keys['open']}"}).text

    def value(pattern: str) -> float:
        match = re.search(re.escape(pattern) + r" (\S+)", text)
        assert match, f"{pattern} not in /metrics"
        return float(match.group(1))

    assert value('slmforge_requests_total{endpoint="/v1/completions",code="200"}') >= 1
    assert value('slmforge_requests_total{endpoint="/v1/models",code="401"}') >= 1
    assert value('slmforge_request_duration_seconds_count{endpoint="/v1/completions"}') >= 1
    assert value('slmforge_time_to_first_token_seconds_count{model="tiny"}') >= 1
    assert value('slmforge_completion_tokens_total{model="tiny"}') >= 4
    assert 'slmforge_queue_depth{model="tiny"} 0' in text
    assert "# TYPE slmforge_request_duration_seconds histogram" in text


# --------------------------------------------------------------------------- the commands


def test_keys_commands_add_list_revoke_and_export_usage(tmp_path):
    import typer
    from typer.testing import CliRunner

    from slmforge.cli import keys_cmd

    app = typer.Typer(rich_markup_mode=None)
    app.add_typer(keys_cmd.keys_app, name="keys")
    runner, file = CliRunner(), str(tmp_path / "keys.jsonl")
    added = runner.invoke(app, ["keys", "add", "alice", "--file", file, "--rpm", "30", "--quota", "1000"])
    assert added.exit_code == 0, added.output
    key = added.stdout.strip().splitlines()[-1]
    assert key.startswith("sk-") and key not in Path(file).read_text()
    listed = runner.invoke(app, ["keys", "list", "--file", file])
    assert "alice" in listed.stdout and "30" in listed.stdout and "1000" in listed.stdout and key not in listed.stdout
    assert runner.invoke(app, ["keys", "revoke", "alice", "--file", file]).exit_code == 0
    assert "alice" not in runner.invoke(app, ["keys", "list", "--file", file]).stdout

    usage = tmp_path / "usage.json"
    usage.write_text(json.dumps({"object": "list", "data": [
        {"name": "alice", "requests": 2, "prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12,
         "users": {"u-1": {"requests": 1, "prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}}}]}))
    csv_out = runner.invoke(app, ["keys", "usage", str(usage), "--format", "csv"])
    assert csv_out.stdout.splitlines() == ["name,user,requests,prompt_tokens,completion_tokens,total_tokens",
                                           "alice,,2,5,7,12", "alice,u-1,1,2,3,5"]
    shown = json.loads(runner.invoke(app, ["keys", "usage", str(usage)]).stdout)[0]
    assert shown["total_tokens"] == 12 and shown["users"]["u-1"]["total_tokens"] == 5


def test_serve_refuses_an_open_server_off_loopback():
    import typer
    from typer.testing import CliRunner

    from slmforge.cli import serve_cmd

    app = typer.Typer(rich_markup_mode=None)
    app.command("serve")(serve_cmd.serve)
    app.command("noop")(lambda: None)
    result = CliRunner().invoke(app, ["serve", "runs/none", "--host", "0.0.0.0"])
    assert result.exit_code != 0 and "needs --api-keys" in result.output


def test_the_python_api_refuses_an_open_server_off_loopback_too(tmp_path):
    from slmforge.serve import check_open_bind, serve

    for host in ("0.0.0.0", "::", "192.168.1.5", "example.com"):
        with pytest.raises(ConfigError, match=f"Serving on {re.escape(host)} needs API keys"):
            serve(["runs/none"], host=host)  # refused before any model loads
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        check_open_bind(host, None)
    check_open_bind("0.0.0.0", tmp_path / "keys.jsonl")


def test_with_keys_metrics_and_the_schema_need_a_key_unless_public(keys):
    from fastapi.testclient import TestClient

    guarded = TestClient(create_app({"slow": Slow(0.0)}, api_keys=read_keys_file(keys["file"])))
    public = TestClient(create_app({"slow": Slow(0.0)}, api_keys=read_keys_file(keys["file"]), public_metrics=True))
    keyed = {"Authorization": f"Bearer {keys['open']}"}
    for path in ("/metrics", "/openapi.json", "/docs", "/redoc"):
        refused = guarded.get(path)
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key", path
        assert guarded.get(path, headers={"Authorization": "Bearer sk-wrong"}).status_code == 401, path
        assert guarded.get(path, headers=keyed).status_code == 200, path
        assert public.get(path).status_code == 200, path
    assert "/v1/chat/completions" in guarded.get("/openapi.json", headers=keyed).json()["paths"]
    assert "slmforge_requests_total" in guarded.get("/metrics", headers=keyed).text
    for path in ("/health", "/ready"):
        assert guarded.get(path).status_code == 200, path
    # Without keys (loopback only) everything stays open.
    open_app = TestClient(create_app({"slow": Slow(0.0)}))
    assert all(open_app.get(p).status_code == 200 for p in ("/metrics", "/openapi.json", "/docs"))


def test_serve_writes_the_usage_file_on_shutdown(model_dir, tmp_path):
    keys_file, usage_file, port = tmp_path / "keys.jsonl", tmp_path / "usage.json", _free_port()
    key = add_key(keys_file, "ci")
    code = (f"from slmforge.serve import serve; serve([{str(model_dir)!r}], port={port}, "
            f"api_keys_file={str(keys_file)!r}, device='cpu', usage_file={str(usage_file)!r})")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        _wait_up(f"http://127.0.0.1:{port}", proc)
        client = _client(f"http://127.0.0.1:{port}", key)
        got = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=3, temperature=0, user="u-42")
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    rows = json.loads(usage_file.read_text())["data"]
    tokens = {"prompt_tokens": got.usage.prompt_tokens, "completion_tokens": got.usage.completion_tokens,
              "total_tokens": got.usage.total_tokens}
    assert rows == [{"name": "ci", "requests": 1, **tokens, "users": {"u-42": {"requests": 1, **tokens}}}]


class Slow:
    """A Generator whose completions take ``seconds`` and whose streams tick until closed; counts overlaps."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.active, self.most_active = seconds, 0, 0
        self.closed = threading.Event()
        self._guard = threading.Lock()

    def complete(self, prompt, params):
        from slmforge.generate import Completion

        with self._guard:
            self.active += 1
            self.most_active = max(self.most_active, self.active)
        time.sleep(self.seconds)
        with self._guard:
            self.active -= 1
        return [Completion(text="late", tokens=1, finish_reason="stop")] * params.n

    def chat(self, messages, params):
        return self.complete("", params)

    def complete_batch(self, prompts, params):
        return [self.complete(p, params) for p in prompts]

    def stream(self, prompt, params):
        def pieces():
            try:
                while True:
                    yield "tick "
                    time.sleep(0.01)
            finally:
                self.closed.set()

        return pieces()


def test_a_request_past_the_timeout_is_a_504_and_the_engine_is_never_entered_twice():
    import uvicorn

    slow = Slow(seconds=1.0)
    app = create_app({"slow": slow}, request_timeout_s=0.3)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_up(url)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=30)
        began = time.monotonic()
        with pytest.raises(openai.InternalServerError, match="limit of 0.3 s") as info:
            client.completions.create(model="slow", prompt="x", max_tokens=2)
        assert time.monotonic() - began < 0.9  # answered before the engine finished
        assert info.value.status_code == 504 and info.value.body["code"] == "request_timeout"
        with pytest.raises(openai.InternalServerError):  # waits for the first call, then times out itself
            client.completions.create(model="slow", prompt="x", max_tokens=2)
        time.sleep(1.2)
        assert slow.most_active == 1
        with httpx.stream("POST", f"{url}/v1/completions",
                          json={"model": "slow", "prompt": "x", "max_tokens": 2, "stream": True}) as r:
            lines = [ln for ln in r.iter_lines() if ln]
        assert lines[-1] == "data: [DONE]" and "request_timeout" in lines[-2]
        assert slow.closed.wait(5)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
