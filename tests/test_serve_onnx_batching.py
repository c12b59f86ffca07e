"""Continuous batching on the ONNX engine (issue 15), through the official openai client against a live
server on 127.0.0.1: a tiny Gemma 3 (sliding-window layers with a window of 8, nested rope parameters,
test_onnx_gemma3) exported with the project's exporter and served by ``OnnxGenerator``.

Replies run to 40 tokens, so the sliding layers go past several windows while rows of different lengths
decode together; requests start staggered, so most join a batch that is already decoding.
"""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest
from test_onnx_gemma3 import build_tiny_gemma3

from slmforge.export.onnx import export_onnx
from slmforge.generate import SamplingParams
from slmforge.generate._onnx import OnnxGenerator
from slmforge.serve import create_app
from slmforge.serve._models import describe, wrap_models

from conftest import LiveServer, build_tiny_tokenizer

PROMPTS = ["The garden was", "Bread is", "hello", "The river flows", "A long time ago in a small town there",
           "She said", "Birds", "The city at night"]
LENGTHS = [40, 7, 23, 33, 12, 40, 3, 18]  # max_tokens per prompt: rows leave at different steps
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer"}},
          "required": ["name", "age"], "additionalProperties": False}


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    yield


@pytest.fixture(scope="module")
def onnx_dir(tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("onnx-batching")
    model = build_tiny_gemma3(build_tiny_tokenizer(workdir, vocab_size=400), workdir / "model")
    return export_onnx(model, workdir / "onnx").parent


@pytest.fixture(scope="module")
def single(onnx_dir) -> OnnxGenerator:
    """The engine on its own, one sequence at a time: what every batched reply must equal."""
    return OnnxGenerator(onnx_dir, threads=1)


@pytest.fixture(scope="module")
def urls(onnx_dir):
    """Two servers over the same export: batching up to 4 sequences, and one at a time."""
    out = {}
    with LiveServer(create_app(wrap_models({"g": OnnxGenerator(onnx_dir, threads=1)}, 4), max_batch_size=4)) as four, \
            LiveServer(create_app(wrap_models({"g": OnnxGenerator(onnx_dir, threads=1)}, 1), max_batch_size=1)) as one:
        out[4], out[1] = four, one
        yield out


def _client(url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


async def _staggered_completions(url: str, gap_s: float = 0.005) -> list[tuple[str, str, int]]:
    """Every prompt at once, each starting ``gap_s`` after the one before: (text, finish_reason, tokens)."""
    async with _client(url) as client:
        async def one(i: int):
            await asyncio.sleep(gap_s * i)
            r = await client.completions.create(model="g", prompt=PROMPTS[i], max_tokens=LENGTHS[i], temperature=0,
                                                extra_body={"ignore_eos": True})
            return r.choices[0].text, r.choices[0].finish_reason, r.usage.completion_tokens

        return await asyncio.gather(*(one(i) for i in range(len(PROMPTS))))


def _batch_steps(url: str) -> tuple[float, float]:
    text = httpx.get(f"{url}/metrics").text

    def metric(name: str) -> float:
        m = re.search(rf'^{name}{{engine="g"}} ([0-9.e+-]+)$', text, re.M)
        return float(m.group(1)) if m else 0.0

    return metric("slmforge_batch_size_count"), metric("slmforge_batch_size_sum")


def test_the_onnx_engine_is_served_with_continuous_batching(urls, onnx_dir):
    line = describe(wrap_models({"g": OnnxGenerator(onnx_dir, threads=1)}, 4))[0]
    assert line.startswith("g: onnx") and "continuous batching up to 4" in line


def test_sequences_joining_mid_flight_get_exactly_their_single_sequence_greedy_tokens(urls, single):
    want = [single.complete(p, SamplingParams(max_new_tokens=n, ignore_eos=True))[0].text
            for p, n in zip(PROMPTS, LENGTHS, strict=True)]
    steps_before, rows_before = _batch_steps(urls[4])
    got = asyncio.run(_staggered_completions(urls[4]))
    steps, rows = (a - b for a, b in zip(_batch_steps(urls[4]), (steps_before, rows_before), strict=True))
    assert [t for t, _, _ in got] == want
    assert [(f, n) for _, f, n in got] == [("length", n) for n in LENGTHS]
    # batched for real: fewer forward passes than sequence-steps, and no pass over 4 rows
    assert steps < rows <= 4 * steps and sum(LENGTHS) <= rows + len(PROMPTS)


def test_max_batch_size_1_and_4_give_the_same_greedy_text(urls):
    assert asyncio.run(_staggered_completions(urls[1])) == asyncio.run(_staggered_completions(urls[4]))


def test_prompts_of_different_lengths_arriving_together_match_single_sequences(urls, single):
    """Joining prompts are prefilled together only with prompts of their own length (ONNX Runtime takes no
    padding in a first prompt); whatever the grouping, each gets its single-sequence tokens."""
    want = [single.complete(p, SamplingParams(max_new_tokens=n, ignore_eos=True))[0].text
            for p, n in zip(PROMPTS, LENGTHS, strict=True)]
    assert [t for t, _, _ in asyncio.run(_staggered_completions(urls[4], gap_s=0))] == want


def test_stops_max_tokens_schemas_and_logprobs_hold_per_sequence_in_one_batch(urls, single):
    full = single.complete(PROMPTS[0], SamplingParams(max_new_tokens=30, ignore_eos=True))[0].text
    stop = full.strip().split()[2]  # a word the greedy reply writes: the reply ends before it
    plain = single.complete(PROMPTS[3], SamplingParams(max_new_tokens=20, ignore_eos=True))[0].text

    async def run():
        async with _client(urls[4]) as client:
            return await asyncio.gather(
                client.completions.create(model="g", prompt=PROMPTS[0], max_tokens=30, temperature=0, stop=[stop],
                                          extra_body={"ignore_eos": True}),
                client.completions.create(model="g", prompt=PROMPTS[1], max_tokens=2, temperature=0),
                client.chat.completions.create(
                    model="g", messages=[{"role": "user", "content": "A person as JSON."}], max_tokens=40,
                    temperature=0, response_format={"type": "json_schema",
                                                    "json_schema": {"name": "person", "schema": SCHEMA}}),
                client.completions.create(model="g", prompt=PROMPTS[3], max_tokens=20, temperature=0, logprobs=2,
                                          extra_body={"ignore_eos": True}),
            )

    stopped, short, person, scored = asyncio.run(run())
    assert stopped.choices[0].finish_reason == "stop" and stop not in stopped.choices[0].text
    assert full.startswith(stopped.choices[0].text)
    assert short.usage.completion_tokens <= 2
    jsonschema.validate(json.loads(person.choices[0].message.content), SCHEMA)
    assert scored.choices[0].text == plain  # logprobs change nothing in what is generated
    lp = scored.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == scored.usage.completion_tokens == 20
    assert all(v <= 0 for v in lp.token_logprobs) and all(len(t) == 2 for t in lp.top_logprobs)


def test_echo_with_logprobs_is_a_clear_400_on_the_onnx_engine(urls):
    r = httpx.post(f"{urls[4]}/v1/completions", json={"model": "g", "prompt": "hello", "max_tokens": 2,
                                                      "echo": True, "logprobs": 1})
    assert r.status_code == 400 and "needs the torch engine" in r.json()["error"]["message"]

