"""LangChain's ``ChatOpenAI`` against a live ``slmforge serve`` (the installed command, 127.0.0.1):
``invoke`` and ``stream``, ``with_structured_output`` by each of its three methods, and ``bind_tools``
with a named tool. LangChain builds its own requests (strict JSON schemas from Pydantic models,
``tool_choice`` by name, ``parallel_tool_calls: false``), so this checks that what it sends is
accepted and what comes back is parsed into objects, on a tiny random model.

What a reply the token budget decided does: ``finish_reason`` is ``length``. LangChain's
``function_calling`` and ``bind_tools`` read the (complete) tool call regardless, while its
``json_schema`` and ``json_mode`` go through the openai client's ``parse()``, which refuses any
``length`` reply with ``LengthFinishReasonError`` — as it does against OpenAI itself.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Literal

import httpx
import pytest

from conftest import TINY, build_tiny_tokenizer

pytestmark = pytest.mark.interop

pydantic = pytest.importorskip("pydantic")
langchain_openai = pytest.importorskip("langchain_openai")


class Person(pydantic.BaseModel):
    """A person."""

    name: str = pydantic.Field(max_length=8)
    age: int
    role: Literal["admin", "user", "guest"]


class GetWeather(pydantic.BaseModel):
    """The weather in a city."""

    city: str = pydantic.Field(max_length=10)
    unit: Literal["c", "f"]


class Settings(pydantic.BaseModel):
    """Any settings object (json_mode: the server only knows it is a JSON object)."""

    verbose: bool = False


class Essay(pydantic.BaseModel):
    """Unbounded text: a random model writes it until max_tokens."""

    text: str


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from slmforge.model import build_model, save_model_folder
    from slmforge.tokenizer import load_tokenizer

    workdir = tmp_path_factory.mktemp("langchain")
    tok = load_tokenizer(build_tiny_tokenizer(workdir, vocab_size=400))
    ids = {"bos": tok.bos_token_id, "eos": tok.eos_token_id, "pad": tok.pad_token_id}
    save_model_folder(build_model(TINY, vocab_size=len(tok), special_ids=ids, seed=0), tok, workdir / "tiny")
    return workdir / "tiny"


@pytest.fixture(scope="module")
def server(model_dir):
    """``slmforge serve MODEL --port P`` as a user runs it; yields the base URL."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = Path(sys.executable).with_name("slmforge")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([str(exe), "serve", f"tiny={model_dir}", "--port", str(port), "--device", "cpu"],
                            cwd=model_dir.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"slmforge serve exited: {proc.stdout.read()[-2000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "slmforge serve did not come up"
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def chat(server: str, **kwargs):
    return langchain_openai.ChatOpenAI(base_url=f"{server}/v1", api_key="unused-on-loopback", model="tiny",
                                       max_retries=0, timeout=120, **{"temperature": 0, "seed": 0, **kwargs})


def test_invoke_and_stream_plain_text(server):
    llm = chat(server, max_tokens=12)
    reply = llm.invoke("Hello there")
    assert isinstance(reply.content, str) and reply.content
    assert reply.response_metadata["finish_reason"] in ("stop", "length")
    pieces = list(llm.stream("Hello there"))
    assert "".join(p.content for p in pieces) == reply.content  # greedy: the same text, in pieces


def test_with_structured_output_json_schema_returns_the_object(server):
    people = [chat(server, max_tokens=200, seed=s, temperature=1.0).with_structured_output(
        Person, method="json_schema").invoke(f"Describe person {s}") for s in range(3)]
    assert all(isinstance(p, Person) for p in people) and len({p.model_dump_json() for p in people}) > 1


def test_with_structured_output_function_calling_returns_the_object(server):
    llm = chat(server, max_tokens=200).with_structured_output(Person, method="function_calling")
    assert isinstance(llm.invoke("Describe a person"), Person)


def test_with_structured_output_json_mode_returns_the_object(server, model_dir):
    # json_mode constrains to "a JSON object" only; the bias makes the random model close it (as a
    # prompted real model would), and the server guarantees it parses.
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    closing = [tok.convert_tokens_to_ids("}"), tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")]
    llm = chat(server, max_tokens=200, logit_bias={i: 8.0 for i in closing})
    out = llm.with_structured_output(Settings, method="json_mode").invoke("Settings as JSON")
    assert isinstance(out, Settings)


def test_bind_tools_with_a_named_tool_returns_its_call(server):
    llm = chat(server, max_tokens=200).bind_tools([GetWeather, Person], tool_choice="GetWeather")
    reply = llm.invoke("What is the weather in Oslo?")
    (call,) = reply.tool_calls
    assert call["name"] == "GetWeather" and call["id"].startswith("call_")
    GetWeather(**call["args"])  # the arguments validate
    streamed = [c for c in llm.stream("What is the weather in Oslo?")]
    merged = streamed[0]
    for c in streamed[1:]:
        merged += c
    assert [c["name"] for c in merged.tool_calls] == ["GetWeather"]


def test_a_reply_the_budget_decided_is_a_tool_call_for_function_calling_and_length_for_parse(server):
    import openai

    short = chat(server, max_tokens=48, temperature=1.0)
    essay = short.with_structured_output(Essay, method="function_calling").invoke("Write")
    assert isinstance(essay, Essay)  # the string was closed in time, the call is complete
    with pytest.raises(openai.LengthFinishReasonError):
        short.with_structured_output(Essay, method="json_schema").invoke("Write")
