"""The token embedding and the output head in the quantized formats (issue 15): a lookup
dequantizes only the rows it gathers, a tied head is the embedding's own quantized table, the
folders shrink to the issue's targets, reload bit for bit and generate through the torch engine
and the server's batching engine, and folders written with float embeddings still load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

from slmforge.config import ModelConfig
from slmforge.errors import ConfigError, ModelError

from conftest import build_peaky_model, build_tiny_tokenizer

# 600 tokens x 64 wide: the embedding is a third of the parameters, as in the quickstart model
WIDE = ModelConfig(preset="custom", hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128)
GROUP = 32
# the targets: the whole weights file against the fp32 model
TARGET = {"int8_weight_only": 0.30, "int4_weight_only": 0.18}


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    yield


def _model(tied: bool = True, seed: int = 0):
    from slmforge.model import build_model

    return build_model(WIDE.model_copy(update={"tie_embeddings": tied}), vocab_size=600, seed=seed).eval()


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    return build_tiny_tokenizer(tmp_path_factory.mktemp("qemb"), vocab_size=600)


@pytest.fixture(scope="module")
def peaky(tokenizer_dir, tmp_path_factory) -> Path:
    """A tied model with clear greedy margins, saved as a float folder."""
    return build_peaky_model(tokenizer_dir, tmp_path_factory.mktemp("peaky") / "model", WIDE)


def _quantized_folder(src: Path, out: Path, method: str, embeddings: str = "auto") -> Path:
    from slmforge.compress import quantize_model, save_quantized
    from slmforge.model import load_causal_lm

    model, tok = load_causal_lm(src)
    save_quantized(model, tok, out, quantize_model(model, method, group_size=GROUP, embeddings=embeddings))
    return out


# --------------------------------------------------------------------------- the layers


@pytest.mark.parametrize("fmt", ["int8_weight_only", "int8_dynamic", "int4_weight_only", "ternary"])
def test_a_lookup_gathers_exactly_the_rows_of_the_dequantized_table(fmt):
    from slmforge.model.quant_layers import LAYER_FORMATS, QuantizedEmbedding

    torch.manual_seed(0)
    emb = nn.Embedding(50, 64)
    q = QuantizedEmbedding.from_embedding(emb, fmt, group_size=GROUP)
    ids = torch.tensor([[3, 0, 49], [7, 7, 12]])  # (B, T)
    table = q.table
    dense = (table.dequantized_weight() if hasattr(table, "dequantized_weight")
             else table.qweight.float() * table.scale[:, None])  # (vocab, dim)
    with torch.no_grad():
        got = q(ids)
    assert got.shape == (2, 3, 64) and torch.equal(got, dense[ids])
    assert isinstance(table, LAYER_FORMATS[fmt]) and (q.num_embeddings, q.embedding_dim) == (50, 64)


@pytest.mark.parametrize("method, max_rel_error", [("int8_weight_only", 0.02), ("int4_weight_only", 0.2)])
def test_quantized_embedding_and_head_give_logits_close_to_fp32(method, max_rel_error):
    """Only the embedding and the head quantized (every linear kept float by the plan): the logits'
    relative error is what those two cost: about the rms of rounding random weights to 8 bits with a
    scale per token (1%) or to 4 bits with a scale per 32 values (9% per table, two tables)."""
    from slmforge.compress import quantize_model

    model = _model()
    x = torch.randint(0, 600, (2, 24))
    with torch.no_grad():
        ref = model(x).logits
        layers = quantize_model(model, method, group_size=GROUP, plan={"model.layers": "none"})
        got = model(x).logits
    assert set(layers) == {"model.embed_tokens", "lm_head"}
    assert model.lm_head is model.model.embed_tokens.table  # tied: one quantized table
    rel = float((got - ref).norm() / ref.norm())
    assert 0 < rel < max_rel_error, rel
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9


def test_gemma_style_scaled_embedding_keeps_its_scale():
    """Gemma multiplies the lookup by sqrt(hidden); the quantized embedding does the same."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from slmforge.compress import quantize_model

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=1, head_dim=16, sliding_window=8)
    model = Gemma3ForCausalLM(cfg).eval()
    x = torch.randint(0, 300, (1, 20))
    with torch.no_grad():
        ref = model(x).logits
        layers = quantize_model(model, "int8_weight_only", group_size=GROUP)
        got = model(x).logits
    assert layers["model.embed_tokens"]["embed_scale"] == pytest.approx(64**0.5)
    assert float((got - ref).norm() / ref.norm()) < 0.02


# --------------------------------------------------------------------------- folders


@pytest.mark.parametrize("method", ["int8_weight_only", "int4_weight_only"])
def test_folders_shrink_to_the_targets_and_a_tied_model_round_trips(tmp_path, method):
    from slmforge.compress import load_quantized, quantize_model, save_quantized

    tok = _tokenizer()
    sizes = {}
    for embeddings in ("auto", "none"):
        model = _model()
        fp32 = sum(p.numel() for p in model.parameters()) * 4  # the tied table once
        layers = quantize_model(model, method, group_size=GROUP, embeddings=embeddings)
        folder = tmp_path / embeddings
        sizes[embeddings] = save_quantized(model, tok, folder, layers).stat().st_size / fp32
        reloaded, _ = load_quantized(folder)
        x = torch.randint(0, 600, (2, 30))
        with torch.no_grad():
            assert torch.equal(reloaded(x).logits, model(x).logits)
    assert sizes["auto"] <= TARGET[method] < sizes["none"], sizes
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight  # the float folder ties as before
    meta = json.loads((tmp_path / "auto" / "quantize.json").read_text())["layers"]
    assert meta["lm_head"] == {"method": method, "format": "tied", "tied_to": "model.embed_tokens"}
    with safe_open(tmp_path / "auto" / "quantized.safetensors", "pt") as f:
        tables = [k for k in f.keys() if k.endswith("qweight") and ("embed" in k or "lm_head" in k)]
    assert len(tables) == 1  # the shared table is stored once
    shared, _ = load_quantized(tmp_path / "auto")
    assert shared.lm_head is shared.model.embed_tokens.table


def test_an_untied_head_is_quantized_as_a_linear_of_its_own(tmp_path):
    from slmforge.compress import load_quantized, quantize_model, save_quantized
    from slmforge.model.quant_layers import Int4WeightOnlyLinear, QuantizedEmbedding

    model = _model(tied=False)
    layers = quantize_model(model, "int4_weight_only", group_size=GROUP)
    assert layers["lm_head"]["format"] == "int4_weight_only"
    save_quantized(model, _tokenizer(), tmp_path / "q", layers)
    reloaded, _ = load_quantized(tmp_path / "q")
    assert isinstance(reloaded.lm_head, Int4WeightOnlyLinear)
    assert isinstance(reloaded.model.embed_tokens, QuantizedEmbedding)
    assert reloaded.lm_head is not reloaded.model.embed_tokens.table
    x = torch.randint(0, 600, (1, 16))
    with torch.no_grad():
        assert torch.equal(reloaded(x).logits, model(x).logits)


def test_a_folder_written_with_float_embeddings_still_loads(tmp_path):
    """The layout every folder had before embeddings were quantized: linear entries only, the tied
    embedding stored as a float tensor under one name."""
    from slmforge.compress import load_quantized, save_quantized
    from slmforge.compress._methods import assign_methods, convert

    model = _model()
    layers = convert(model, assign_methods(model, "int8_weight_only", {}, GROUP), GROUP)  # what quantize_model did
    save_quantized(model, _tokenizer(), tmp_path / "old", layers, extra={"method": "int8_weight_only"})
    assert all(info["format"] == "int8_weight_only" for info in json.loads(
        (tmp_path / "old" / "quantize.json").read_text())["layers"].values())
    reloaded, _ = load_quantized(tmp_path / "old")
    assert type(reloaded.model.embed_tokens) is nn.Embedding
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    x = torch.randint(0, 600, (2, 20))
    with torch.no_grad():
        assert torch.equal(reloaded(x).logits, model(x).logits)


@pytest.mark.parametrize("method", ["int8_weight_only", "int4_weight_only"])
def test_a_quantized_folder_generates_through_the_torch_and_batching_engines(peaky, tmp_path, method):
    """Clear margins: int8 keeps the float model's greedy tokens; int4 still writes 12 tokens, and the
    server's batching engine writes exactly what the torch engine does."""
    from slmforge.generate import SamplingParams, TorchGenerator, load_generator
    from slmforge.serve._batch import BatchEngine, BatchRequest

    folder = _quantized_folder(peaky, tmp_path / method, method)
    gen = load_generator(folder, device="cpu")
    assert isinstance(gen, TorchGenerator)
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    out = gen.complete("The garden was", params)[0]
    assert out.tokens == 12 and out.text.strip()
    if method == "int8_weight_only":
        assert out.text == load_generator(peaky, device="cpu").complete("The garden was", params)[0].text
    engine = BatchEngine(gen, max_batch_size=2)
    try:
        assert engine.vocab_size == len(gen.tokenizer)
        last = engine.vocab_size - 1  # the bias check reads the vocabulary from the quantized embedding
        text, fin, _ = engine.submit(BatchRequest(engine.encode("The garden was", True), params,
                                                  logit_bias={last: -1.0})).wait()
        assert (text, fin.completion_tokens) == (out.text, 12)
    finally:
        engine.stop()


# --------------------------------------------------------------------------- errors


def test_a_group_that_does_not_divide_the_embedding_width_is_a_clear_error():
    from slmforge.compress import quantize_model

    model = build_model_48()
    with pytest.raises(ConfigError, match="does not divide the embedding width 48"):
        quantize_model(model, "int8_weight_only", group_size=32, plan={"model.layers": "none"},
                       embeddings="int4_weight_only")
    assert type(model.model.embed_tokens) is nn.Embedding  # nothing was converted


def test_a_tied_head_without_its_embedding_is_a_clear_error(tmp_path):
    from slmforge.compress import load_quantized, quantize_model, save_quantized

    model = _model()
    layers = quantize_model(model, "int8_weight_only", group_size=GROUP)
    layers["lm_head"]["tied_to"] = "model.norm"
    save_quantized(model, _tokenizer(), tmp_path / "bad", layers)
    with pytest.raises(ModelError, match="lm_head is tied to 'model.norm', which is not a quantized embedding"):
        load_quantized(tmp_path / "bad")


def build_model_48():
    from slmforge.model import build_model

    cfg = WIDE.model_copy(update={"hidden_size": 48, "num_heads": 3, "num_kv_heads": 1})
    return build_model(cfg, vocab_size=600, seed=0)


def _tokenizer():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({f"w{i}": i for i in range(600)},
                                                                                 unk_token="w0")))


def test_the_fast_int4_dequantization_gives_the_same_numbers_as_unpacking():
    from slmforge.model.quant_layers import Int4WeightOnlyLinear, dequantize_groupwise, unpack_int4

    torch.manual_seed(0)
    layer = Int4WeightOnlyLinear.from_linear(nn.Linear(64, 40), group_size=GROUP)
    q = unpack_int4(layer.qweight, 64 * 40).view(40, 64)
    for dtype in (torch.float32, torch.bfloat16):
        assert torch.equal(layer.dequantized_weight(dtype), dequantize_groupwise(q, layer.scales, dtype))
