"""Constrained decoding: JSON schemas, json_object, tool calls, vocabularies, and the
tool-calling message helpers.

Sampling runs a tiny random Llama (batched, KV cache) at temperature 1 with a seeded
generator, masks each row with ``ConstraintState.mask_logits_`` and checks every
finished output with json.loads and jsonschema. A random model picks near-uniform
tokens, so it would rarely close a string among hundreds of allowed tokens; a fixed
logit bias on the tokens that close or separate JSON (``"}],``) and on the end ids
stands in for a trained model's habits so that sequences finish within the cap. The
bias never makes a disallowed token possible: validity is the constraint's job.
"""

from __future__ import annotations

import json
import re
import sys

import pytest
import torch
from jsonschema import Draft202012Validator

from slmforge.errors import GenerateError
from slmforge.generate._automaton import _mask_rows_fused
from slmforge.generate._constrain import (
    chat_messages_for_template,
    check_tools,
    json_schema_constraint,
    mask_logits_rows_,
    parse_tool_call,
    parse_tool_calls,
    regex_constraint,
    tool_call_schema,
    tool_constraint,
    tools_system_prompt,
    validate_json,
)
from slmforge.generate._vocab import _token_bytes
from slmforge.tokenizer import load_tokenizer

from conftest import PROSE, TINY, build_tiny_tokenizer

N_SEQ = 30
CAP = 200

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer"},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": "string", "minLength": 5, "maxLength": 5}},
            "required": ["city"],
        },
        "active": {"type": "boolean"},
        "score": {"type": "number"},
    },
    "required": ["name", "age", "role"],
}
OPTIONAL_ONLY = {"type": "object", "properties": {"x": {"type": "integer"}, "y": {"type": ["boolean", "null"]}}}
INT_LIST = {"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 4}
MIXED = {
    "$defs": {"point": {"type": "object", "properties": {"x": {"type": "number"}, "y": {"type": "number"}},
                        "required": ["x", "y"], "additionalProperties": False}},
    "type": "object",
    "properties": {
        "kind": {"const": "shape"},
        "at": {"$ref": "#/$defs/point"},
        "id": {"anyOf": [{"type": "integer"}, {"type": "string", "pattern": "[a-z]{2,4}"}]},
        "day": {"type": "string", "format": "date"},
        "extra": {},
    },
    "required": ["kind", "at", "id"],
}

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather for a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
                       "required": ["city"]}}},
    {"type": "function", "function": {
        "name": "add", "description": "Add two integers.",
        "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                       "required": ["a", "b"], "additionalProperties": False}}},
]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    yield


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer(build_tiny_tokenizer(tmp_path_factory.mktemp("constrain"), vocab_size=400))


@pytest.fixture(scope="module")
def model(tok):
    from slmforge.model import build_model

    ids = {"bos": tok.bos_token_id, "eos": tok.eos_token_id, "pad": tok.pad_token_id}
    return build_model(TINY, vocab_size=len(tok), special_ids=ids, seed=0).eval()


@pytest.fixture(scope="module")
def eos_ids(tok) -> list[int]:
    return [tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")]


@pytest.fixture(scope="module")
def bias(tok, model, eos_ids) -> torch.Tensor:
    width = model.get_output_embeddings().weight.shape[0]
    b = torch.zeros(width)
    for text, i in tok.get_vocab().items():
        data = tok.convert_tokens_to_string([text])
        if data and set(data) <= set('"}],'):
            b[i] = 3.0
    b[eos_ids] = 3.0
    return b


def sample(model, tok, constraint, eos_ids, bias, seed: int = 0, n: int = N_SEQ,
           max_tokens: int | None = None, states: list | None = None) -> list[tuple[str, bool]]:
    """(text, finished) for ``n`` sequences sampled at temperature 1 under ``constraint``
    (with ``max_tokens``: a budget-aware state, and at most that many tokens; ``states``
    receives the states)."""
    g = torch.Generator().manual_seed(seed)
    states = states if states is not None else []
    states[:] = [constraint.start(max_tokens) for _ in range(n)]
    out: list[list[int]] = [[] for _ in range(n)]
    done = [False] * n
    inp = torch.full((n, 1), tok.bos_token_id)
    cache = None
    with torch.no_grad():
        for _ in range(CAP if max_tokens is None else max_tokens + 1):
            res = model(input_ids=inp, cache=cache, use_cache=True)
            cache = res.cache
            logits = res.logits[:, -1, :].float() + bias
            nxt = torch.full((n,), tok.eos_token_id)
            for i in range(n):
                if done[i]:
                    continue
                row = logits[i]
                states[i].mask_logits_(row, eos_ids)
                t = int(torch.multinomial(torch.softmax(row, -1), 1, generator=g))
                nxt[i] = t
                if t in eos_ids:
                    assert states[i].can_end, "an end id was sampled before the text could end"
                    done[i] = True
                    continue
                states[i].advance(t)
                out[i].append(t)
                done[i] = states[i].finished
            if all(done):
                break
            inp = nxt[:, None]
    return [(tok.decode(ids, skip_special_tokens=True), d) for ids, d in zip(out, done, strict=True)]


def report(name: str, results: list[tuple[str, bool]]) -> int:
    capped = sum(not d for _, d in results)
    print(f"{name}: {capped}/{len(results)} sequences hit the {CAP}-token cap", file=sys.stderr)
    return capped


# --------------------------------------------------------------------------- JSON schema


@pytest.mark.parametrize("schema", [PERSON, OPTIONAL_ONLY, INT_LIST, MIXED],
                         ids=["person", "optional", "list", "mixed"])
def test_every_finished_sample_parses_and_validates(model, tok, eos_ids, bias, schema):
    results = sample(model, tok, json_schema_constraint(tok, schema), eos_ids, bias)
    validator = Draft202012Validator(schema)
    finished = [text for text, done in results if done]
    for text in finished:
        value = json.loads(text)
        assert not list(validator.iter_errors(value)), text
        validate_json(text, schema)
        if schema is MIXED and "day" in value:  # ASCII digits, though regex \d is Unicode-wide
            assert re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", value["day"]), text
    assert report(str(schema)[:30], results) <= len(results) // 5


def test_json_object_gives_a_dict(model, tok, eos_ids, bias):
    results = sample(model, tok, json_schema_constraint(tok, None), eos_ids, bias, seed=1)
    for text, done in results:
        if done:
            assert isinstance(json.loads(text), dict), text
            validate_json(text, None)
    assert report("json_object", results) <= len(results) // 5


def test_state_api_allowed_ids_end_and_wrong_tokens(tok, eos_ids):
    c = regex_constraint(tok, r"\{\}")
    assert c is regex_constraint(tok, r"\{\}")  # cached
    s = c.start()
    brace = tok.convert_tokens_to_ids("{")
    assert brace in s.allowed_ids().tolist() and not s.can_end and not s.finished
    with pytest.raises(GenerateError, match="not allowed"):
        s.advance(tok.convert_tokens_to_ids("}"))
    with pytest.raises(GenerateError, match="before the constrained text was complete"):
        s.advance(eos_ids[0])
    s.advance(brace)
    s.advance(tok.convert_tokens_to_ids("}"))
    assert s.finished and s.can_end
    assert s.allowed_ids().tolist() == list(c.eos_ids)
    # A logits row wider than the vocabulary: padding ids and every non-end id masked.
    row = torch.zeros(len(tok) + 7)
    s.mask_logits_(row, eos_ids)
    assert torch.isfinite(row).nonzero().flatten().tolist() == sorted(eos_ids)
    s.advance(eos_ids[1])
    assert s.finished


def test_batched_masking_matches_row_by_row(tok, eos_ids):
    c = json_schema_constraint(tok, PERSON)
    fresh, in_string, done, ended = c.start(), c.start(), c.start(), c.start()
    for t in tok('{"name":"', add_special_tokens=False)["input_ids"]:
        in_string.advance(t)
    for st in (done, ended):
        for t in tok('{"name":"a","age":1,"role":"user"}', add_special_tokens=False)["input_ids"]:
            st.advance(t)
    ended.advance(eos_ids[0])
    number = json_schema_constraint(tok, {"type": "integer"}).start()  # another constraint in the batch
    number.advance(tok.convert_tokens_to_ids("7"))
    assert done.finished and ended.finished and number.can_end and not number.finished
    tight = c.start(c.min_tokens)  # the smallest budget: walk to a step it narrows
    while tight.allowed_ids().numel() >= c._step(tight._state).ids.numel():
        tight.advance(tight.allowed_ids()[0])
    states = [fresh, None, in_string, done, ended, number, tight]
    logits = torch.randn(len(states), len(tok) + 3, generator=torch.Generator().manual_seed(0))
    expected = logits.clone()
    for row, st in zip(expected, states, strict=True):
        if st is not None:
            st.mask_logits_(row, eos_ids)
    fused = logits.clone()
    mask_logits_rows_(logits, states, eos_ids)
    assert torch.equal(logits, expected)
    rows = [r for r, st in enumerate(states) if st is not None]  # the accelerator path, run on the CPU
    _mask_rows_fused(fused, rows, [states[r]._ids_on(fused.device, fused.shape[1], tuple(eos_ids)) for r in rows])
    assert torch.equal(fused, expected)
    assert torch.isfinite(logits[1]).all()  # the unconstrained row is untouched
    assert torch.isfinite(logits[4]).nonzero().flatten().tolist() == sorted(eos_ids)
    assert 0 < int(torch.isfinite(logits[6]).sum()) < c._step(tight._state).ids.numel()  # the budget narrowed it


def test_json_starts_with_a_brace_and_masks_specials(tok, eos_ids):
    s = json_schema_constraint(tok, OPTIONAL_ONLY).start()
    row = torch.randn(len(tok))
    s.mask_logits_(row, eos_ids)
    allowed = torch.isfinite(row).nonzero().flatten().tolist()
    assert allowed and all(tok.decode([i]).startswith("{") for i in allowed)
    assert not set(allowed) & set(tok.all_special_ids)


@pytest.mark.parametrize("schema, keyword", [
    ({"type": "object", "properties": {"n": {"type": "integer", "minimum": 1}}}, "minimum"),
    ({"type": "object", "properties": {"n": {"not": {"type": "string"}}}}, "not"),
    ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "uniqueItems"),
    ({"type": "object", "patternProperties": {"^x": {"type": "string"}}}, "patternProperties"),
    ({"type": "object", "properties": {"ip": {"type": "string", "format": "ipv4"}}}, "ipv4"),
    ({"type": "object", "properties": {"a": {"$ref": "https://example.com/a.json"}}}, "example.com"),
    ({"allOf": [{"type": "object"}, {"required": ["a"]}]}, "allOf"),
    ({"type": "object", "properties": {"a": {"type": "string"}}, "required": ["b"]}, "requires"),
    ({"type": "object", "properties": {"a": {"type": "strin"}}}, "not a valid JSON schema"),
    ({"type": "object", "properties": {"a": {"type": "string", "pattern": "(?!x)y"}}}, "look-around"),
    ({"type": "object", "properties": {"a": {"type": "string", "pattern": "(a)\\1"}}}, "back-reference"),
])
def test_unsupported_or_invalid_schema_names_the_keyword(tok, schema, keyword):
    with pytest.raises(GenerateError, match=keyword):
        json_schema_constraint(tok, schema)


def test_validate_json_messages():
    with pytest.raises(GenerateError, match="not valid JSON"):
        validate_json('{"a": ', None)
    with pytest.raises(GenerateError, match="not an object"):
        validate_json("[1]", None)
    with pytest.raises(GenerateError, match=r"\['age'\]"):
        validate_json('{"name": "x", "age": "old", "role": "user"}', PERSON)


# --------------------------------------------------------------------------- tools


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "add"}}],
                         ids=["required", "named"])
def test_forced_tool_calls_always_parse_and_validate(model, tok, eos_ids, bias, choice):
    results = sample(model, tok, tool_constraint(tok, TOOLS, choice), eos_ids, bias, seed=2)
    names = set()
    for text, done in results:
        if done:
            call = parse_tool_call(text, TOOLS)
            assert call is not None, text
            names.add(call["name"])
    assert report(f"tools {choice}", results) <= len(results) // 5
    assert names == ({"add"} if isinstance(choice, dict) else {"add", "get_weather"})


def test_auto_gives_a_call_or_text_not_starting_with_a_brace(model, tok, eos_ids, bias):
    b = bias.clone()
    b[tok.convert_tokens_to_ids("{")] += 5.0  # so that both branches are sampled
    results = sample(model, tok, tool_constraint(tok, TOOLS, "auto"), eos_ids, b, seed=3)
    calls = texts = 0
    for text, done in results:
        if text.lstrip().startswith("{"):
            if done:
                assert parse_tool_call(text, TOOLS) is not None, text
                calls += 1
        else:
            assert parse_tool_call(text, TOOLS) is None
            texts += 1
    report("tools auto", results)
    assert calls and texts


def test_tool_choice_none_has_no_constraint_and_no_prompt(tok):
    assert tool_constraint(tok, TOOLS, "none") is None
    assert tool_call_schema(TOOLS, "none") is None
    assert tools_system_prompt(TOOLS, "none") == ""
    assert tool_constraint(tok, None, None) is None


def test_tool_call_schema_hoists_defs():
    tools = [{"type": "function", "function": {"name": "move", "parameters": {
        "type": "object", "$defs": {"p": {"type": "integer"}}, "properties": {"to": {"$ref": "#/$defs/p"}}}}}]
    schema = tool_call_schema(tools, "required")
    assert schema["$defs"] == {"tool0_p": {"type": "integer"}}
    v = Draft202012Validator(schema)
    assert v.is_valid({"name": "move", "arguments": {"to": 3}})
    assert not v.is_valid({"name": "move", "arguments": {"to": "x"}})


@pytest.mark.parametrize("tools, choice, field", [
    ([{"type": "function", "function": {"name": "ok"}}, {"type": "function", "function": {"name": "bad name"}}],
     "auto", r"tools\[1\]\.function\.name"),
    ([{"type": "retrieval"}], "auto", r"tools\[0\]\.type"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "n": {"type": "nope"}}}}}], "auto", r"tools\[0\]\.function\.parameters"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "n": {"type": "integer", "maximum": 3}}}}}], "required", r"tools\[0\]\.function\.parameters.*maximum"),
    ([{"type": "function", "function": {"name": "f"}}, {"type": "function", "function": {"name": "f"}}],
     "auto", r"tools\[1\]\.function\.name 'f' is used"),
    (TOOLS, "sometimes", "tool_choice"),
    (TOOLS, {"type": "function", "function": {"name": "nope"}}, r"tool_choice\.function\.name"),
    ([], "required", "no tools"),
])
def test_check_tools_names_the_bad_field(tools, choice, field):
    with pytest.raises(GenerateError, match=field):
        check_tools(tools, choice)


def test_parse_tool_call():
    assert parse_tool_call('{"name":"add","arguments":{"a":1,"b":2}}', TOOLS) == {
        "name": "add", "arguments": {"a": 1, "b": 2}}
    assert parse_tool_call(' {"name": "get_weather", "arguments": {"city": "Oslo"}}\n', TOOLS)["name"] == "get_weather"
    assert parse_tool_call('{"name":"add","arguments":{"a":"1","b":2}}', TOOLS) is None  # invalid arguments
    assert parse_tool_call('{"name":"sub","arguments":{}}', TOOLS) is None  # unknown tool
    assert parse_tool_call("The answer is 3.", TOOLS) is None
    assert parse_tool_call('{"name":"add","arguments":{"a":1,"b":2}} done', TOOLS) is None


def test_chat_messages_for_template_round_trip():
    call = {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "What is 2+3?"}]},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "5"},
    ]
    out = chat_messages_for_template(messages, TOOLS, "auto")
    assert [m["role"] for m in out] == ["system", "user", "assistant", "user"]
    assert out[0]["content"].startswith("Be brief.\n\nYou can call these tools:")
    assert "get_weather" in out[0]["content"] and '"required":["a","b"]' in out[0]["content"]
    assert out[1]["content"] == "What is 2+3?"
    assert parse_tool_call(out[2]["content"], TOOLS) == {"name": "add", "arguments": {"a": 2, "b": 3}}
    assert out[3]["content"] == "Result of add: 5"
    # No system message: the tools prompt becomes one; "none" adds nothing.
    assert chat_messages_for_template(messages[1:], TOOLS, "required")[0]["content"].endswith(
        "You must call one of the tools now.")
    assert chat_messages_for_template(messages[1:], TOOLS, "none")[0]["role"] == "user"
    with pytest.raises(GenerateError, match=r"messages\[1\]\.tool_call_id"):
        chat_messages_for_template([messages[1], {"role": "tool", "tool_call_id": "x", "content": "5"}], TOOLS, "auto")
    with pytest.raises(GenerateError, match=r"messages\[0\]\.role"):
        chat_messages_for_template([{"role": "function", "content": "x"}], TOOLS, "auto")


# --------------------------------------------------------------------------- vocabularies


def sentencepiece_tokenizer():
    """A tiny Llama-style tokenizer: BPE with byte fallback, '▁' for spaces, <0xNN> byte tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    chars = sorted({c for text in PROSE for c in text.replace(" ", "\u2581")} | set('\u2581{}[]":,'))
    for c in chars:
        vocab.setdefault(c, len(vocab))
    merges = [("\u2581", "t"), ("h", "e"), ("\u2581t", "he"), ('"', ":"), ("\u2581", "a")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    tk.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_sentencepiece_vocabulary_maps_spaces_and_byte_tokens():
    tok = sentencepiece_tokenizer()
    mapping = {i: data for data, ids in _token_bytes(tok).items() for i in ids}
    vocab = tok.get_vocab()
    assert mapping[vocab["\u2581the"]] == b" the"
    assert mapping[vocab["<0x41>"]] == b"A" and mapping[vocab["<0xE2>"]] == b"\xe2"
    assert vocab["</s>"] not in mapping and vocab["<unk>"] not in mapping
    # Random logits under the schema: every finished text is valid JSON, including text
    # spelled with byte tokens (the only way to write '€').
    c = json_schema_constraint(tok, {"type": "object", "properties": {"s": {"enum": ["\u20ac", "the a"]},
                                                                       "n": {"type": "integer"}}})
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        s, ids = c.start(), []
        while not s.finished and len(ids) < 100:
            row = torch.randn(len(tok), generator=g)
            s.mask_logits_(row, [tok.eos_token_id])
            t = int(torch.multinomial(torch.softmax(row, -1), 1, generator=g))
            if t == tok.eos_token_id:
                break
            s.advance(t)
            ids.append(t)
        text = b"".join(mapping[i] for i in ids).decode("utf-8")
        assert tok.decode(ids) == text
        assert isinstance(json.loads(text), dict)


def test_unmappable_vocabulary_is_a_clear_error():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordPiece({"[UNK]": 0, "[SEP]": 1, "a": 2, "##b": 3}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.decoder = decoders.WordPiece()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", eos_token="[SEP]")
    with pytest.raises(GenerateError, match="WordPiece"):
        json_schema_constraint(tok, OPTIONAL_ONLY)


def test_regex_errors(tok):
    with pytest.raises(GenerateError, match="regular expression"):
        regex_constraint(tok, r"(a")
    with pytest.raises(GenerateError, match="empty text"):
        regex_constraint(tok, r"(\{a+\})?")


def test_requests_that_arrive_together_share_one_compiled_constraint(tok):
    import concurrent.futures

    schema = {"type": "object", "properties": {"together": {"type": "array", "items": {"type": "integer"}}},
              "required": ["together"]}
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        built = list(pool.map(lambda _: json_schema_constraint(tok, schema), range(4)))
    assert all(c is built[0] for c in built)


def test_numbers_are_capped_at_the_digits_a_number_can_hold():
    import re as _re

    from slmforge.generate._schema import _schema_regex

    rx = _schema_regex({"type": "object", "properties": {"n": {"type": "integer"}, "x": {"type": "number"}},
                        "required": ["n", "x"]})
    assert _re.fullmatch(rx, '{"n":-1234567890123456789,"x":3.14159265358979e+100}')
    assert not _re.fullmatch(rx, '{"n":12345678901234567890,"x":1}')  # 20 digits: a model that never stops
    assert not _re.fullmatch(rx, '{"n":1,"x":1.123456789012345678}')


# --------------------------------------------------------------------------- token budgets

NESTED = {"type": "object", "properties": {
    "user": {"type": "object", "properties": {"name": {"type": "string"}, "id": {"type": "integer"},
                                             "email": {"type": "string", "format": "email"}},
             "required": ["name", "id"]},
    "items": {"type": "array", "items": {"type": "object", "properties": {"sku": {"type": "string"},
                                                                         "qty": {"type": "number"}},
                                         "required": ["sku", "qty"]}, "minItems": 1},
    "status": {"enum": ["new", "paid", "shipped"]}}, "required": ["user", "items", "status"]}
FREE_TEXT = {"type": "object", "properties": {"title": {"type": "string"}, "body": {"type": "string"},
                                              "score": {"type": "number"}, "note": {"type": ["string", "null"]}},
             "required": ["title", "body", "score"]}
BUDGET_CASES = [("person", PERSON), ("nested", NESTED), ("free_text", FREE_TEXT), ("mixed", MIXED),
                ("list", INT_LIST), ("json_object", None)]


@pytest.mark.parametrize("max_tokens", [16, 24, 40, 64])
def test_budgeted_replies_always_parse_and_validate(model, tok, eos_ids, max_tokens):
    """No closing bias: a random model at temperature 1 writes long strings and numbers, and still
    every reply is complete, valid JSON within max_tokens (or the request is refused up front)."""
    no_bias = torch.zeros(model.get_output_embeddings().weight.shape[0])
    shortened = 0
    for name, schema in BUDGET_CASES:
        constraint = json_schema_constraint(tok, schema)
        if constraint.min_tokens > max_tokens:
            with pytest.raises(GenerateError, match=f"max_tokens >= {constraint.min_tokens}"):
                constraint.start(max_tokens)
            continue
        states: list = []
        results = sample(model, tok, constraint, eos_ids, no_bias, seed=max_tokens, n=12, max_tokens=max_tokens,
                         states=states)
        for (text, done), st in zip(results, states, strict=True):
            assert done and st.finished, (name, text)
            validate_json(text, schema)
            assert len(tok(text, add_special_tokens=False)["input_ids"]) <= max_tokens + 2, text  # re-tokenized
            shortened += st.shortened
    assert shortened  # the budget did decide some replies


@pytest.mark.parametrize("max_tokens", [40, 64])
def test_budgeted_tool_calls_always_parse(model, tok, eos_ids, max_tokens):
    no_bias = torch.zeros(model.get_output_embeddings().weight.shape[0])
    for choice, parallel in [("required", True), ({"type": "function", "function": {"name": "add"}}, True),
                             ("required", False)]:
        constraint = tool_constraint(tok, TOOLS, choice, parallel=parallel)
        for text, done in sample(model, tok, constraint, eos_ids, no_bias, seed=7, n=12, max_tokens=max_tokens):
            calls = parse_tool_calls(text, TOOLS)
            assert done and calls, text
            assert len(calls) == 1 or (parallel and choice == "required"), text


def test_parallel_calls_are_written_one_per_line_within_the_budget(model, tok, eos_ids, bias):
    b = bias.clone()
    b[tok.convert_tokens_to_ids("[")] += 4.0  # invites an array of calls
    b[tok.convert_tokens_to_ids(",")] += 2.0  # and another call in it
    counts = {}
    for choice in ("required", {"type": "function", "function": {"name": "add"}}):
        constraint = tool_constraint(tok, TOOLS, choice, parallel=True)
        found = []
        for text, done in sample(model, tok, constraint, eos_ids, b, seed=8, n=12, max_tokens=160):
            calls = parse_tool_calls(text, TOOLS)
            assert done and calls, text
            found.append(len(calls))
        counts[str(choice)] = found
    assert max(counts["required"]) > 1, counts  # several calls in one reply
    assert set(counts[str({"type": "function", "function": {"name": "add"}})]) == {1}  # a named tool: once


def test_min_tokens_is_the_shortest_reply_and_smaller_budgets_are_refused(tok, eos_ids):
    c = regex_constraint(tok, r'\{"a":"[a-z]{0,40}","b":(true|false)\}')
    shortest = len(tok('{"a":"","b":true}', add_special_tokens=False)["input_ids"])
    assert 1 <= c.min_tokens <= shortest
    with pytest.raises(GenerateError, match=f"max_tokens >= {c.min_tokens}"):
        c.start(c.min_tokens - 1)
    # At exactly the minimum, every step must move towards the end: random logits still finish in time.
    g = torch.Generator().manual_seed(0)
    for _ in range(10):
        s, ids = c.start(c.min_tokens), []
        while not s.finished:
            row = torch.randn(len(tok), generator=g)
            s.mask_logits_(row, eos_ids)
            t = int(torch.multinomial(torch.softmax(row, -1), 1, generator=g))
            s.advance(t)
            ids.append(t)
        assert len(ids) == c.min_tokens and s.tokens_left == 0 and s.shortened
        assert re.fullmatch(r'\{"a":"[a-z]{0,40}","b":(true|false)\}', tok.decode(ids))
    # A token the constraint allows but that would leave too few tokens is refused.
    s, refused = c.start(c.min_tokens), False
    while not s.finished and not refused:
        narrow = s.allowed_ids().tolist()
        extra = sorted(set(c._step(s._state).ids.tolist()) - set(narrow))
        if extra:
            with pytest.raises(GenerateError, match="too few"):
                s.advance(extra[0])
            refused = True
        s.advance(narrow[0])
    assert refused


def test_without_a_budget_or_with_room_nothing_is_shortened(tok):
    c = regex_constraint(tok, r"\{\}")
    s = c.start(50)
    for t in tok("{}", add_special_tokens=False)["input_ids"]:
        s.advance(t)
    assert s.finished and not s.shortened and s.tokens_left == 50 - len(tok("{}", add_special_tokens=False)["input_ids"])
    n = regex_constraint(tok, r"[0-9]{1,30}").start(3)  # runs out where more digits could follow
    for t in tok("7", add_special_tokens=False)["input_ids"] * 3:
        n.advance(t)
    assert n.finished and n.shortened and n.allowed_ids().tolist() == list(n._constraint.eos_ids)


def test_parse_tool_calls_reads_one_call_or_an_array_of_them():
    two = '[{"name":"add","arguments":{"a":1,"b":2}},{"name":"get_weather","arguments":{"city":"Oslo"}}]'
    assert parse_tool_calls(two, TOOLS) == [{"name": "add", "arguments": {"a": 1, "b": 2}},
                                            {"name": "get_weather", "arguments": {"city": "Oslo"}}]
    assert parse_tool_calls('{"name":"add","arguments":{"a":1,"b":2}}', TOOLS) == [
        {"name": "add", "arguments": {"a": 1, "b": 2}}]
    assert parse_tool_call(two, TOOLS) is None  # not exactly one
    assert parse_tool_calls(two + " thanks", TOOLS) is None
    assert parse_tool_calls(two.replace('"b":2', '"b":"2"'), TOOLS) is None  # every call must validate
    assert parse_tool_calls("[]", TOOLS) is None and parse_tool_calls("[1]", TOOLS) is None
    assert parse_tool_calls("hello", TOOLS) is None
    assert "JSON array" in tools_system_prompt(TOOLS, "auto", parallel=True)
    assert "JSON array" not in tools_system_prompt(TOOLS, {"type": "function", "function": {"name": "add"}},
                                                   parallel=True)
    # History with parallel calls renders them as the array the model writes.
    calls = [{"id": f"c{i}", "type": "function", "function": {"name": "add", "arguments": f'{{"a":{i},"b":0}}'}}
             for i in range(2)]
    out = chat_messages_for_template([{"role": "user", "content": "hi"},
                                      {"role": "assistant", "content": None, "tool_calls": calls},
                                      {"role": "tool", "tool_call_id": "c1", "content": "1"}], TOOLS, "auto", True)
    assert [c["arguments"]["a"] for c in parse_tool_calls(out[2]["content"], TOOLS)] == [0, 1]
    assert out[3]["content"] == "Result of add: 1"
