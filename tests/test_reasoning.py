"""Reasoning strategies with scripted generators, the bench, and the proxy with the official openai client in
front of our server on 127.0.0.1."""

from __future__ import annotations

import json

import httpx
import pytest

from slmforge.errors import ReasoningError
from slmforge.generate import Completion, SamplingParams
from slmforge.reasoning import (
    Budget,
    adaptive,
    best_of_n,
    regex_verifier,
    run_strategy,
    sandbox_verifier,
    self_consistency,
    self_refine,
    split_model_prefix,
    tree_search,
)

from conftest import TINY, CompleteOnly, LiveServer, build_peaky_model, build_tiny_tokenizer


class Sampler(CompleteOnly):
    """A Generator whose replies come from ``reply(prompt, i)`` (i counts every sample so far); it keeps
    the n of each call."""

    def __init__(self, reply) -> None:
        self.reply, self.count, self.calls = reply, 0, []

    def complete(self, prompt, params):
        self.calls.append(params.n)
        out = []
        for _ in range(params.n):
            text = self.reply(prompt, self.count)
            self.count += 1
            out.append(Completion(text=text, tokens=len(text.split()), finish_reason="stop"))
        return out


def cycle(*answers):
    return Sampler(lambda prompt, i: answers[i % len(answers)])


def test_self_consistency_picks_the_majority():
    gen = cycle("so 7 + 5 = 12. The answer is 12.", "The answer is 11.", "I get 12.", "maybe 13", "12")
    r = self_consistency(gen, "Q: 7 + 5?", n=5)
    assert r.answer == "12" and r.votes == {"12": 3, "11": 1, "13": 1}
    assert r.text == "so 7 + 5 = 12. The answer is 12." and r.samples == 5 and gen.calls == [5]
    assert r.tokens == sum(c.tokens for c in r.calls) > 0
    with pytest.raises(ReasoningError, match="n >= 1"):
        self_consistency(gen, "Q", n=0)


def test_best_of_n_picks_the_verified_answer():
    gen = cycle("The answer is 40.", "The answer is 42.", "The answer is 41.")
    r = best_of_n(gen, "Q", regex_verifier(r"\b42\b"), n=3)
    assert r.answer == "42" and r.votes == {"sample 0": 0.0, "sample 1": 1.0, "sample 2": 0.0}
    code = Sampler(lambda p, i: ["```python\ndef add(a, b):\n    return a - b\n```",
                                 "```python\ndef add(a, b):\n    return a + b\n```"][i % 2])
    verified = best_of_n(code, "Write add.", sandbox_verifier("assert add(2, 3) == 5", allow_weak=True),
                         n=2, extract=lambda t: t)
    assert "a + b" in verified.text
    with pytest.raises(ReasoningError, match="not a regular expression"):
        regex_verifier("(")


def test_adaptive_compute_spends_fewer_samples_on_easy_items():
    easy = adaptive(cycle("The answer is 4."), "2+2?", first=3, max_n=12)
    hard = adaptive(cycle("The answer is 1.", "The answer is 2.", "The answer is 3.", "The answer is 1."), "?",
                    first=3, max_n=12)
    assert easy.samples == 3 and easy.answer == "4"
    assert hard.samples > easy.samples and hard.samples <= 12 and hard.answer == "1"


def test_budgets_bound_the_compute():
    gen = cycle("one two three four five six seven eight nine ten")
    r = adaptive(Sampler(lambda p, i: f"answer {i}"), "?", first=2, max_n=50, budget=Budget(max_tokens=9))
    assert r.stopped == "max_tokens" and r.tokens <= 10
    none = self_consistency(gen, "?", n=4, budget=Budget(max_seconds=-1))
    assert none.stopped == "max_seconds" and none.calls == [] and none.answer is None


def test_tree_search_extends_steps_and_finishes_on_an_answer():
    steps = {0: "First, 3 * 4 = 12.", 1: "Then 12 + 1 = 13, so the answer is 13."}

    gen = Sampler(lambda prompt, i: steps[1] if "12." in prompt else steps[0])
    r = tree_search(gen, "Q: 3 * 4 + 1?", breadth=2, beam=1, depth=3)
    assert r.answer == "13" and r.text.startswith("First, 3 * 4 = 12.")
    assert all(n == 2 for n in gen.calls) and len(gen.calls) == 2


def test_self_refine_stops_when_the_critique_accepts():
    replies = iter(["The answer is 10.", "Wrong: 4 * 3 is 12.", "4 * 3 = 12. The answer is 12.", "CORRECT"])
    r = self_refine(Sampler(lambda p, i: next(replies)), "4 * 3?", rounds=3)
    assert r.answer == "12" and [c.kind for c in r.calls] == ["answer", "critique", "revise", "critique"]


def test_strategy_names_and_prefixes():
    assert split_model_prefix("sc8-mymodel") == ("sc", 8, "mymodel")
    assert split_model_prefix("cot-qwen-7b") == ("cot", None, "qwen-7b")
    assert split_model_prefix("my-model") == (None, None, "my-model")
    gen = cycle("The answer is 5.")
    for name in ("direct", "cot", "sc", "bon", "tot", "refine", "adaptive", "auto"):
        r = run_strategy(name, gen, [{"role": "user", "content": "2+3?"}], n=2,
                         params=SamplingParams(max_new_tokens=16))
        assert r.answer == "5" and r.strategy == name, name
    with pytest.raises(ReasoningError, match="Unknown reasoning strategy 'magic'"):
        run_strategy("magic", gen, "?")


def test_bench_table_and_files(tmp_path):
    from slmforge.reasoning.bench import bench, save

    result = bench(cycle("The answer is 7."), "arithmetic", ["direct", "sc"], n=3, limit=4, progress=False)
    assert result["items"] == 4 and [r["strategy"] for r in result["rows"]] == ["direct", "sc"]
    assert result["rows"][1]["calls_mean"] == 3 and "p_vs_direct" in result["rows"][1]
    files = save(result, tmp_path)
    assert all(f.stat().st_size > 0 for f in files) and "| sc |" in (tmp_path / "bench.md").read_text()
    with pytest.raises(ReasoningError, match="generate suites"):
        bench(cycle("x"), "sentiment", ["direct"], progress=False)


# --------------------------------------------------------------------------- the proxy


@pytest.fixture(scope="module")
def upstream_url(tmp_path_factory, one_torch_thread):
    from slmforge.generate import TorchGenerator
    from slmforge.serve import create_app

    work = tmp_path_factory.mktemp("proxy")
    model = build_peaky_model(build_tiny_tokenizer(work, vocab_size=400), work / "model", TINY)
    with LiveServer(create_app({"tiny": TorchGenerator.from_pretrained(model, device="cpu")})) as url:
        yield url


def test_the_proxy_serves_the_openai_client_through_a_strategy(upstream_url):
    """openai client -> proxy (self-consistency by default, sc3- by name) -> our server: chat and streaming;
    usage counts every internal call, the trace holds them, the upstream saw them all."""
    import openai

    from slmforge.serve import create_app
    from slmforge.serve._reason import Reasoning
    from slmforge.serve._upstream import Upstream

    before = httpx.get(f"{upstream_url}/v1/usage").json()["data"]
    app = create_app({"tiny": Upstream(f"{upstream_url}/v1", "tiny")},
                     reasoning=Reasoning(default="sc", n=4, max_tokens=2000))
    with LiveServer(app) as proxy_url:
        client = openai.OpenAI(base_url=f"{proxy_url}/v1", api_key="unused")
        messages = [{"role": "user", "content": "What grows in the garden?"}]
        up0 = httpx.get(f"{upstream_url}/v1/usage").json()["data"]
        reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, seed=1)
        up1 = httpx.get(f"{upstream_url}/v1/usage").json()["data"]
        for field in ("prompt_tokens", "completion_tokens"):  # exactly what the upstream counted
            assert getattr(reply.usage, field) == sum(r[field] for r in up1) - sum(r[field] for r in up0)
        extra = reply.model_extra["slmforge"]
        assert extra["strategy"] == "sc" and extra["calls"] == 4 and reply.choices[0].message.content
        trace = httpx.get(f"{proxy_url}/v1/traces/{extra['trace_id']}").json()
        assert len(trace["calls"]) == 4 and all(c["kind"] == "sample" for c in trace["calls"])
        assert reply.usage.completion_tokens == sum(c["tokens"] for c in trace["calls"]) > 0
        assert reply.usage.prompt_tokens > 0
        named = client.chat.completions.create(model="sc3-tiny", messages=messages, max_tokens=12)
        assert named.model_extra["slmforge"]["calls"] == 3 and named.model == "tiny"
        direct = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12,
                                                extra_body={"strategy": "direct"})
        assert direct.model_extra["slmforge"]["calls"] == 1
        chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, stream=True,
                                                     stream_options={"include_usage": True}))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text and chunks[-1].usage.completion_tokens > 0
        with pytest.raises(openai.BadRequestError, match="Unknown strategy"):
            client.chat.completions.create(model="tiny", messages=messages, extra_body={"strategy": "magic"})
        with pytest.raises(openai.BadRequestError, match="cannot be combined with tools"):
            client.chat.completions.create(model="tiny", messages=messages, tools=[{"type": "function", "function": {
                "name": "f", "parameters": {"type": "object", "properties": {}}}}])
        assert httpx.get(f"{proxy_url}/v1/traces/trace-nope").status_code == 404
    after = httpx.get(f"{upstream_url}/v1/usage").json()["data"]
    done = sum(r["requests"] for r in after) - sum(r["requests"] for r in before)
    assert done == 4  # one upstream request per strategy call (sc: one request with n samples); errors send none
    assert json.dumps(trace)  # the trace is plain JSON


def test_cli_reason_run_bench_and_cot(tmp_path, monkeypatch):
    """`slmforge reason run|bench|cot` end to end: a scripted model for run and bench; the CoT experiment
    with a few seconds of training."""
    from typer.testing import CliRunner

    import slmforge.cli.generate_cmd as generate_cmd
    from slmforge.cli.main import app

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(generate_cmd, "load_model", lambda *a, **k: cycle("so 6 * 7 = 42.", "42", "41"))
    r = CliRunner().invoke(app, ["reason", "run", "6 * 7?", "-m", "m", "-s", "sc", "-n", "3"])
    assert r.exit_code == 0 and "answer '42'" in r.stderr and "votes {'42': 2, '41': 1}" in r.stderr
    r = CliRunner().invoke(app, ["reason", "bench", "-m", "m", "--strategies", "direct,adaptive", "--limit", "3",
                                 "-n", "3", "--out", "rb"])
    assert r.exit_code == 0 and "| adaptive |" in r.stdout and (tmp_path / "rb" / "bench.png").is_file()
    r = CliRunner().invoke(app, ["reason", "cot", "--out", "cot", "--train-problems", "8", "--eval-problems", "2",
                                 "--minutes", "0.1", "--sc", "2"])
    assert r.exit_code == 0, r.output
    assert "| all |" in r.stdout and (tmp_path / "cot" / "cot-model" / "config.json").is_file()
