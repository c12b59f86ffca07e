"""Structured output and tool calls through the server: the official openai client, many sampled
requests to a tiny random model, and every reply must parse and validate.

The model is random. Without help it writes strings until max_tokens, and the constraint's token
budget must then close them: every reply still parses, with finish reason ``length``. A small logit
bias (OpenAI's ``logit_bias``) on the tokens that close JSON (``"}],``) and on the end tokens makes
most replies finish on their own, which the tests that look at the ``stop`` path use; the bias cannot
make a disallowed token possible — validity is the constraint's job.
"""

from __future__ import annotations

import concurrent.futures
import json
import re

import jsonschema
import openai
import pytest

from slmforge.generate import TorchGenerator
from slmforge.serve import create_app

from conftest import TINY, LiveServer, build_tiny_tokenizer

PERSON = {"type": "object",
          "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"},
                         "role": {"enum": ["admin", "user", "guest"]}, "active": {"type": "boolean"},
                         "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3}},
          "required": ["name", "age", "role"], "additionalProperties": False}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city.",
                                      "parameters": {"type": "object",
                                                     "properties": {"city": {"type": "string", "maxLength": 10},
                                                                    "unit": {"enum": ["c", "f"]}},
                                                     "required": ["city"]}}},
    {"type": "function", "function": {"name": "add", "description": "Add two integers.",
                                      "parameters": {"type": "object",
                                                     "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                                                     "required": ["a", "b"]}}},
]
REQUESTS = 24


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    yield


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from slmforge.model import build_model, save_model_folder
    from slmforge.tokenizer import load_tokenizer

    workdir = tmp_path_factory.mktemp("structured")
    tok_dir = build_tiny_tokenizer(workdir, vocab_size=400)
    tok = load_tokenizer(tok_dir)
    ids = {"bos": tok.bos_token_id, "eos": tok.eos_token_id, "pad": tok.pad_token_id}
    save_model_folder(build_model(TINY, vocab_size=len(tok), special_ids=ids, seed=0), tok, workdir / "m")
    return workdir / "m"


@pytest.fixture(scope="module")
def gen(model_dir) -> TorchGenerator:
    return TorchGenerator.from_pretrained(model_dir, device="cpu")


@pytest.fixture(scope="module")
def closing_bias(gen) -> dict[str, float]:
    tok = gen.tokenizer
    bias = {str(i): 3.0 for i in gen.eos_token_ids}
    for text, i in tok.get_vocab().items():
        data = tok.convert_tokens_to_string([text])
        if data and set(data) <= set('"}],'):
            bias[str(i)] = 3.0
    return bias


@pytest.fixture(scope="module")
def client(gen):
    with LiveServer(create_app({"tiny": gen}, max_batch_size=8)) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


def _many(fn, n: int = REQUESTS):
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        return list(pool.map(fn, range(n)))


def test_json_schema_replies_always_parse_and_validate(client, closing_bias):
    def ask(i: int):
        r = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": f"Describe person {i}"}], temperature=1.0, seed=i,
            max_tokens=200, logit_bias=closing_bias,
            response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}})
        return r.choices[0]

    choices = _many(ask)
    for c in choices:  # all of them: a reply the budget decided is closed in time, not cut
        jsonschema.validate(json.loads(c.message.content), PERSON)
    assert sum(c.finish_reason == "stop" for c in choices) >= REQUESTS * 0.8
    assert {c.finish_reason for c in choices} <= {"stop", "length"}
    assert len({c.message.content for c in choices}) > REQUESTS // 2  # really sampled, not one fixed answer


def test_json_object_streams_valid_json(client, closing_bias):
    def ask(i: int) -> str:
        pieces = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Some JSON please"}], temperature=1.0, seed=100 + i,
            max_tokens=200, logit_bias=closing_bias, response_format={"type": "json_object"}, stream=True)
        return "".join(c.choices[0].delta.content or "" for c in pieces if c.choices)

    texts = _many(ask, 8)
    assert all(isinstance(json.loads(t), dict) for t in texts)


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "add"}}])
def test_forced_tool_calls_always_validate_against_the_tool_schema(client, closing_bias, choice):
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}

    def ask(i: int):
        return client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "What is the weather in Oslo?"}], tools=TOOLS,
            tool_choice=choice, temperature=1.0, seed=i, max_tokens=200, logit_bias=closing_bias).choices[0]

    replies = _many(ask)
    assert sum(c.finish_reason == "tool_calls" for c in replies) >= REQUESTS * 0.8
    for c in replies:  # every reply is calls, also those the budget closed (finish_reason "length")
        assert c.finish_reason in ("tool_calls", "length") and c.message.content is None
        if isinstance(choice, dict):  # a named tool is called once; "required" may call several
            assert [call.function.name for call in c.message.tool_calls] == ["add"]
        assert len({call.id for call in c.message.tool_calls}) == len(c.message.tool_calls)
        for call in c.message.tool_calls:
            assert call.type == "function" and call.id.startswith("call_")
            jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])


def test_auto_tool_choice_gives_a_valid_call_or_plain_text_and_history_renders(client, closing_bias):
    def ask(i: int):
        return client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Add 2 and 3"}], tools=TOOLS, temperature=1.0,
            seed=i, max_tokens=60, logit_bias=closing_bias).choices[0]

    for c in _many(ask, 12):
        if c.finish_reason == "tool_calls":
            json.loads(c.message.tool_calls[0].function.arguments)
        else:
            assert not (c.message.content or "").lstrip().startswith("{")
    # A conversation that carries a tool call and its result is accepted.
    history = [{"role": "user", "content": "Add 2 and 3"},
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a":2,"b":3}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "5"}]
    r = client.chat.completions.create(model="tiny", messages=history, tools=TOOLS, tool_choice="none",
                                       max_tokens=5, temperature=0)
    assert r.choices[0].message.tool_calls is None and r.usage.prompt_tokens > 20


def test_tool_streams_send_the_call_as_one_delta(client, closing_bias):
    pieces = list(client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "weather?"}], tools=TOOLS, tool_choice="required",
        temperature=1.0, seed=3, max_tokens=200, logit_bias=closing_bias, stream=True))
    calls = [c.choices[0].delta.tool_calls for c in pieces if c.choices and c.choices[0].delta.tool_calls]
    assert len(calls) == 1 and json.loads(calls[0][0].function.arguments) is not None
    assert pieces[-1].choices[0].finish_reason == "tool_calls"


def test_bad_schemas_tools_and_bias_are_400s_that_say_what(client):
    msgs = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.BadRequestError, match="minimum"):
        client.chat.completions.create(model="tiny", messages=msgs, response_format={
            "type": "json_schema", "json_schema": {"name": "n", "schema": {"type": "integer", "minimum": 3}}})
    with pytest.raises(openai.BadRequestError, match=r"tools\[0\]"):
        client.chat.completions.create(model="tiny", messages=msgs, tools=[{"type": "function", "function": {}}])
    with pytest.raises(openai.BadRequestError, match="tool_choice"):
        client.chat.completions.create(model="tiny", messages=msgs, tool_choice="required")
    with pytest.raises(openai.BadRequestError, match="either tools or response_format"):
        client.chat.completions.create(model="tiny", messages=msgs, tools=TOOLS, tool_choice="required",
                                       response_format={"type": "json_object"})
    with pytest.raises(openai.BadRequestError, match="outside the vocabulary"):
        client.chat.completions.create(model="tiny", messages=msgs, logit_bias={"999999": 5})
    with pytest.raises(openai.BadRequestError, match="logit_bias"):
        client.chat.completions.create(model="tiny", messages=msgs, logit_bias={"x": 5})
    with pytest.raises(openai.BadRequestError, match="top_logprobs needs logprobs"):
        client.chat.completions.create(model="tiny", messages=msgs, top_logprobs=2)


# --------------------------------------------------------------------------- token budgets

BUDGET_SCHEMAS = [
    PERSON,
    {"type": "object", "properties": {  # nested objects and arrays, free strings, numbers, optional fields
        "order": {"type": "object", "properties": {"id": {"type": "integer"}, "note": {"type": "string"}},
                  "required": ["id"]},
        "lines": {"type": "array", "items": {"type": "object", "properties": {
            "sku": {"type": "string"}, "price": {"type": "number"}}, "required": ["sku", "price"]}}},
     "required": ["order", "lines"]},
    {"type": "object", "properties": {"summary": {"type": "string"}, "score": {"type": "number"},
                                      "flag": {"type": ["boolean", "null"]}}, "required": ["summary", "score"]},
    {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "minItems": 1},
]


def test_json_always_parses_within_small_max_tokens_without_help(client):
    """No closing bias: at temperature 1 a random model writes long strings, and every reply must still
    be complete valid JSON within max_tokens."""
    cases = [(schema, max_tokens) for schema in BUDGET_SCHEMAS for max_tokens in (16, 24, 32, 48, 64)]

    def ask(i: int):
        schema, max_tokens = cases[i]
        try:
            return client.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": f"Case {i}"}], temperature=1.0, seed=i,
                max_tokens=max_tokens,
                response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": schema}})
        except openai.BadRequestError as e:  # this tiny tokenizer spells the nested schema in 30 tokens
            return int(re.search(r"max_tokens >= (\d+)", e.message).group(1))

    reasons = []
    for (schema, max_tokens), r in zip(cases, _many(ask, len(cases)), strict=True):
        if isinstance(r, int):
            assert r > max_tokens and max_tokens < 32
            continue
        c = r.choices[0]
        jsonschema.validate(json.loads(c.message.content), schema)
        assert r.usage.completion_tokens <= max_tokens and c.finish_reason in ("stop", "length")
        reasons.append(c.finish_reason)
    assert "length" in reasons  # the budget decided some (and said so)
    pieces = list(client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "s"}], temperature=1.0, seed=5, max_tokens=26, stream=True,
        response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": BUDGET_SCHEMAS[2]}}))
    jsonschema.validate(json.loads("".join(c.choices[0].delta.content or "" for c in pieces if c.choices)),
                        BUDGET_SCHEMAS[2])
    assert pieces[-1].choices[0].finish_reason == "length"


def test_tool_calls_are_complete_within_small_max_tokens_without_help(client):
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    cases = [(choice, parallel, max_tokens)
             for choice, parallel in [({"type": "function", "function": {"name": "get_weather"}}, None),
                                      ("required", False), ("required", None)]
             for max_tokens in (40, 48, 64)]

    def ask(i: int):
        choice, parallel, max_tokens = cases[i]
        extra = {} if parallel is None else {"parallel_tool_calls": parallel}
        return client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Weather in Oslo?"}], tools=TOOLS, tool_choice=choice,
            temperature=1.0, seed=i, max_tokens=max_tokens, **extra)

    reasons = []
    for (choice, parallel, max_tokens), r in zip(cases, _many(ask, len(cases)), strict=True):
        c = r.choices[0]
        assert c.message.tool_calls and c.finish_reason in ("tool_calls", "length"), c
        reasons.append(c.finish_reason)
        assert r.usage.completion_tokens <= max_tokens
        if parallel is False or isinstance(choice, dict):
            assert len(c.message.tool_calls) == 1
        for call in c.message.tool_calls:
            jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])
    assert "length" in reasons  # complete calls the budget closed say so


def test_parallel_tool_calls_come_back_as_several_calls(client, closing_bias, gen):
    bias = {**closing_bias, str(gen.tokenizer.convert_tokens_to_ids("[")): 6.0}  # invites an array of calls

    def ask(i: int):
        return client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Weather in Oslo and Rome?"}], tools=TOOLS,
            tool_choice="required", temperature=1.0, seed=i, max_tokens=200, logit_bias=bias).choices[0]

    replies = _many(ask, 12)
    several = [c for c in replies if len(c.message.tool_calls) > 1]
    assert several
    for c in several:
        assert len({call.id for call in c.message.tool_calls}) == len(c.message.tool_calls)
    one = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Weather in Oslo and Rome?"}], tools=TOOLS,
        tool_choice="required", temperature=1.0, seed=0, max_tokens=200, logit_bias=bias, parallel_tool_calls=False)
    assert len(one.choices[0].message.tool_calls) == 1
    pieces = list(client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Weather in Oslo and Rome?"}], tools=TOOLS,
        tool_choice="required", temperature=1.0, seed=replies.index(several[0]), max_tokens=200, logit_bias=bias,
        stream=True))
    deltas = [d for p in pieces if p.choices for d in (p.choices[0].delta.tool_calls or [])]
    assert [d.index for d in deltas] == list(range(len(several[0].message.tool_calls)))


def test_max_tokens_below_the_shortest_reply_is_a_400_naming_the_minimum(client):
    with pytest.raises(openai.BadRequestError, match=r"max_tokens >= \d+") as e:
        client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3,
            response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}})
    assert e.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError, match="complete tool call"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], tools=TOOLS,
                                       tool_choice="required", max_tokens=5)


# --------------------------------------------------------------------------- llama.cpp's grammar engine

CHOICES = {"type": "object", "properties": {"role": {"enum": ["admin", "user", "guest"]}, "active": {"type": "boolean"},
                                           "level": {"enum": [1, 2, 3]}},
           "required": ["role", "active", "level"], "additionalProperties": False}
ENUM_TOOLS = [{"type": "function", "function": {"name": "set_mode", "parameters": {
    "type": "object", "properties": {"mode": {"enum": ["fast", "slow"]}}, "required": ["mode"]}}}]


def test_gguf_models_constrain_json_and_forced_tool_calls_with_llama_cpp(model_dir, tmp_path):
    from slmforge.export.gguf import export_gguf
    from slmforge.generate._llamacpp import LlamaCppGenerator

    with LlamaCppGenerator(export_gguf(model_dir, tmp_path / "m.gguf", type="F32"), n_threads=1, n_ctx=512) as gguf, \
            LiveServer(create_app({"q": gguf})) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        for seed in range(6):
            r = client.chat.completions.create(
                model="q", messages=[{"role": "user", "content": "Pick"}], temperature=1.0, seed=seed, max_tokens=60,
                response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": CHOICES}})
            jsonschema.validate(json.loads(r.choices[0].message.content), CHOICES)
        r = client.chat.completions.create(model="q", messages=[{"role": "user", "content": "Go"}], tools=ENUM_TOOLS,
                                           tool_choice="required", max_tokens=60, temperature=0)
        (call,) = r.choices[0].message.tool_calls
        assert r.choices[0].finish_reason == "tool_calls" and call.function.name == "set_mode"
        assert json.loads(call.function.arguments)["mode"] in ("fast", "slow")
        pieces = list(client.chat.completions.create(
            model="q", messages=[{"role": "user", "content": "Pick"}], max_tokens=60, stream=True,
            response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": CHOICES}}))
        jsonschema.validate(json.loads("".join(c.choices[0].delta.content or "" for c in pieces if c.choices)), CHOICES)
        with pytest.raises(openai.BadRequestError, match="needs the torch engine"):
            client.chat.completions.create(model="q", messages=[{"role": "user", "content": "Go"}], tools=ENUM_TOOLS)
        plain = client.chat.completions.create(model="q", messages=[{"role": "user", "content": "Go"}],
                                               tools=ENUM_TOOLS, tool_choice="none", max_tokens=5)
        assert plain.choices[0].message.tool_calls is None and plain.choices[0].finish_reason in ("stop", "length")
