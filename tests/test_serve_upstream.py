"""Forwarding to another OpenAI-compatible server (``serve/_upstream.py``): ``Upstream`` against a
fake upstream served by uvicorn in a thread, and ``VllmServer`` against a fake ``vllm`` script."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import shlex
import socket
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI, Request  # at module level: the routes' annotations are resolved here
from fastapi.responses import JSONResponse, StreamingResponse

from slmforge.config import ServeModelConfig, VllmConfig
from slmforge.errors import ConfigError, ModelError
from slmforge.serve._upstream import Upstream, UpstreamError, VllmServer, upstream_from_config

UPSTREAM_KEY = "sk-upstream-secret-123"
MESSAGES = [{"role": "user", "content": "hello"}]


def run(coro):
    return asyncio.run(coro)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- a fake upstream


def fake_upstream_app():
    """An OpenAI-like server. The ``model`` sent picks a behaviour: ``up-model`` answers, ``mode-400``,
    ``mode-429``, ``mode-500`` fail, ``mode-slow`` takes 2 s, ``mode-break`` breaks a stream."""
    app = FastAPI()
    app.state.bodies = []

    def error(status, message, type_="invalid_request_error", code=None, headers=None):
        return JSONResponse({"error": {"message": message, "type": type_, "param": "model", "code": code}},
                            status_code=status, headers=headers)

    @app.middleware("http")
    async def auth(request: Request, call_next):
        got = request.headers.get("authorization", "")
        if request.url.path.startswith("/v1") and got != f"Bearer {UPSTREAM_KEY}":
            # Like OpenAI, echo (part of) the key that was sent: the proxy must not pass it on.
            return error(401, f"Incorrect API key provided: {got.removeprefix('Bearer ')}.", code="invalid_api_key")
        return await call_next(request)

    async def modes(body):
        app.state.bodies.append(body)
        model = body.get("model")
        if model == "mode-400":
            return error(400, "max_tokens is too large: 99999.", code="context_length_exceeded")
        if model == "mode-429":
            return error(429, "Rate limit reached.", "requests", "rate_limit_exceeded", {"Retry-After": "7"})
        if model == "mode-500":
            return JSONResponse({"detail": "engine crashed"}, status_code=500)
        if model == "mode-slow":
            await asyncio.sleep(2)
        return None

    usage = {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        if (failed := await modes(body)) is not None:
            return failed
        base = {"id": "chatcmpl-up", "created": 1, "model": "upstream-internal-name"}
        if not body.get("stream"):
            text = "echo: " + body["messages"][-1]["content"]
            return {**base, "object": "chat.completion", "usage": usage,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                 "finish_reason": "stop"}]}
        with_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        def chunk(delta, finish=None):
            c = {**base, "object": "chat.completion.chunk",
                 "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            return {**c, "usage": None} if with_usage else c

        async def events():
            yield ": keep-alive\n\n"
            for piece in ({"role": "assistant", "content": ""}, {"content": "echo"}, {"content": ": hi"}):
                yield f"data: {json.dumps(chunk(piece))}\n\n"
                if body["model"] == "mode-break":
                    raise RuntimeError("the upstream died mid-stream")
                if body["model"] == "mode-stall":
                    await asyncio.sleep(2)
            yield f"data: {json.dumps(chunk({}, 'stop'))}\n\n"
            if with_usage:
                final = {**base, "object": "chat.completion.chunk", "choices": [], "usage": usage}
                yield f"data: {json.dumps(final)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        if (failed := await modes(body)) is not None:
            return failed
        return {"id": "cmpl-up", "object": "text_completion", "created": 1, "model": "upstream-internal-name",
                "choices": [{"index": 0, "text": body["prompt"][::-1], "finish_reason": "length"}], "usage": usage}

    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        body = await request.json()
        inputs = [body["input"]] if isinstance(body["input"], str) else body["input"]
        return {"object": "list", "model": "upstream-internal-name",
                "data": [{"object": "embedding", "index": i, "embedding": [float(len(t)), 1.0]}
                         for i, t in enumerate(inputs)],
                "usage": {"prompt_tokens": len(inputs), "total_tokens": len(inputs)}}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": "up-model", "object": "model"}, {"id": "other", "object": "model"}]}

    return app


@pytest.fixture(scope="module")
def upstream_app():
    return fake_upstream_app()


@pytest.fixture(scope="module")
def upstream_url(upstream_app):
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(upstream_app, host="127.0.0.1", port=port, log_level="error",
                                           lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "the fake upstream did not come up"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}/v1"
    server.should_exit = True
    thread.join(timeout=10)


def upstream(url: str, model: str = "up-model", key: str | None = UPSTREAM_KEY, **kw) -> Upstream:
    return Upstream(url, model, api_key=key, served_model="served", **kw)


# --------------------------------------------------------------------------- Upstream


def test_post_forwards_with_the_upstream_name_and_keeps_usage(upstream_url, upstream_app):
    async def go():
        async with upstream(upstream_url) as up:
            chat = await up.post("/v1/chat/completions", {"model": "served", "messages": MESSAGES, "max_tokens": 4})
            text = await up.post("/completions", {"model": "served", "prompt": "abc"})
            emb = await up.post("/v1/embeddings", {"model": "served", "input": ["ab", "abcd"]})
            return chat, text, emb, await up.models()

    chat, text, emb, models = run(go())
    assert upstream_app.state.bodies[-2] == {"model": "up-model", "messages": MESSAGES, "max_tokens": 4}
    assert chat["choices"][0]["message"]["content"] == "echo: hello"
    assert chat["model"] == text["model"] == emb["model"] == "served"  # clients see the name they asked for
    assert chat["usage"] == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
    assert text["choices"][0]["text"] == "cba"
    assert [d["embedding"] for d in emb["data"]] == [[2.0, 1.0], [4.0, 1.0]]
    assert models == ["up-model", "other"]


def test_stream_passes_events_through_renamed_and_meters_usage(upstream_url, upstream_app):
    async def go(stream_options):
        async with upstream(upstream_url) as up:
            body = {"model": "served", "messages": MESSAGES, **stream_options}
            events = await up.stream("/chat/completions", body)
            got = [e async for e in events]
            return got, events.usage, events.done, upstream_app.state.bodies[-1]

    # The client asked for usage: the usage chunk goes through.
    events, usage, done, sent = run(go({"stream_options": {"include_usage": True}}))
    assert sent["stream"] is True and sent["model"] == "up-model"
    assert all(e.endswith(b"\n\n") for e in events) and events[0] == b": keep-alive\n\n"
    assert events[-1] == b"data: [DONE]\n\n" and done
    chunks = [json.loads(e.removeprefix(b"data: ")) for e in events[1:-1]]
    assert {c["model"] for c in chunks} == {"served"}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) == "echo: hi"
    assert chunks[-1] == {"id": "chatcmpl-up", "created": 1, "model": "served", "object": "chat.completion.chunk",
                          "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}}
    assert usage == chunks[-1]["usage"]

    # The client did not: usage is still asked for and metered, but the client sees a plain stream.
    events, usage, done, sent = run(go({}))
    assert sent["stream_options"] == {"include_usage": True}
    chunks = [json.loads(e.removeprefix(b"data: ")) for e in events[1:-1]]
    assert all(c["choices"] and "usage" not in c for c in chunks)
    assert usage == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}


def test_upstream_4xx_pass_through_with_their_body(upstream_url):
    async def go(model, path="/chat/completions", stream=False):
        async with upstream(upstream_url, model) as up:
            body = {"model": "served", "messages": MESSAGES}
            with pytest.raises(UpstreamError) as info:
                await (up.stream(path, body) if stream else up.post(path, body))
            return info.value

    for stream in (False, True):  # a stream's error comes before its first byte
        err = run(go("mode-400", stream=stream))
        assert err.status == 400 and err.body == {"error": {
            "message": "max_tokens is too large: 99999.", "type": "invalid_request_error", "param": "model",
            "code": "context_length_exceeded"}}
    err = run(go("mode-429"))
    assert err.status == 429 and err.code == "rate_limit_exceeded" and err.headers == {"retry-after": "7"}
    err = run(go("mode-500"))
    assert err.status == 502 and err.type == "server_error" and err.code == "upstream_error"
    assert "HTTP 500" in err.message and "engine crashed" in err.message and "127.0.0.1" in err.message


def test_the_upstream_key_is_sent_and_never_leaks(upstream_url):
    async def go(key):
        async with upstream(upstream_url, key=key) as up:
            with pytest.raises(UpstreamError) as info:
                await up.post("/chat/completions", {"model": "served", "messages": MESSAGES})
            return info.value

    for key in ("sk-wrong-key-456", None):
        err = run(go(key))
        # The upstream refused *our* key: not a 401, which would tell the client its own key is wrong.
        assert err.status == 502 and err.code == "upstream_auth_failed"
        assert "refused this server's credentials" in err.message and upstream_url in err.message
        assert "sk-wrong-key-456" not in json.dumps(err.body)


def test_unreachable_upstream_is_a_502_naming_the_url_without_the_key():
    port = free_port()  # nothing listens there

    async def go():
        async with Upstream(f"http://user:{UPSTREAM_KEY}@127.0.0.1:{port}/v1", "m",
                            api_key=UPSTREAM_KEY) as up:
            for call in (up.post("/chat/completions", {"messages": MESSAGES}),
                         up.stream("/chat/completions", {"messages": MESSAGES}), up.models()):
                with pytest.raises(UpstreamError) as info:
                    await call
                yield info.value

    async def collect():
        return [e async for e in go()]

    for err in run(collect()):
        assert err.status == 502 and err.code == "upstream_unreachable"
        assert f"http://127.0.0.1:{port}/v1/" in err.message
        assert UPSTREAM_KEY not in json.dumps(err.body)


def test_a_slow_upstream_is_a_504(upstream_url):
    async def go():
        async with upstream(upstream_url, "mode-slow", timeout_s=0.3) as up:
            with pytest.raises(UpstreamError) as info:
                await up.post("/completions", {"model": "served", "prompt": "x"})
            return info.value

    err = run(go())
    assert err.status == 504 and err.type == "timeout_error" and "0.3 s" in err.message
    assert upstream_url in err.message


@pytest.mark.parametrize(("mode", "type_", "says"), [
    ("mode-break", "server_error", "ended the stream before its reply was finished"),
    ("mode-stall", "timeout_error", "The stream broke off: Could not get an answer from the upstream"),
])
def test_a_stream_that_breaks_off_ends_with_an_error_event(upstream_url, mode, type_, says):
    async def go():
        async with upstream(upstream_url, mode, timeout_s=0.5) as up:
            events = await up.stream("/chat/completions", {"model": "served", "messages": MESSAGES})
            return [e async for e in events], events.done

    events, done = run(go())
    assert b'"content": ""' in events[1] and not done  # what came before the break went through
    error = json.loads(events[-2].removeprefix(b"data: "))["error"]
    assert error["type"] == type_ and says in error["message"] and upstream_url in error["message"]
    assert events[-1] == b"data: [DONE]\n\n"


def test_a_stream_closed_early_releases_the_upstream(upstream_url):
    async def go():
        async with upstream(upstream_url, "mode-stall", timeout_s=30) as up:
            events = await up.stream("/chat/completions", {"model": "served", "messages": MESSAGES})
            first = await events.__aiter__().__anext__()
            started = time.monotonic()
            await events.aclose()  # the client went away: do not wait for the stalled upstream
            unopened = await up.stream("/chat/completions", {"model": "served", "messages": MESSAGES})
            await unopened.aclose()  # closing a stream never iterated also releases its connection
            return first, time.monotonic() - started

    first, seconds = run(go())
    assert first == b": keep-alive\n\n" and seconds < 1.5


def test_upstream_from_config_reads_the_key_from_the_environment(upstream_url, monkeypatch):
    cfg = ServeModelConfig(name="gpt", engine="openai", base_url=upstream_url, upstream_model="up-model",
                           api_key_env="SLMFORGE_TEST_UPSTREAM_KEY")
    monkeypatch.delenv("SLMFORGE_TEST_UPSTREAM_KEY", raising=False)
    with pytest.raises(ConfigError, match="model 'gpt'.*SLMFORGE_TEST_UPSTREAM_KEY.*not set"):
        upstream_from_config(cfg)
    with pytest.raises(ConfigError, match="model 'x' has engine openai but no base_url"):
        upstream_from_config(ServeModelConfig(name="x", engine="openai"))
    with pytest.raises(ConfigError, match="model 'x'.*not an http"):
        upstream_from_config(ServeModelConfig(name="x", engine="openai", base_url="api.example.com/v1"))
    monkeypatch.setenv("SLMFORGE_TEST_UPSTREAM_KEY", UPSTREAM_KEY)

    async def go():
        async with upstream_from_config(cfg) as up:
            return await up.post("/chat/completions", {"model": "gpt", "messages": MESSAGES})

    assert run(go())["model"] == "gpt"


# --------------------------------------------------------------------------- VllmServer

FAKE_VLLM = r'''
import http.server, json, os, signal, sys, time

argv = sys.argv[1:]
assert argv[0] == "serve", argv
port = int(argv[argv.index("--port") + 1])
name = argv[argv.index("--served-model-name") + 1]
mode = os.environ.get("FAKE_VLLM_MODE", "ok")
print("INFO fake vllm starting", " ".join(argv), flush=True)
if mode == "exit":
    print("ValueError: the model's max_model_len (4096) is larger than the KV cache can hold", file=sys.stderr,
          flush=True)
    sys.exit(3)
if mode == "stubborn":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
time.sleep(0.3)  # loading the model
key = os.environ.get("VLLM_API_KEY")


class Handler(http.server.BaseHTTPRequestHandler):
    def send(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path == "/health" and mode != "hang":
            return self.send(200, {})
        self.send(404, {"error": {"message": "no such path", "type": "NotFound"}})

    def do_POST(self):
        if key and self.headers.get("Authorization") != f"Bearer {key}":
            return self.send(401, {"error": {"message": "Unauthorized", "type": "auth"}})
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.send(200, {"id": "x", "object": "chat.completion", "model": body["model"],
                        "choices": [{"index": 0, "message": {"role": "assistant",
                                     "content": "vllm says " + body["messages"][-1]["content"]},
                                     "finish_reason": "stop"}],
                        "usage": {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}})

    def log_message(self, *args):
        pass


http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()
'''


@pytest.fixture
def fake_vllm(tmp_path, monkeypatch) -> Path:
    script = tmp_path / "fake_vllm.py"
    script.write_text(FAKE_VLLM, encoding="utf-8")
    monkeypatch.setenv("SLMFORGE_VLLM", f"{shlex.quote(sys.executable)} {shlex.quote(str(script))}")
    return script


def vllm_model(path: str = "models/base", **vllm) -> ServeModelConfig:
    return ServeModelConfig(name="chat", path=path, engine="vllm", vllm=VllmConfig(**vllm))


def test_command_has_every_option_and_the_adapters(tmp_path, monkeypatch):
    monkeypatch.setenv("SLMFORGE_VLLM", shlex.quote("/opt/vllm env/bin/vllm"))  # split like a shell would
    for name, rank in (("support", 8), ("legal", 48)):
        (tmp_path / "adapters" / name).mkdir(parents=True)
        (tmp_path / "adapters" / name / "adapter_config.json").write_text(json.dumps({"r": rank}))
    cfg = ServeModelConfig(
        name="chat", path="models/base", engine="vllm",
        adapters={"support": "adapters/support", "legal": "adapters/legal"},
        vllm=VllmConfig(gpu_memory_utilization=0.5, max_model_len=2048, tensor_parallel_size=2, dtype="bfloat16",
                        max_num_seqs=64, extra_args=["--enforce-eager", "--seed", "0"], startup_timeout_s=30))
    server = VllmServer(cfg, resolve=lambda p: tmp_path / p)
    assert server.command(8123) == [
        "/opt/vllm env/bin/vllm", "serve", str(tmp_path / "models/base"),
        "--host", "127.0.0.1", "--port", "8123", "--served-model-name", "chat",
        "--gpu-memory-utilization", "0.5", "--tensor-parallel-size", "2", "--dtype", "bfloat16",
        "--max-model-len", "2048", "--max-num-seqs", "64",
        "--enable-lora", "--max-loras", "2", "--max-lora-rank", "64",  # rank 48 rounds up to vLLM's 64
        "--lora-modules", f"support={tmp_path / 'adapters/support'}", f"legal={tmp_path / 'adapters/legal'}",
        "--enforce-eager", "--seed", "0",
    ]
    # Defaults: no optional flag, and a hub id passes through resolve unchanged.
    plain = VllmServer(vllm_model("Qwen/Qwen2.5-0.5B-Instruct")).command(9000)
    assert plain[1:] == ["serve", "Qwen/Qwen2.5-0.5B-Instruct", "--host", "127.0.0.1", "--port", "9000",
                         "--served-model-name", "chat", "--gpu-memory-utilization", "0.85",
                         "--tensor-parallel-size", "1", "--dtype", "auto"]
    with pytest.raises(ConfigError, match="model 'x' has engine vllm but no path"):
        VllmServer(ServeModelConfig(name="x", engine="vllm"))


def test_start_waits_for_health_proxies_and_stops(fake_vllm, tmp_path):
    log = tmp_path / "vllm.log"
    server = VllmServer(vllm_model(startup_timeout_s=30), log_file=log)
    up = server.start()
    try:
        assert server.process is not None and server.process.poll() is None
        assert up.base_url == f"http://127.0.0.1:{server.port}/v1"

        async def go():
            async with up:
                return await up.post("/v1/chat/completions", {"model": "chat", "messages": MESSAGES})

        reply = run(go())  # also proves the random key reached vLLM's environment and our header
        assert reply["choices"][0]["message"]["content"] == "vllm says hello" and reply["model"] == "chat"
        assert reply["usage"]["total_tokens"] == 5
        # Without the key the local vLLM refuses: only this server can use it.
        r = httpx.post(f"{up.base_url}/chat/completions", json={"model": "chat", "messages": MESSAGES})
        assert r.status_code == 401
    finally:
        process = server.process
        server.stop()
        server.stop()  # twice is fine
    assert process.returncode is not None and server.process is None
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{server.port}/health", timeout=1)
    assert "fake vllm starting serve" in log.read_text()


def test_a_vllm_that_exits_early_is_an_error_with_its_log_tail(fake_vllm, monkeypatch):
    monkeypatch.setenv("FAKE_VLLM_MODE", "exit")
    server = VllmServer(vllm_model(startup_timeout_s=30))
    with pytest.raises(ModelError, match=r"(?s)model 'chat' exited with code 3 before it was ready.*"
                                         r"Last lines of its log:.*larger than the KV cache"):
        server.start()
    assert server.process is None


def test_a_vllm_that_never_gets_ready_is_stopped_after_the_startup_timeout(fake_vllm, monkeypatch):
    monkeypatch.setenv("FAKE_VLLM_MODE", "hang")
    server = VllmServer(vllm_model(startup_timeout_s=1.0))
    with pytest.raises(ModelError, match=r"(?s)not ready within 1 s.*startup_timeout_s.*fake vllm starting"):
        server.start()
    assert server.process is None


def test_stop_kills_a_vllm_that_ignores_sigterm(fake_vllm, monkeypatch):
    monkeypatch.setenv("FAKE_VLLM_MODE", "stubborn")
    server = VllmServer(vllm_model(startup_timeout_s=30), stop_timeout_s=0.5)
    server.start()
    process = server.process
    started = time.monotonic()
    server.stop()
    assert process.returncode == -9 and time.monotonic() - started < 10


def test_a_missing_vllm_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.delenv("SLMFORGE_VLLM", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))  # no vllm next to this Python either
    with pytest.raises(ModelError, match=r"no `vllm` command.*pip install vllm.*GPU.*SLMFORGE_VLLM"):
        VllmServer(vllm_model()).start()
    monkeypatch.setenv("SLMFORGE_VLLM", str(tmp_path / "nowhere" / "vllm"))
    with pytest.raises(ModelError, match=r"nowhere/vllm.*from SLMFORGE_VLLM is not an executable"):
        VllmServer(vllm_model()).start()


@pytest.mark.gpu
def test_a_real_vllm_serves_a_tiny_model(tmp_path):
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vllm is not installed")
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    from slmforge.config import ModelConfig

    from conftest import build_peaky_model, build_tiny_tokenizer

    # head_dim 64: a size every vLLM attention backend supports.
    tiny = ModelConfig(preset="custom", hidden_size=128, num_layers=2, num_heads=2, num_kv_heads=1,
                       intermediate_size=256, tie_embeddings=False)
    folder = build_peaky_model(build_tiny_tokenizer(tmp_path, vocab_size=400), tmp_path / "tiny", tiny)
    cfg = ServeModelConfig(name="tiny", path=str(folder), engine="vllm",
                           vllm=VllmConfig(gpu_memory_utilization=0.3, max_model_len=256, dtype="float16",
                                           extra_args=["--enforce-eager"], startup_timeout_s=600))
    with VllmServer(cfg, log_file=tmp_path / "vllm.log") as server:
        up = server.start()

        async def go():
            async with up:
                reply = await up.post("/completions", {"model": "tiny", "prompt": "The garden was",
                                                        "max_tokens": 8, "temperature": 0})
                events = await up.stream("/completions", {"model": "tiny", "prompt": "The garden was",
                                                          "max_tokens": 8, "temperature": 0})
                streamed = [e async for e in events]
                return reply, streamed, events.usage, await up.models()

        reply, streamed, usage, models = run(go())
    assert models == ["tiny"] and reply["model"] == "tiny"
    assert reply["usage"]["completion_tokens"] > 0 and reply["choices"][0]["text"]
    text = "".join(json.loads(e.removeprefix(b"data: "))["choices"][0]["text"] for e in streamed[:-1])
    assert text == reply["choices"][0]["text"]  # greedy: the same text streamed
    assert usage == reply["usage"] and streamed[-1] == b"data: [DONE]\n\n"
