"""Which key goes to which endpoint (``slmforge.endpoints``): the HTTP engine, the data teacher and
the server's upstream proxy send a key only to the endpoint it is named for, and never in clear text
to another machine without an explicit opt-in. Remote hosts are faked with httpx's MockTransport
(nothing leaves the machine); loopback with a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import httpx
import pytest

from slmforge.config import EndpointConfig, ServeModelConfig, SynthConfig, load_config
from slmforge.endpoints import endpoint_key, is_loopback
from slmforge.errors import ConfigError, DataError, GenerateError
from slmforge.generate import SamplingParams, load_generator
from slmforge.generate._openai import OpenAIGenerator

OPENAI_KEY, OTHER_KEY, SLMFORGE_KEY = "sk-openai-secret", "sk-other-secret", "sk-slmforge-secret"


@pytest.fixture(autouse=True)
def _keys_in_environment(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", OPENAI_KEY)
    monkeypatch.setenv("SLMFORGE_API_KEY", SLMFORGE_KEY)
    monkeypatch.setenv("OTHER_KEY", OTHER_KEY)


def _answer(path: str) -> dict:
    if path.endswith("/models"):
        return {"object": "list", "data": [{"id": "m"}]}
    return {"choices": [{"index": 0, "text": "ok", "finish_reason": "stop"}], "usage": {"completion_tokens": 1}}


@pytest.fixture
def remote(monkeypatch):
    """Every httpx.Client the engine makes answers from memory; returns the Authorization headers seen, by host."""
    seen: dict[str, list[str | None]] = {}

    def handler(request: httpx.Request) -> httpx.Response:
        seen.setdefault(request.url.host, []).append(request.headers.get("authorization"))
        return httpx.Response(200, json=_answer(request.url.path))

    real = httpx.Client

    class Mocked(real):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "transport": httpx.MockTransport(handler)})

    monkeypatch.setattr(httpx, "Client", Mocked)
    return seen


@pytest.fixture(scope="module")
def loopback():
    """A real server on 127.0.0.1 that records the Authorization header of every request."""
    seen: list[str | None] = []

    class Handler(BaseHTTPRequestHandler):
        def _reply(self):
            seen.append(self.headers.get("Authorization"))
            length = int(self.headers.get("Content-Length") or 0)
            self.rfile.read(length)
            data = json.dumps(_answer(self.path)).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = _reply

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/v1", seen
    server.shutdown()


def _complete(gen: OpenAIGenerator) -> str:
    return gen.complete("hi", SamplingParams(max_new_tokens=2))[0].text


# --------------------------------------------------------------------------- the rule


def test_loopback_hosts():
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.8.9.1", "localhost", "::1", "[::1]", "LOCALHOST"))
    assert not any(is_loopback(h) for h in ("10.0.0.1", "0.0.0.0", "example.com", "localhost.example.com", "", None))


def test_endpoint_key_rules(monkeypatch):
    assert endpoint_key("https://api.openai.com/v1") == OPENAI_KEY  # the one default
    assert endpoint_key("https://API.OpenAI.com/v1") == OPENAI_KEY
    for url in ("https://api.example.com/v1", "http://127.0.0.1:8000/v1", "https://api.openai.com.evil.io/v1",
                "http://api.openai.com/v1"):
        assert endpoint_key(url) is None, url  # no key nobody named; OpenAI's default only over https
    assert endpoint_key("https://api.example.com/v1", "OTHER_KEY") == OTHER_KEY
    assert endpoint_key("http://127.0.0.1:8000/v1", "SLMFORGE_API_KEY") == SLMFORGE_KEY
    assert endpoint_key("http://[::1]:8000/v1", "OTHER_KEY") == OTHER_KEY
    with pytest.raises(ConfigError, match=r"clear text to http://10\.0\.0\.7:8000/v1.*allow_insecure_http"):
        endpoint_key("http://10.0.0.7:8000/v1", "OTHER_KEY")
    with pytest.raises(ConfigError, match="clear text to http://host.example/v1") as err:
        endpoint_key("http://user:pw-secret@host.example/v1", "OTHER_KEY")
    assert "pw-secret" not in str(err.value)
    assert endpoint_key("http://10.0.0.7:8000/v1", "OTHER_KEY", allow_insecure_http=True) == OTHER_KEY
    assert endpoint_key("http://10.0.0.7:8000/v1") is None  # no key, nothing to leak: allowed
    monkeypatch.delenv("OTHER_KEY")
    with pytest.raises(GenerateError, match="OTHER_KEY.*not set"):
        endpoint_key("https://api.example.com/v1", "OTHER_KEY", error=GenerateError)


# --------------------------------------------------------------------------- the HTTP engine


def test_environment_keys_go_only_to_their_own_endpoint(remote):
    assert _complete(OpenAIGenerator("https://api.example.com/v1")) == "ok"
    assert _complete(OpenAIGenerator("https://api.openai.com/v1", "m")) == "ok"
    assert set(remote["api.example.com"]) == {None}  # neither OPENAI_API_KEY nor SLMFORGE_API_KEY
    assert set(remote["api.openai.com"]) == {f"Bearer {OPENAI_KEY}"}
    OpenAIGenerator("https://api.example.com/v1", api_key_env="OTHER_KEY")
    assert remote["api.example.com"][-1] == f"Bearer {OTHER_KEY}"


def test_no_key_over_plain_http_to_another_machine_without_opt_in(remote):
    with pytest.raises(GenerateError, match=r"clear text to http://10\.1\.2\.3/v1"):
        OpenAIGenerator("http://10.1.2.3/v1", api_key_env="OTHER_KEY")
    with pytest.raises(GenerateError, match="clear text"):
        OpenAIGenerator("http://10.1.2.3/v1", api_key="sk-explicit")
    assert "10.1.2.3" not in remote  # refused before any request
    assert _complete(OpenAIGenerator("http://10.1.2.3/v1")) == "ok"  # no key: allowed, and none sent
    assert set(remote["10.1.2.3"]) == {None}
    _complete(OpenAIGenerator("http://10.1.2.3/v1", api_key_env="OTHER_KEY", allow_insecure_http=True))
    assert remote["10.1.2.3"][-1] == f"Bearer {OTHER_KEY}"


def test_a_key_is_sent_to_a_loopback_server_over_http(loopback):
    url, seen = loopback
    seen.clear()
    _complete(OpenAIGenerator(url))
    assert set(seen) == {None}  # SLMFORGE_API_KEY is not sent unless named
    seen.clear()
    _complete(OpenAIGenerator(url, api_key_env="SLMFORGE_API_KEY"))
    assert seen and set(seen) == {f"Bearer {SLMFORGE_KEY}"}


def test_project_endpoints_name_each_endpoints_key(loopback, remote, tmp_path):
    url, seen = loopback
    project = tmp_path / "slmforge.yaml"
    project.write_text(json.dumps({"generate": {"endpoints": [
        {"base_url": "https://api.example.com", "api_key_env": "OTHER_KEY"},  # /v1 and case do not matter
        {"base_url": "http://10.9.9.9/v1/", "api_key_env": "OTHER_KEY", "allow_insecure_http": True},
    ]}}))
    cfg = load_config(project, [])
    load_generator("https://API.example.com/v1#m", endpoints=cfg.generate.endpoints)
    load_generator("http://10.9.9.9/v1#m", endpoints=cfg.generate.endpoints)
    assert remote["api.example.com"][-1] == f"Bearer {OTHER_KEY}" and remote["10.9.9.9"][-1] == f"Bearer {OTHER_KEY}"
    load_generator("https://api.example.org/v1#m", endpoints=cfg.generate.endpoints)  # not listed: no key
    assert set(remote["api.example.org"]) == {None}
    # --set works too (values are YAML).
    cfg = load_config(None, [f"generate.endpoints=[{{base_url: '{url}', api_key_env: SLMFORGE_API_KEY}}]"])
    assert cfg.generate.endpoints == [EndpointConfig(base_url=url, api_key_env="SLMFORGE_API_KEY")]


def test_a_401_without_a_key_says_how_to_name_one(monkeypatch):
    real = httpx.Client

    class Refusing(real):
        def __init__(self, *args, **kwargs):
            transport = httpx.MockTransport(lambda r: httpx.Response(401, json={"error": {"message": "no key"}}))
            super().__init__(*args, **{**kwargs, "transport": transport})

    monkeypatch.setattr(httpx, "Client", Refusing)
    with pytest.raises(GenerateError, match="none was sent.*generate.endpoints"):
        OpenAIGenerator("https://api.example.com/v1", "m")
    with pytest.raises(GenerateError, match="refused the API key"):
        OpenAIGenerator("https://api.example.com/v1", "m", api_key_env="OTHER_KEY")


# --------------------------------------------------------------------------- teacher and upstream


def test_teacher_and_upstream_follow_the_same_rule():
    from slmforge.data.sources import Document
    from slmforge.data.synth import teacher_pairs
    from slmforge.serve._upstream import Upstream, upstream_from_config

    cfg = SynthConfig(method="teacher", teacher={"base_url": "http://10.0.0.5/v1", "model": "t",
                                                 "api_key_env": "OTHER_KEY"})
    with pytest.raises(DataError, match=r"data.synth.teacher: refusing.*clear text"):
        teacher_pairs([Document(id="d", text="x", source="s", kind="txt")], cfg)

    entry = ServeModelConfig(name="up", engine="openai", base_url="http://10.0.0.5/v1", api_key_env="OTHER_KEY")
    with pytest.raises(ConfigError, match=r"model 'up'.*clear text"):
        upstream_from_config(entry)
    with pytest.raises(ConfigError, match="clear text"):
        Upstream("http://10.0.0.5/v1", "m", api_key="sk-explicit")
    opted = upstream_from_config(entry.model_copy(update={"allow_insecure_http": True}))
    assert opted._api_key == OTHER_KEY
    assert upstream_from_config(ServeModelConfig(name="o", engine="openai", base_url="https://api.openai.com/v1"
                                                 ))._api_key == OPENAI_KEY
    assert upstream_from_config(ServeModelConfig(name="e", engine="openai", base_url="https://api.example.com/v1"
                                                 ))._api_key is None


# --------------------------------------------------------------------------- the commands


def test_generate_chat_and_eval_compare_read_the_endpoints_from_the_project(tmp_path, remote):
    """The commands that take an endpoint (generate, chat, eval run, eval compare) pass generate.endpoints on: the clear-text refusal (raised before
    any request) shows the entry reached the engine; a listed https endpoint gets its key."""
    from typer.testing import CliRunner

    from slmforge.cli.main import app

    lan = "generate.endpoints=[{base_url: 'http://10.2.3.4/v1', api_key_env: OTHER_KEY}]"
    runner = CliRunner()
    for args in (["generate", "hi", "-m", "http://10.2.3.4/v1#m", "--set", lan],
                 ["chat", "-m", "http://10.2.3.4/v1#m", "--set", lan],
                 ["eval", "run", "-m", "http://10.2.3.4/v1#m", "--set", lan, "--out", str(tmp_path / "eval")],
                 ["eval", "compare", "http://10.2.3.4/v1#m", "http://10.2.3.4/v1#m", "-s", "arithmetic",
                  "--set", lan, "--out", str(tmp_path / "compare")]):
        result = runner.invoke(app, args, input="/exit\n")
        assert isinstance(result.exception, GenerateError), (args, result.output)
        assert "clear text to http://10.2.3.4/v1" in str(result.exception), args
    assert "10.2.3.4" not in remote
    listed = "generate.endpoints=[{base_url: 'https://api.example.com/v1', api_key_env: OTHER_KEY}]"
    result = runner.invoke(app, ["generate", "hi", "-m", "https://api.example.com/v1#m", "--set", listed])
    assert result.exit_code == 0, result.output
    assert set(remote["api.example.com"]) == {f"Bearer {OTHER_KEY}"}
