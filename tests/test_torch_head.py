"""The torch engine's batch-1 decode path on CPU (issue 15): the LM head's column-major twin, and
the certified head of plain greedy steps, with its int8 screen and with bf16.

A tiny random Llama (conftest's peaky model) and a tiny Gemma 3 with sliding-window layers and
nested RoPE parameters (test_onnx_gemma3's builder, a window of 8 that 32 new tokens run past):
the engine, with the twin attached, gives the same greedy tokens as ``model.generate`` on a
second copy of the model that has none; stop strings, max_tokens, streaming and batches of
several prompts (the row-major path) behave as before.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_onnx_gemma3 import build_tiny_gemma3

from slmforge.generate import SamplingParams, TorchGenerator
from slmforge.generate._int8_head import Int8Screen
from slmforge.generate._torch_head import RowVectorHead, attach_row_vector_head, exact_argmax_only
from slmforge.generate._torch_packed import PackedLinear, attach_packed_layers, packing_available

from conftest import TINY, build_peaky_model, build_tiny_tokenizer

PROMPTS = ["The garden was", "Bread is", "hello", "The river flows"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    yield


@pytest.fixture(scope="module", autouse=True, params=["int8", "bf16"])
def screen(request) -> str:
    """Every test with the int8 screen (where oneDNN's int8 product is exact here) and with bf16."""
    if request.param == "int8" and Int8Screen.build(torch.zeros(8, 64), torch.ones(1, 64)) is None:
        pytest.skip("no exact oneDNN int8 product in this torch build")
    with pytest.MonkeyPatch.context() as patch:
        if request.param == "bf16":
            patch.setattr(Int8Screen, "build", classmethod(lambda cls, weight, rows: None))
        yield request.param


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def model_dir(request, tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp(f"head-{request.param}")
    tok = build_tiny_tokenizer(work, vocab_size=400)
    if request.param == "llama":
        return build_peaky_model(tok, work / "model", TINY)
    return build_tiny_gemma3(tok, work / "model")


@pytest.fixture(scope="module")
def gen(model_dir) -> TorchGenerator:
    return TorchGenerator.from_pretrained(model_dir, device="cpu")


def reference_texts(model_dir: Path, gen: TorchGenerator, new_tokens: int, prompts: list[str] = PROMPTS) -> list[str]:
    """``model.generate`` on a fresh copy of the model (row-major head, no twin), greedy, exactly ``new_tokens``."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    assert not isinstance(model.get_output_embeddings().__dict__.get("forward"), RowVectorHead)
    # The engine's own GenerationConfig (the model folder's generation_config.json holds a sampling profile).
    config = gen._generation_config(SamplingParams(max_new_tokens=new_tokens, ignore_eos=True))
    config.min_new_tokens = new_tokens  # transformers' own way to hold EOS back (the engine's is in place)
    texts = []
    for prompt in prompts:
        ids = torch.tensor([gen.encode(prompt)])
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
        texts.append(gen.tokenizer.decode(out[0, ids.shape[1]:].tolist(), skip_special_tokens=True))
    return texts


def test_greedy_tokens_equal_model_generate_with_the_certified_head(model_dir, gen):
    head = gen.model.get_output_embeddings()
    assert isinstance(head.__dict__.get("forward"), RowVectorHead)
    steps = head.forward.certified_steps
    params = SamplingParams(max_new_tokens=32, ignore_eos=True)
    got = [gen.complete(p, params)[0] for p in PROMPTS]
    assert head.forward.certified_steps - steps == 32 * len(PROMPTS)  # every step: generate keeps one position
    assert [c.tokens for c in got] == [32] * len(PROMPTS)
    assert [c.text for c in got] == reference_texts(model_dir, gen, 32)


def test_sampling_and_penalties_use_the_fp32_twin(gen):
    head = gen.model.get_output_embeddings()
    steps = head.forward.certified_steps
    gen.complete(PROMPTS[0], SamplingParams(max_new_tokens=6, temperature=0.8, seed=1))
    gen.complete(PROMPTS[1], SamplingParams(max_new_tokens=6, repetition_penalty=1.3))
    assert head.forward.certified_steps == steps
    assert head.forward._twin is not None  # the one-row decode steps went through the twin
    assert not head.forward._twin.is_contiguous() and torch.equal(head.forward._twin, head.weight)


def near_tie_head(seed: int) -> tuple[torch.nn.Linear, torch.Tensor]:
    """A head whose rows 0 and 1 differ by less than bf16 can tell apart, and 2 is far behind:
    a bf16 product alone picks the wrong one about half the time."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(300, 64, generator=gen) * 0.05
    x = torch.randn(64, generator=gen) * 3
    top = x / x.norm()
    weight[0] = top * 4
    weight[1] = top * 4 + torch.randn(64, generator=gen) * 1e-4
    weight[2] = top * 3.5
    head = torch.nn.Linear(64, 300, bias=False).requires_grad_(False)
    head.weight.data = weight
    return head, x.view(1, 1, 64)


def test_the_certified_argmax_is_the_fp32_argmax_where_bf16_alone_is_not(screen):
    bf16_wrong = 0
    for seed in range(40):
        head, x = near_tie_head(seed)
        exact = torch.nn.functional.linear(x, head.weight)
        plain = torch.nn.functional.linear(x.bfloat16(), head.weight.bfloat16()).float()
        bf16_wrong += int(plain.argmax() != exact.argmax())
        forward = RowVectorHead(head)
        with exact_argmax_only():
            got = forward(x)
        assert got.shape == exact.shape and int(got.argmax()) == int(exact.argmax())
        assert torch.allclose(got[0, 0, :2], exact[0, 0, :2], atol=1e-5)  # recomputed in fp32
        assert (forward._int8 is None) == (screen == "bf16")
        if screen == "bf16":
            bound = 2**-7.9 * x.norm() * head.weight.norm(dim=1) + 2**-7 * got.abs()  # the module's bound
            assert ((got - exact).abs() <= bound).all()  # the others: bf16, within it
        # EOS masked before min_new_tokens (transformers sets it to -inf): the argmax of the rest.
        eos = int(exact.argmax())
        with exact_argmax_only((eos,)):
            got = forward(x)
        got[..., eos] = -torch.inf
        masked = exact.clone()
        masked[..., eos] = -torch.inf
        assert int(got.argmax()) == int(masked.argmax())
    assert bf16_wrong > 0  # the case is a real test: bf16 alone would have failed it


def test_several_rows_get_the_fp32_argmax_of_each_and_outside_the_block_the_fp32_product():
    heads = [near_tie_head(seed) for seed in range(12)]
    head = heads[0][0]
    # Rows whose near-tie sits on rows 0/1 of this head, and rows that are just noise.
    rows = torch.cat([heads[0][1].view(1, 64) * s for s in (1.0, -1.0, 0.5)] + [torch.randn(5, 64) * 3])
    exact = torch.nn.functional.linear(rows, head.weight)
    forward = RowVectorHead(head)
    eos = int(exact[0].argmax())
    with exact_argmax_only((eos,)):
        got = forward(rows.view(8, 1, 64)).view(8, -1)
    assert torch.equal(got.argmax(-1), exact.argmax(-1))
    got[:, eos], exact[:, eos] = -torch.inf, -torch.inf  # EOS masked: the best of the others, per row
    assert torch.equal(got.argmax(-1), exact.argmax(-1))
    assert torch.equal(forward(rows), torch.nn.functional.linear(rows, head.weight))  # outside: fp32 as it was


def test_several_prompts_at_once_match_one_at_a_time(gen):
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    alone = [gen.complete(p, params)[0].text for p in PROMPTS]
    assert [c[0].text for c in gen.complete_batch(PROMPTS, params)] == alone


def test_stop_strings_max_tokens_and_streaming_still_hold(gen):
    full = gen.complete(PROMPTS[0], SamplingParams(max_new_tokens=24, ignore_eos=True))[0]
    words = full.text.split()
    assert len(words) >= 3, full.text
    stop = words[2]
    cut = gen.complete(PROMPTS[0], SamplingParams(max_new_tokens=24, ignore_eos=True, stop=[stop]))[0]
    assert cut.finish_reason == "stop" and stop not in cut.text and full.text.startswith(cut.text)
    short = gen.complete(PROMPTS[0], SamplingParams(max_new_tokens=5, ignore_eos=True))[0]
    assert short.tokens == 5 and short.finish_reason == "length"
    streamed = "".join(gen.stream(PROMPTS[0], SamplingParams(max_new_tokens=24, ignore_eos=True)))
    assert streamed == full.text


def test_the_twin_follows_weights_changed_in_place():
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 40, bias=False)
    model = torch.nn.Module()
    model.get_output_embeddings = lambda: head
    assert attach_row_vector_head(model) and attach_row_vector_head(model)  # a second call keeps the first
    x = torch.randn(1, 1, 16)
    assert torch.allclose(head(x), x @ head.weight.detach().T, atol=1e-6)
    with torch.no_grad():
        head.weight.mul_(-2)
    assert torch.allclose(head(x), x @ head.weight.detach().T, atol=1e-6)
    rows = torch.randn(3, 16)  # several rows: the weight itself, no twin
    assert torch.equal(head(rows), torch.nn.functional.linear(rows, head.weight))


def test_heads_it_cannot_help_are_left_alone():
    model = torch.nn.Module()
    model.get_output_embeddings = lambda: None
    assert not attach_row_vector_head(model)
    wrapped = torch.nn.Sequential(torch.nn.Linear(4, 4))
    model.get_output_embeddings = lambda: wrapped
    assert not attach_row_vector_head(model) and "forward" not in wrapped.__dict__


def test_batched_greedy_rows_go_through_the_certified_head_with_the_same_tokens(model_dir, gen):
    import dataclasses

    from slmforge.serve._batch import BatchEngine, BatchRequest

    head = gen.model.get_output_embeddings().forward
    params = SamplingParams(max_new_tokens=20, ignore_eos=True)
    engine = BatchEngine(gen, max_batch_size=4)
    try:
        steps = head.certified_steps
        handles = [engine.submit(BatchRequest(gen.encode(p), dataclasses.replace(params))) for p in PROMPTS]
        texts = [h.wait()[0] for h in handles]
        assert head.certified_steps - steps >= 20 * len(PROMPTS)  # every row of every step
        assert texts == reference_texts(model_dir, gen, 20)
        # A sampled row in the batch: every row of those steps in fp32, as before.
        steps = head.certified_steps
        sampled = dataclasses.replace(params, temperature=0.9, seed=3)
        both = [engine.submit(BatchRequest(gen.encode(p), q)) for p, q in zip(PROMPTS[:2], (params, sampled))]
        [h.wait() for h in both]
        assert head.certified_steps - steps < 20
    finally:
        engine.stop()


@pytest.mark.skipif(not packing_available(), reason="no oneDNN in this torch build")
def test_every_layer_but_the_head_gets_a_packed_twin(gen):
    head = gen.model.get_output_embeddings()
    linears = [m for m in gen.model.modules() if type(m) is torch.nn.Linear and m is not head]
    assert linears and all(isinstance(m.__dict__.get("forward"), PackedLinear) for m in linears)
    assert attach_packed_layers(gen.model) == len(linears)  # a second call keeps the twins it finds
    assert "forward" not in head.__dict__ or not isinstance(head.forward, PackedLinear)
    used = [m.forward._packed is not None for m in linears]
    assert all(used)  # the earlier tests' decode steps went through them


@pytest.mark.skipif(not packing_available(), reason="no oneDNN in this torch build")
def test_the_packed_twin_follows_the_weight_and_leaves_gradients_to_it():
    torch.manual_seed(0)
    layer = torch.nn.Linear(48, 80)
    model = torch.nn.Sequential(layer)
    assert attach_packed_layers(model) == 1
    x = torch.randn(1, 1, 48)
    with torch.no_grad():
        assert torch.allclose(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias), atol=1e-5)
        layer.weight.mul_(-2)  # changed in place: packed again
        assert torch.allclose(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias), atol=1e-5)
        rows = torch.randn(3, 5, 48)
        assert torch.allclose(layer(rows), torch.nn.functional.linear(rows, layer.weight, layer.bias), atol=1e-5)
    layer(x).sum().backward()  # a gradient wanted: the weight itself, so it reaches the parameter
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
