"""The OpenAI-compatible server: a real uvicorn on a free local port serving the tiny
generation model, driven by the official ``openai`` client (and httpx for raw bodies)."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from slmforge.errors import ConfigError
from slmforge.generate import Completion, Generator, SamplingParams, TorchGenerator
from slmforge.serve import create_app, parse_model_ref, read_api_keys, serve

from conftest import TINY, LiveServer, build_peaky_model, build_tiny_tokenizer

KEY = "sk-test-key"
PROMPT = "The garden was"


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    yield


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    # The same peaky tiny model as test_generate: whole-word greedy text with clear margins.
    workdir = tmp_path_factory.mktemp("serve")
    return build_peaky_model(build_tiny_tokenizer(workdir, vocab_size=400), workdir / "tiny", TINY)


@pytest.fixture(scope="module")
def gen(model_dir) -> TorchGenerator:
    return TorchGenerator.from_pretrained(model_dir, device="cpu")


@pytest.fixture(scope="module")
def scripted() -> Scripted:
    return Scripted()


@pytest.fixture(scope="module")
def base_url(gen, scripted):
    with LiveServer(create_app({"tiny": gen, "scripted": scripted}, api_keys={KEY})) as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key=KEY, max_retries=0, timeout=30)


class Scripted:
    """A Generator whose completions wait for ``release`` and whose streams run until closed."""

    def __init__(self) -> None:
        self.started, self.release, self.closed = threading.Event(), threading.Event(), threading.Event()

    def complete(self, prompt, params):
        self.started.set()
        self.release.wait(20)
        return [Completion(text="done", tokens=1, finish_reason="stop")] * params.n

    def chat(self, messages, params):
        return self.complete("", params)

    def complete_batch(self, prompts, params):
        return [self.complete(p, params) for p in prompts]

    def stream(self, prompt, params):
        def pieces():
            try:
                while True:
                    yield "tick "
                    time.sleep(0.005)
            finally:
                self.closed.set()

        return pieces()


def greedy(max_new_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new_tokens, **kw)


# --------------------------------------------------------------------------- pure helpers


@pytest.mark.parametrize(("ref", "want"), [
    ("runs/sft", ("sft", "runs/sft")),
    ("runs/sft/", ("sft", "runs/sft/")),
    ("model/tiny-q8.gguf", ("tiny-q8", "model/tiny-q8.gguf")),
    ("base=runs/train", ("base", "runs/train")),
])
def test_model_refs_are_named_by_folder_or_by_name_equals(ref, want):
    assert parse_model_ref(ref) == want


def test_api_keys_file_skips_blanks_and_comments_and_rejects_an_empty_file(tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text("# team keys\nsk-one\n\n  sk-two  \n", encoding="utf-8")
    assert read_api_keys(keys) == {"sk-one", "sk-two"}
    keys.write_text("# nothing\n\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="no key"):
        read_api_keys(keys)
    with pytest.raises(ConfigError, match="at least one model"):
        create_app({})
    with pytest.raises(ConfigError, match="Two models are named sft"):
        serve(["a/sft", "b/sft"])  # checked before any model loads


def test_serve_loads_models_by_path_and_reads_the_keys_file(model_dir, tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text("sk-from-file\n", encoding="utf-8")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = (f"from slmforge.serve import serve; serve([{str(model_dir)!r}, 'alias=' + {str(model_dir)!r}], "
            f"port={port}, api_keys_file={str(keys)!r}, device='cpu')")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 40
        while True:
            try:
                ready = httpx.get(f"http://127.0.0.1:{port}/ready", timeout=1)
                break
            except httpx.HTTPError:
                assert proc.poll() is None, proc.stdout.read().decode()
                assert time.monotonic() < deadline, "the server did not come up"
                time.sleep(0.1)
        assert ready.json()["models"] == ["tiny", "alias"]
        headers = {"Authorization": "Bearer sk-from-file"}
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models", headers=headers).status_code == 200
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models").status_code == 401
    finally:
        proc.terminate()
        proc.wait(timeout=10)


# --------------------------------------------------------------------------- the server


def test_health_ready_and_model_list(base_url, client, scripted):
    assert isinstance(scripted, Generator)
    assert httpx.get(f"{base_url}/health").json() == {"status": "ok"}
    assert httpx.get(f"{base_url}/ready").json() == {"status": "ready", "models": ["tiny", "scripted"]}
    assert [m.id for m in client.models.list()] == ["tiny", "scripted"]


def test_greedy_completion_matches_the_engine_and_counts_usage(client, gen):
    want = gen.complete(PROMPT, greedy(20))[0]
    got = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=20, temperature=0)
    assert got.choices[0].text == want.text and want.text.strip()
    assert got.choices[0].finish_reason == want.finish_reason
    assert got.usage.completion_tokens == want.tokens > 0
    assert got.usage.prompt_tokens == len(gen.tokenizer(PROMPT)["input_ids"]) > 0
    assert got.usage.total_tokens == got.usage.prompt_tokens + got.usage.completion_tokens


def test_chat_completion_matches_the_engine(client, gen):
    messages = [{"role": "user", "content": "hello"}]
    want = gen.chat(messages, greedy(15))[0]
    got = client.chat.completions.create(model="tiny", messages=messages, max_tokens=15, temperature=0)
    assert got.choices[0].message.role == "assistant"
    assert got.choices[0].message.content == want.text and want.text.strip()
    assert got.usage.prompt_tokens > 0 and got.usage.completion_tokens == want.tokens


def test_streamed_chat_joins_to_the_non_streamed_reply(client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}]
    full = client.chat.completions.create(model="tiny", messages=messages, max_tokens=15, temperature=0)
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=15, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1  # really streamed
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [full.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens > 0


def test_streamed_completion_ends_with_done(base_url, client):
    full = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0)
    with httpx.stream("POST", f"{base_url}/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": "tiny", "prompt": PROMPT, "max_tokens": 12, "temperature": 0,
                            "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]"
    import json
    chunks = [json.loads(ln.removeprefix("data: ")) for ln in lines[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == full.choices[0].text
    assert chunks[-1]["choices"][0]["finish_reason"] == full.choices[0].finish_reason


def test_n_samples_with_a_seed_are_reproducible_and_differ(client):
    def ask(seed):
        r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=15, temperature=1.0, n=2, seed=seed)
        return [c.text for c in sorted(r.choices, key=lambda c: c.index)]

    first = ask(3)
    assert len(first) == 2 and first[0] != first[1]
    assert ask(3) == first


def test_stop_strings_cut_the_text(client, gen):
    full = gen.complete(PROMPT, greedy(30))[0].text
    stop = full[10:14]
    assert stop.strip() and full.find(stop) > 0
    for value in (stop, ["never-there", stop]):
        got = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=30, temperature=0, stop=value)
        assert got.choices[0].text == full[: full.find(stop)]
        assert got.choices[0].finish_reason == "stop"


def test_unknown_model_is_a_404_listing_the_known_ones(client):
    with pytest.raises(openai.NotFoundError, match="known models: tiny, scripted") as info:
        client.completions.create(model="nope", prompt=PROMPT, max_tokens=4)
    assert info.value.body["code"] == "model_not_found"


def test_missing_or_wrong_key_is_a_401(base_url):
    bad = openai.OpenAI(base_url=f"{base_url}/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    r = httpx.get(f"{base_url}/v1/models")
    assert r.status_code == 401 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert httpx.get(f"{base_url}/health").status_code == 200  # liveness needs no key


def test_bad_parameters_are_a_400_in_openais_error_shape(base_url, client):
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model="tiny", prompt=PROMPT, temperature=5)
    with pytest.raises(openai.BadRequestError, match="identical greedy"):
        client.completions.create(model="tiny", prompt=PROMPT, temperature=0, n=2)
    with pytest.raises(openai.BadRequestError, match="n must be 1"):  # an engine without our batching
        client.chat.completions.create(model="scripted", messages=[{"role": "user", "content": "hi"}], n=2,
                                       temperature=1, stream=True)
    r = httpx.post(f"{base_url}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                   json={"model": "tiny", "messages": [], "max_tokens": 0})
    error = r.json()["error"]
    assert r.status_code == 400 and error["type"] == "invalid_request_error"
    assert "messages" in error["message"] and "max_tokens" in error["message"]


def test_the_server_and_other_models_answer_while_a_model_generates(base_url, client, scripted):
    worker = threading.Thread(
        target=lambda: client.completions.create(model="scripted", prompt="x", max_tokens=4), daemon=True)
    worker.start()
    assert scripted.started.wait(10)
    try:
        assert httpx.get(f"{base_url}/health", timeout=5).status_code == 200
        got = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=3, temperature=0)
        assert got.choices[0].text  # a busy model locks only itself
        assert worker.is_alive()  # still held by the scripted model
    finally:
        scripted.release.set()
        worker.join(timeout=10)
    assert not worker.is_alive()
    usage = client.completions.create(model="scripted", prompt="x", max_tokens=4).usage
    assert usage.prompt_tokens == 0 and usage.completion_tokens == 1  # an engine without a tokenizer


def test_a_client_that_leaves_mid_stream_stops_the_generation(base_url, client, scripted):
    with httpx.stream("POST", f"{base_url}/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": "scripted", "prompt": "x", "max_tokens": 4, "stream": True}) as r:
        first = next(r.iter_lines())
        assert first.startswith("data: ") and "tick" in first
    assert scripted.closed.wait(10)
    # The model's lock was released: the next request on it is served.
    scripted.release.set()
    assert client.completions.create(model="scripted", prompt="x", max_tokens=4).choices[0].text == "done"


def test_serve_command_help_says_keys_are_compared_by_hash():
    import typer
    from typer.testing import CliRunner

    from slmforge.cli import serve_cmd

    app = typer.Typer(rich_markup_mode=None)
    app.command("serve")(serve_cmd.serve)
    app.command("noop")(lambda: None)  # two commands, so `serve` is a subcommand as in main.py
    result = CliRunner().invoke(app, ["serve", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    assert "--api-keys" in result.output and "hash" in result.output and "--port" in result.output
