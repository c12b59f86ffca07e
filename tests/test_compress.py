"""Compression on a tiny pretrained model: every quantization method, the perplexity gate,
per-layer sensitivity and mixed-precision plans, reloading, and offloaded loading."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from slmforge.artifacts import read_manifest, verify_artifact
from slmforge.config import ProjectConfig
from slmforge.errors import ArtifactError, ConfigError, GateFailed, ModelError

TINY = {"preset": "custom", "hidden_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "intermediate_size": 128}
PTQ = ["int8_weight_only", "int8_dynamic", "int4_weight_only", "smoothquant"]
LINEARS = 14  # 2 layers x (q, k, v, o, gate, up, down); the tied embedding and head follow quantize.embeddings


def _cfg(root: Path) -> ProjectConfig:
    cfg = ProjectConfig().rooted_at(root)
    cfg.data.sources = ["python-docs"]
    cfg.data.python_docs.max_modules = 10
    cfg.data.split.val = 0.1
    cfg.tokenizer.vocab_size = 600
    cfg.tokenizer.domain_terms = []
    for k, v in TINY.items():
        setattr(cfg.model, k, v)
    t = cfg.train
    t.seq_len, t.batch_size, t.max_steps, t.lr, t.warmup_steps = 64, 8, 400, 1e-2, 10
    t.eval_every, t.eval_batches, t.save_every, t.precision = 100, 4, 1000, "fp32"
    cfg.quantize.group_size = 32
    cfg.quantize.calibration_samples = 16
    return cfg


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """On two shared cores, two torch threads per process are ~10x slower than one once
    anything else runs (measured: 181 vs 19 ms per step of this model)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """Data, tokenizer and a pretrained tiny model (runs/train), shared by this file."""
    from slmforge.data import run_data_stage
    from slmforge.tokenizer import train_tokenizer
    from slmforge.train import pretrain

    root = tmp_path_factory.mktemp("compress")
    cfg = _cfg(root)
    run_data_stage(cfg, progress=False)
    train_tokenizer(cfg, progress=False)
    pretrain(cfg, progress=False)
    return root


@pytest.fixture(scope="module")
def quantized(project) -> dict:
    """Each post-training method, run as the stage would (default output folders)."""
    from slmforge.compress import quantize

    made = {}
    for method in PTQ:
        cfg = _cfg(project)
        cfg.quantize.method = method
        cfg.quantize.max_ppl_increase_pct = 10.0
        made[method] = quantize(cfg, progress=False)
    return made


def _heldout_ppl(project: Path, model, tok) -> float:
    from slmforge.data import read_jsonl
    from slmforge.evaluate import perplexity

    texts = [r["text"] for r in read_jsonl(project / "runs" / "data" / "text" / "test.jsonl")]
    return perplexity(model, tok, texts, seq_len=64).ppl


# --------------------------------------------------------------------------- pure functions


def test_int4_and_ternary_packing_round_trips():
    from slmforge.model.quant_layers import pack_int4, pack_ternary, unpack_int4, unpack_ternary

    g = torch.Generator().manual_seed(0)
    for n in (1, 2, 7, 64, 129):
        v4 = torch.randint(-8, 8, (n,), generator=g, dtype=torch.int8)
        packed = pack_int4(v4)
        assert packed.dtype == torch.uint8 and packed.numel() == (n + 1) // 2
        assert torch.equal(unpack_int4(packed, n), v4)
        v3 = torch.randint(-1, 2, (n,), generator=g, dtype=torch.int8)
        packed = pack_ternary(v3)
        assert packed.numel() == (n + 3) // 4
        assert torch.equal(unpack_ternary(packed, n), v3)


@pytest.mark.parametrize(
    "fmt, max_rel_error",
    [("int8_weight_only", 0.01), ("int8_dynamic", 0.03), ("int4_weight_only", 0.15), ("ternary", 0.7)],
)
def test_each_layer_format_approximates_its_float_linear(fmt, max_rel_error):
    from slmforge.model.quant_layers import LAYER_FORMATS

    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48, bias=True)
    x = torch.randn(3, 5, 64)  # (B, T, in)
    layer = LAYER_FORMATS[fmt].from_linear(linear, group_size=32)
    with torch.no_grad():
        ref, got = linear(x), layer(x)
    assert got.shape == ref.shape == (3, 5, 48)
    rel = float((got - ref).norm() / ref.norm())
    assert 0 < rel < max_rel_error, rel


# --------------------------------------------------------------------------- the stage, per method


@pytest.mark.integration
@pytest.mark.parametrize("method", PTQ)
def test_quantize_records_size_and_perplexity_and_reloads(project, quantized, method):
    from slmforge.compress import load_quantized
    from slmforge.model.quant_layers import LAYER_FORMATS

    res = quantized[method]
    assert res.path == (project / "runs" / f"quantize-{method}").resolve()
    assert verify_artifact(res.path) == []
    m = read_manifest(res.path, "quantized-model")
    expected = {"quantized.safetensors", "quantize.json", "config.json", "generation_config.json", "tokenizer.json"}
    assert expected <= set(m.files)
    assert {p["kind"] for p in m.parents} == {"model", "dataset"}
    mt = m.metrics
    assert mt["weights_bytes"] == m.files["quantized.safetensors"]["size"]
    assert mt["compression_ratio"] == pytest.approx(mt["parent_fp32_bytes"] / mt["weights_bytes"], rel=1e-3)
    # int8 stores a quarter of the fp32 bytes, int4 an eighth (plus scales), the tied embedding and head included
    low, high = (6.5, 8.0) if method == "int4_weight_only" else (3.5, 4.0)
    assert low < mt["quantized_layers_ratio"] <= high
    assert mt["compression_ratio"] > (6.0 if method == "int4_weight_only" else 3.3)
    assert mt["layers"] == {method: LINEARS}
    assert mt["embeddings"] == ("int4_weight_only" if method == "int4_weight_only" else "int8_weight_only")
    limit = {"int4_weight_only": 5.0}.get(method, 1.0)
    assert abs(mt["ppl_delta_pct"]) < limit
    assert mt["ppl_delta_pct"] == pytest.approx(100 * (mt["ppl"] - mt["ppl_parent"]) / mt["ppl_parent"], abs=1e-3)
    assert mt["passing"] is True and mt["gates"][0].startswith("[pass] ppl_delta_pct <= 10.0")
    model, tok = load_quantized(res.path)
    kinds = {type(mod).__name__ for mod in model.modules()}
    assert LAYER_FORMATS["int8_dynamic" if method == "smoothquant" else method].__name__ in kinds
    assert {"Linear", "Embedding"}.isdisjoint(kinds) and "QuantizedEmbedding" in kinds  # nothing left in float
    assert _heldout_ppl(project, model, tok) == pytest.approx(mt["ppl"], abs=1e-3)


@pytest.mark.parametrize("method", ["int8_weight_only", "int8_dynamic", "int4_weight_only", "ternary", "mixed"])
def test_reloaded_quantized_model_gives_identical_logits(project, tmp_path, method):
    from slmforge.compress import load_quantized, quantize_model, save_quantized
    from slmforge.model import load_causal_lm
    from slmforge.model.quant_layers import TernaryLinear

    model, tok = load_causal_lm(project / "runs" / "train")
    if method == "ternary":  # normally made by the QAT stage; here straight from the float weights
        layers = {}
        for name in ("model.layers.0.mlp.up_proj", "model.layers.1.self_attn.q_proj"):
            layer = TernaryLinear.from_linear(model.get_submodule(name), group_size=32)
            model.set_submodule(name, layer)
            layers[name] = {"method": "ternary", **layer.describe()}
    elif method == "mixed":
        plan = {"model.layers.0": "int4_weight_only", "model.layers.0.mlp": "none",
                "model.layers.1.mlp.down_proj": "int8_dynamic"}
        layers = quantize_model(model, "int8_weight_only", group_size=32, plan=plan)
        assert "model.layers.0.mlp.up_proj" not in layers
        assert layers["model.layers.0.self_attn.q_proj"]["format"] == "int4_weight_only"
        assert layers["model.layers.1.mlp.down_proj"]["format"] == "int8_dynamic"
        assert layers["model.layers.1.mlp.up_proj"]["format"] == "int8_weight_only"
    else:
        layers = quantize_model(model, method, group_size=32)
    save_quantized(model, tok, tmp_path / "q", layers)
    reloaded, _ = load_quantized(tmp_path / "q")
    x = torch.randint(5, 590, (2, 40))
    with torch.no_grad():
        assert torch.equal(reloaded(x).logits, model(x).logits)


# --------------------------------------------------------------------------- gate, ternary


@pytest.mark.integration
def test_gate_refuses_a_ternary_model_without_enough_fine_tuning(project):
    from slmforge.compress import quantize

    cfg = _cfg(project)
    cfg.quantize.method = "ternary"
    cfg.quantize.ternary_steps = 1
    with pytest.raises(GateFailed, match="ppl_delta_pct <= 2.0"):
        quantize(cfg, progress=False)
    failed = read_manifest(project / "runs" / "quantize-ternary", "quantized-model").metrics
    assert failed["passing"] is False and failed["ppl_delta_pct"] > 2.0
    assert failed["gates"][0].startswith("[FAIL]")
    assert failed["layers"] == {"ternary": LINEARS} and failed["quantized_layers_ratio"] > 12

    cfg.quantize.ternary_steps = 60  # a real (if short) quantization-aware fine-tune recovers much of it
    cfg.quantize.max_ppl_increase_pct = 1000.0
    tuned = quantize(cfg, out=project / "runs" / "ternary-60", progress=False)
    assert tuned.metrics["qat_steps"] == 60
    assert tuned.metrics["ppl"] < failed["ppl"]
    assert {"log.jsonl", "loss.png"} <= set(read_manifest(tuned.path).files)


# --------------------------------------------------------------------------- SmoothQuant


@pytest.mark.integration
def test_smoothquant_beats_plain_w8a8_when_activations_have_outliers(project, tmp_path):
    """Scale two channels of a norm up 40x and their weight columns down 40x: the float model is
    unchanged, but per-token int8 activations now lose the other channels, unless smoothed."""
    from slmforge.compress import quantize
    from slmforge.model import load_causal_lm, save_model_folder

    model, tok = load_causal_lm(project / "runs" / "train")
    with torch.no_grad():
        for i in range(2):
            layer = model.model.layers[i]
            attn, mlp = layer.self_attn, layer.mlp
            for norm, linears in ((layer.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj]),
                                  (layer.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj])):
                norm.weight[[3, 17]] *= 40
                for lin in linears:
                    lin.weight[:, [3, 17]] /= 40
    save_model_folder(model, tok, tmp_path / "outliers")
    deltas = {}
    for method in ("int8_dynamic", "smoothquant"):
        cfg = _cfg(project)
        cfg.quantize.method = method
        cfg.quantize.max_ppl_increase_pct = 1000.0
        res = quantize(cfg, model=tmp_path / "outliers", out=tmp_path / method, progress=False)
        deltas[method] = res.metrics["ppl_delta_pct"]
        assert read_manifest(res.path).parents[0]["kind"] == "external-model"
    assert res.metrics["act_outlier_ratio_after"] < res.metrics["act_outlier_ratio_before"] / 3
    assert res.metrics["smoothing_float_drift"] < 1e-4
    assert deltas["smoothquant"] < deltas["int8_dynamic"] / 2, deltas


# --------------------------------------------------------------------------- sensitivity and plans


@pytest.mark.integration
def test_sensitivity_ranks_every_linear_and_its_plan_is_applied(project):
    from torch import nn

    from slmforge.compress import load_quantized, quantize, sensitivity

    cfg = _cfg(project)
    rows = sensitivity(cfg, method="int4_weight_only", progress=False)
    assert len(rows) == LINEARS and len({r["module"] for r in rows}) == LINEARS
    deltas = [r["ppl_delta_pct"] for r in rows]
    assert deltas == sorted(deltas, reverse=True)
    # A budget of half the predicted total: the most sensitive layers must stay float.
    cfg.quantize.max_ppl_increase_pct = round(sum(max(d, 0) for d in deltas) / 2, 6)
    rows = sensitivity(cfg, method="int4_weight_only", progress=False)
    folder = project / "runs" / "quantize-sensitivity"
    assert {"sensitivity.json", "sensitivity.png"} <= set(read_manifest(folder, "quantize-sensitivity").files)
    report = json.loads((folder / "sensitivity.json").read_text())
    plan = report["plan"]
    kept = [m for m, v in plan.items() if v == "none"]
    assert kept and kept == [r["module"] for r in rows[: len(kept)]]  # the most sensitive ones
    assert report["predicted_delta_pct"] <= cfg.quantize.max_ppl_increase_pct
    assert {r["module"]: r["plan"] for r in rows} == plan

    cfg.quantize.method = "int4_weight_only"
    cfg.quantize.plan = plan
    cfg.quantize.max_ppl_increase_pct = 10.0
    res = quantize(cfg, out=project / "runs" / "planned", progress=False)
    assert res.metrics["layers"] == {"none": len(kept), "int4_weight_only": LINEARS - len(kept)}
    model, _ = load_quantized(res.path)
    for name in plan:
        assert (type(model.get_submodule(name)) is nn.Linear) == (name in kept)


@pytest.mark.parametrize(
    "change, error, match",
    [
        ({"plan": {"model.layers.7": "int8_weight_only"}}, ConfigError, "matches no quantizable layer"),
        ({"plan": {"model.layers.0": "int3"}}, ConfigError, "is not a method"),
        ({"plan": {"lm_head": "int8_weight_only"}}, ConfigError, "output head follow quantize.embeddings"),
        ({"method": "int4_weight_only", "group_size": 48}, ConfigError, "use a divisor of 64"),
        ({"model": "runs/quantize-int8_weight_only"}, ArtifactError, "already quantized"),
        ({"model": "runs/nothing-here"}, ModelError, "nothing-here"),
    ],
)
def test_bad_settings_are_clear_errors_and_write_nothing(project, quantized, change, error, match):
    from slmforge.compress import quantize

    cfg = _cfg(project)
    for k, v in change.items():
        setattr(cfg.quantize, k, v)
    out = project / "runs" / "never"
    with pytest.raises(error, match=match):
        quantize(cfg, out=out, progress=False)
    assert not out.exists()


def test_sensitivity_needs_a_one_shot_method(project):
    from slmforge.compress import sensitivity

    with pytest.raises(ConfigError, match="one-shot method"):
        sensitivity(_cfg(project), method="smoothquant", progress=False)


def test_mixed_precision_plan_keeps_the_worst_layers_until_the_budget_holds():
    from slmforge.compress import propose_mixed_precision

    rows = [{"module": f"l{i}", "method": "int4_weight_only", "ppl_delta_pct": d}
            for i, d in enumerate([3.0, 1.5, 0.4, 0.3, -0.2])]
    assert propose_mixed_precision(rows, 10.0) == {f"l{i}": "int4_weight_only" for i in range(5)}
    plan = propose_mixed_precision(rows, 1.0)
    assert [m for m, v in plan.items() if v == "none"] == ["l0", "l1"]  # 0.4 + 0.3 left; the gain counts as 0
    assert list(propose_mixed_precision(rows, 0.0).values()).count("none") == 4


# --------------------------------------------------------------------------- offload


def test_offloaded_load_gives_the_same_logits(tmp_path):
    from slmforge.compress import load_offloaded
    from slmforge.config import ModelConfig
    from slmforge.model import build_model

    model = build_model(ModelConfig(**{**TINY, "num_layers": 4}), vocab_size=600)
    model.save_pretrained(tmp_path / "m")
    size = (tmp_path / "m" / "model.safetensors").stat().st_size
    x = torch.randint(0, 600, (2, 24))
    with torch.no_grad():
        ref = model(x).logits
    off = load_offloaded(tmp_path / "m", memory_bytes=size // 2, offload_folder=tmp_path / "offload")
    assert "disk" in set(off.hf_device_map.values())
    with torch.no_grad():
        torch.testing.assert_close(off(x).logits, ref, rtol=0, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["int8_weight_only", "int8_dynamic", "int4_weight_only", "ternary"])
def test_layer_formats_compute_on_cuda_as_on_cpu(fmt):
    from slmforge.model.quant_layers import LAYER_FORMATS

    torch.manual_seed(0)
    layer = LAYER_FORMATS[fmt].from_linear(torch.nn.Linear(64, 48, bias=True), group_size=32)
    for tokens in (1, 40):  # decoding (float path of the int8 matmul) and prefill (torch._int_mm)
        x = torch.randn(tokens, 64)
        with torch.no_grad():
            on_cpu = layer.to("cpu")(x)
            on_gpu = layer.to("cuda")(x.cuda()).cpu()
        torch.testing.assert_close(on_gpu, on_cpu, rtol=1e-4, atol=1e-4)


def test_quantized_folder_loads_through_the_generic_loader(quantized):
    """`slmforge generate` and `slmforge eval --model runs/quantize-...` load through load_causal_lm."""
    from slmforge.generate import SamplingParams, load_generator

    folder = quantized["int8_weight_only"].path
    gen = load_generator(folder)
    out = gen.complete("def parse(", SamplingParams(max_new_tokens=5))
    assert len(out) == 1 and out[0].tokens <= 5


def test_quantize_is_a_pipeline_stage(project):
    """`slmforge run` with quantize in project.stages runs it once, then finds it up to date."""
    from slmforge.pipeline import run_pipeline

    cfg = _cfg(project)
    cfg.project.stages = ["quantize"]
    cfg.quantize.method = "int8_weight_only"
    cfg.quantize.max_ppl_increase_pct = 10.0
    cfg.quantize.out = "runs/quantize-stage"
    first = run_pipeline(cfg)
    again = run_pipeline(cfg)
    assert [o.status for o in first] == ["ran"] and [o.status for o in again] == ["up to date"]
