"""Prompt log-probabilities on /v1/completions (``echo`` with ``logprobs``, ``max_tokens`` 0): the OpenAI
legacy / vLLM shape lm-eval's ``local-completions`` reads, checked against the model's own logits."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from slmforge.generate import Completion, TorchGenerator
from slmforge.serve import create_app

from conftest import TINY, LiveServer, build_peaky_model, build_tiny_tokenizer

PROMPT = "The garden was planted in early spring"


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    yield


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("echo")
    return build_peaky_model(build_tiny_tokenizer(workdir, vocab_size=400), workdir / "tiny", TINY)


@pytest.fixture(scope="module")
def gen(model_dir) -> TorchGenerator:
    return TorchGenerator.from_pretrained(model_dir, device="cpu")


class Plain:
    """An engine without our batching (as ONNX and llama.cpp are to the server)."""

    def complete(self, prompt, params):
        return [Completion(text="done", tokens=1, finish_reason="stop")] * params.n

    def complete_batch(self, prompts, params):
        return [self.complete(p, params) for p in prompts]


@pytest.fixture(scope="module")
def base_url(gen):
    with LiveServer(create_app({"tiny": gen, "plain": Plain()})) as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=30)


def reference_logprobs(model_dir: Path, ids: list[int]):
    """log_softmax of the model's logits, computed directly with transformers."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


def test_echo_with_max_tokens_0_returns_the_prompt_tokens_log_probabilities(client, gen, model_dir):
    ids = gen.tokenizer(PROMPT)["input_ids"]  # with the BOS the server adds to a text prompt
    got = client.completions.create(model="tiny", prompt=PROMPT, echo=True, logprobs=3, max_tokens=0)
    choice = got.choices[0]
    assert choice.text == PROMPT and choice.finish_reason == "length"
    assert got.usage.prompt_tokens == len(ids) and got.usage.completion_tokens == 0
    lp = choice.logprobs
    assert lp.tokens == [gen.tokenizer.decode([t]) for t in ids]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == len(ids)
    ref = reference_logprobs(model_dir, ids)
    for i in range(1, len(ids)):
        assert lp.token_logprobs[i] == pytest.approx(float(ref[i - 1, ids[i]]), abs=1e-4)
        top = ref[i - 1].topk(3)
        want = {gen.tokenizer.decode([t]): float(v) for v, t in zip(top.values, top.indices)}
        assert lp.top_logprobs[i].keys() == want.keys()
        assert all(lp.top_logprobs[i][k] == pytest.approx(v, abs=1e-4) for k, v in want.items())
    # Offsets point into the echoed text; the BOS is not part of it.
    assert lp.text_offset[0] == lp.text_offset[1] == 0
    assert "".join(choice.text[a:b] for a, b in zip(lp.text_offset, [*lp.text_offset[1:], len(PROMPT)])) == PROMPT


def test_echo_with_a_completion_continues_the_prompt_and_its_logprobs(client):
    plain = client.completions.create(model="tiny", prompt=PROMPT, logprobs=1, max_tokens=3, temperature=0)
    echo = client.completions.create(model="tiny", prompt=PROMPT, echo=True, logprobs=1, max_tokens=3, temperature=0)
    alone = client.completions.create(model="tiny", prompt=PROMPT, echo=True, logprobs=1, max_tokens=0)
    a, e, z = plain.choices[0], echo.choices[0], alone.choices[0]
    assert e.text == PROMPT + a.text and a.text
    assert e.logprobs.tokens == z.logprobs.tokens + a.logprobs.tokens
    assert e.logprobs.token_logprobs == z.logprobs.token_logprobs + a.logprobs.token_logprobs
    assert e.logprobs.text_offset[len(z.logprobs.tokens)] == len(PROMPT)
    assert echo.usage.completion_tokens == 3


def test_token_id_prompts_in_one_request_are_scored_as_given(client, gen, model_dir):
    """lm-eval sends token ids, several prompts per request, and reads choice i for prompt i."""
    ids = gen.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]  # no BOS: the ids are used as sent
    short = ids[:3]
    got = client.completions.create(model="tiny", prompt=[ids, short], echo=True, logprobs=1, max_tokens=0)
    assert [c.index for c in got.choices] == [0, 1]
    assert got.choices[0].text == PROMPT and len(got.choices[1].logprobs.tokens) == 3
    ref = reference_logprobs(model_dir, ids)
    for i in range(1, len(ids)):
        assert got.choices[0].logprobs.token_logprobs[i] == pytest.approx(float(ref[i - 1, ids[i]]), abs=1e-4)
    assert got.choices[1].logprobs.token_logprobs[1:] == pytest.approx(got.choices[0].logprobs.token_logprobs[1:3],
                                                                      abs=1e-5)


def test_max_tokens_0_without_echo_is_an_empty_completion(client):
    got = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=0)
    assert got.choices[0].text == "" and got.choices[0].finish_reason == "length"
    assert got.usage.completion_tokens == 0 and got.usage.prompt_tokens > 0


def test_echo_runs_beside_the_batch_without_changing_what_it_generates(client):
    want = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0).choices[0].text
    scores = client.completions.create(model="tiny", prompt=PROMPT, echo=True, logprobs=1, max_tokens=0)
    scores = scores.choices[0].logprobs.token_logprobs

    def generate(_):
        return client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0).choices[0].text

    def score(_):
        got = client.completions.create(model="tiny", prompt=PROMPT, echo=True, logprobs=1, max_tokens=0)
        return got.choices[0].logprobs.token_logprobs

    with ThreadPoolExecutor(8) as pool:
        texts = pool.map(generate, range(6))
        scored = pool.map(score, range(6))
        assert list(texts) == [want] * 6
        for s in scored:
            assert s == pytest.approx(scores, abs=1e-4)


def test_echo_needs_the_torch_engine_and_is_not_streamed(base_url, client):
    with pytest.raises(openai.BadRequestError, match="echo is not available .*engine Plain"):
        client.completions.create(model="plain", prompt=PROMPT, echo=True, logprobs=1, max_tokens=0)
    with pytest.raises(openai.BadRequestError, match="token ids needs the torch engine"):
        client.completions.create(model="plain", prompt=[1, 2, 3], max_tokens=1)
    r = httpx.post(f"{base_url}/v1/completions", json={"model": "tiny", "prompt": PROMPT, "echo": True,
                                                       "max_tokens": 0, "stream": True})
    assert r.status_code == 400 and "not streamed" in r.json()["error"]["message"]
    r = httpx.post(f"{base_url}/v1/completions", json={"model": "tiny", "prompt": [1, 10**6], "max_tokens": 1})
    assert r.status_code == 400 and "outside the vocabulary" in r.json()["error"]["message"]
    # The plain engine still answers max_tokens 0 (an empty completion, as OpenAI).
    assert client.completions.create(model="plain", prompt=PROMPT, max_tokens=0).choices[0].text == ""


def test_echo_scores_with_the_named_lora_adapter_or_the_bare_base(model_dir, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from slmforge.serve._models import ServedModel, wrap_models

    from conftest import build_lora_adapter

    adapter = build_lora_adapter(model_dir, tmp_path / "a1", seed=1)
    with_adapters = TorchGenerator.from_pretrained(model_dir, adapters={"a1": adapter}, device="cpu")
    with_adapters.set_adapter(None)
    table = wrap_models({"base": with_adapters}, max_batch_size=4)
    table["a1"] = ServedModel("a1", "generate", generator=with_adapters, batch=table["base"].batch, adapter="a1")
    ids = with_adapters.tokenizer(PROMPT)["input_ids"]
    with torch.no_grad():
        lora = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), adapter).eval()
        want_a1 = torch.log_softmax(lora(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)
    want_base = reference_logprobs(model_dir, ids)
    with LiveServer(create_app(table)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=30)
        with ThreadPoolExecutor(4) as pool:  # adapter and base requests interleave with the engine's steps
            asked = [pool.submit(client.completions.create, model=name, prompt=PROMPT, echo=True, logprobs=1,
                                 max_tokens=2, temperature=0) for name in ("a1", "base") * 3]
            for name, future in zip(("a1", "base") * 3, asked):
                got = future.result().choices[0].logprobs.token_logprobs
                want = want_a1 if name == "a1" else want_base
                assert got[1:len(ids)] == pytest.approx([float(want[i - 1, ids[i]]) for i in range(1, len(ids))],
                                                        abs=1e-4), name
