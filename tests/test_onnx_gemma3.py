"""ONNX export of Gemma 3 as transformers 5 writes it, on a tiny random Gemma 3 (issue 15).

What the real Gemma 3 270M brings that the tiny Llama of test_onnx does not: RoPE parameters
nested by layer type (``{"full_attention": {...}, "sliding_attention": {...}}``, which
onnxruntime-genai 0.18's builder cannot read as such) and sliding-window layers, whose
windowed KV cache ONNX Runtime wants at least a window long, however short the sequence.
The tiny model has both: 4 layers (sliding, sliding, full, sliding), a window of 8 positions,
so prompts of 2-4 tokens + 32 new ones run past two windows (the kernel drops old positions)
and a 2-token prompt + 3 new ones stays under one. Its output layer is sharpened and never
picks a special or byte token, as in test_onnx, so greedy tokens have clear margins.

Measured (ORT 1.32, onnxruntime-genai 0.18, 4 prompts x 32 tokens): fp32 max-abs-diff ~2e-5
of logits up to ~19, every argmax the same -> < 1e-4, identical greedy. int4: top-1 agreement
0.63, max-abs-diff 7.8 with the input embedding float; 0.55 and 9.5 with it int4 too (as exported
since issue 15): this random model is far more sensitive to int4 than test_onnx's Llama (int8:
0.95), and rounding its Linear weights the same way in PyTorch (block 32, symmetric) agrees on
only 0.42 of the positions, so the export adds nothing -> top-1 >= 0.5 (chance: 1/400), max-abs-diff
at most 60% of the largest logit.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from slmforge.errors import ModelError
from slmforge.export.onnx import _builder_input, export_onnx, parity_report
from slmforge.generate import SamplingParams, TorchGenerator
from slmforge.generate._onnx import OnnxGenerator

from conftest import build_tiny_tokenizer

PROMPTS = ["The garden was", "Bread is", "hello", "The river flows"]
WINDOW = 8
LAYER_TYPES = ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"]
ROPE = {
    "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
    "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
}


def build_tiny_gemma3(tokenizer_dir: Path, folder: Path) -> Path:
    """A random Gemma 3 text model (~175k parameters) on the tiny tokenizer, saved as a model folder."""
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from slmforge.config import GenerateConfig
    from slmforge.model import save_model_folder
    from slmforge.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    config = Gemma3TextConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=len(LAYER_TYPES),
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        query_pre_attn_scalar=32,
        sliding_window=WINDOW,
        layer_types=LAYER_TYPES,
        rope_parameters=ROPE,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(config).eval()
    with torch.no_grad():
        head = model.get_output_embeddings().weight
        head.mul_(30)
        head[: 5 + 256] = 0  # 5 special tokens, then the 256 byte tokens
    save_model_folder(model, tok, folder, profiles=GenerateConfig().profiles, default_profile="factual")
    return folder


def greedy(max_new_tokens: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new_tokens)


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    yield


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("onnx-gemma3")


@pytest.fixture(scope="module")
def model_dir(workdir) -> Path:
    return build_tiny_gemma3(build_tiny_tokenizer(workdir, vocab_size=400), workdir / "model")


@pytest.fixture(scope="module")
def fp32_dir(workdir, model_dir) -> Path:
    return export_onnx(model_dir, workdir / "onnx-fp32").parent


@pytest.fixture(scope="module")
def torch_gen(model_dir) -> TorchGenerator:
    return TorchGenerator.from_pretrained(model_dir, device="cpu")


def test_the_tiny_model_is_written_as_transformers_5_writes_gemma_3(model_dir):
    config = json.loads((model_dir / "config.json").read_text())
    assert config["architectures"] == ["Gemma3ForCausalLM"] and config["layer_types"] == LAYER_TYPES
    assert config["rope_parameters"] == ROPE and config["sliding_window"] == WINDOW
    assert "rope_local_base_freq" not in config and "rope_theta" not in config


def test_fp32_export_keeps_the_sliding_layers_and_matches_transformers(model_dir, fp32_dir):
    decoder = json.loads((fp32_dir / "genai_config.json").read_text())["model"]["decoder"]
    assert decoder["sliding_window"]["window_size"] == WINDOW and decoder["sliding_window"]["layers"] == [0, 1, 3]
    graph = onnx.load(str(fp32_dir / "model.onnx"), load_external_data=False).graph
    windows = [
        next(onnx.helper.get_attribute_value(a) for a in n.attribute if a.name == "local_window_size")
        for n in graph.node
        if n.op_type == "GroupQueryAttention"
    ]
    assert windows == [WINDOW, WINDOW, -1, WINDOW]  # the full-attention layer sees everything
    report = parity_report(model_dir, fp32_dir, PROMPTS, max_new_tokens=32)
    print("tiny Gemma 3 fp32 parity:", report)
    assert report["positions"] > 4 * 32 and report["max_abs_logit"] > 5
    assert report["max_abs_diff"] < 1e-4
    assert report["top1_agreement"] == 1.0 and report["greedy_identical"] == len(PROMPTS)


def test_onnx_engine_generates_what_transformers_generates(fp32_dir, torch_gen):
    onnx_gen = OnnxGenerator(fp32_dir, threads=1)
    for prompt in PROMPTS:
        want = torch_gen.complete(prompt, greedy(16))
        assert want[0].tokens == 16 and want[0].text.strip()
        assert onnx_gen.complete(prompt, greedy(16)) == want, prompt
    # Under one window in all (2 + 3 positions): the cache is still a window long.
    short = onnx_gen.complete("hello", greedy(3))
    assert onnx_gen.count_tokens("hello") + 3 < WINDOW
    assert short == torch_gen.complete("hello", greedy(3)) and short[0].tokens == 3
    assert OnnxGenerator(fp32_dir, io_binding=False, threads=1).complete("hello", greedy(3)) == short
    assert OnnxGenerator(fp32_dir, io_binding=False, threads=1).complete(PROMPTS[0], greedy(16)) == torch_gen.complete(
        PROMPTS[0], greedy(16)
    )
    # Several rows decode together (n > 1): each row's logits are the single row's.
    ids = list(onnx_gen.tokenizer(PROMPTS[1])["input_ids"])
    follow = list(range(300, 330))
    one, two = onnx_gen.decode_logits(ids, follow), onnx_gen.decode_logits(ids, follow, rows=2)
    assert np.abs(two - one).max() < 1e-5


def test_int4_export_generates(workdir, model_dir):
    folder = export_onnx(model_dir, workdir / "onnx-int4", precision="int4").parent
    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
    quantized = [n for n in graph.node if n.op_type == "MatMulNBits"]
    assert len(quantized) == 4 * 5 + 1  # qkv (packed), o, gate, up, down per layer, and the output layer
    assert {onnx.helper.get_attribute_value(a) for n in quantized for a in n.attribute if a.name == "bits"} == {4}
    assert [n.op_type for n in graph.node].count("GatherBlockQuantized") == 1  # the input embedding, int4 too
    report = parity_report(model_dir, folder, PROMPTS, max_new_tokens=32)
    print("tiny Gemma 3 int4 parity:", report)
    assert report["top1_agreement"] >= 0.5 and report["max_abs_diff"] <= 0.6 * report["max_abs_logit"]
    for prompt in ("hello", PROMPTS[0]):
        out = OnnxGenerator(folder, threads=1).complete(prompt, greedy(12))
        assert out[0].tokens == 12 and out[0].text.strip()


def test_builder_input_flattens_rope_only_where_the_builder_needs_it(tmp_path, model_dir):
    flat = _builder_input(model_dir, tmp_path / "input")
    config = json.loads((flat / "config.json").read_text())
    assert config["rope_parameters"] == {
        "rope_type": "default",
        "rope_theta": 1_000_000.0,
        "rope_local_base_freq": 10_000.0,
    }
    assert (flat / "model.safetensors").resolve() == (model_dir / "model.safetensors").resolve()
    assert json.loads((model_dir / "config.json").read_text())["rope_parameters"] == ROPE  # untouched

    scaled = tmp_path / "scaled"
    scaled.mkdir()
    rope = {**ROPE, "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0}}
    (scaled / "config.json").write_text(json.dumps({**config, "rope_parameters": rope}))
    with pytest.raises(ModelError, match="applies one RoPE scaling to both kinds of layer"):
        _builder_input(scaled, tmp_path / "scaled-input")

    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(
        json.dumps({"architectures": ["LlamaForCausalLM"], "rope_parameters": {"rope_type": "default"}})
    )
    assert _builder_input(llama, tmp_path / "llama-input") == llama
