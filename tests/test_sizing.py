"""Sizing: doctor's fit rules on described machines, the decode bound, model shapes read from files, ROI
arithmetic against hand-computed cases, and both commands."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from slmforge.cli.main import app
from slmforge.errors import ConfigError
from slmforge.sizing import (
    Gpu,
    Hardware,
    ModelShape,
    RoiInputs,
    break_even_month,
    break_even_volume,
    fit,
    machines_needed,
    model_shape,
    monthly,
    predict_decode,
    preset_shape,
    roi_report,
)

GB = 1024**3
SEVEN_B = ModelShape("7b", 7_000_000_000, 32, 4096, 8, 128, 32000, "preset")


def test_fit_rules_on_described_machines():
    laptop = Hardware(cpu="laptop", cores=8, ram_bytes=16 * GB, ram_available_bytes=12 * GB, bandwidth_gbs=50.0)
    f = fit(SEVEN_B, laptop, context=4096)
    assert f.inference["fp32"]["device"] is None and f.inference["bf16"]["device"] is None  # 28 GB, 14 GB
    assert f.inference["int8"]["device"] == "cpu" and f.inference["int4"]["device"] == "cpu"
    assert f.training["full"]["device"] is None and f.training["qlora"]["device"] is None  # no CUDA: no QLoRA
    assert f.inference["int4"]["bytes"] == pytest.approx(7e9 * 4.5 / 8 + 2 * 32 * 8 * 128 * 4096 * 2 + 0.5 * GB)
    workstation = Hardware(ram_bytes=64 * GB, ram_available_bytes=60 * GB, gpus=[Gpu("RTX 4090", 24 * GB, "cuda")])
    w = fit(SEVEN_B, workstation, context=4096)
    assert w.inference["bf16"]["device"] == "gpu:RTX 4090" and w.training["qlora"]["device"] == "gpu:RTX 4090"
    assert w.training["full"]["device"] is None  # 16 bytes a parameter: 112 GB
    assert w.training["lora"]["device"] == "cpu"  # 14 GB of weights + activations: over 90% of the GPU, in RAM
    mac = Hardware(ram_bytes=32 * GB, ram_available_bytes=30 * GB, gpus=[Gpu("Apple GPU", 32 * GB, "mps")])
    assert fit(SEVEN_B, mac).training["qlora"]["device"] is None  # bitsandbytes needs CUDA
    assert fit(preset_shape("nano"), laptop).inference["fp32"]["device"] == "cpu"


def test_the_decode_bound_is_bandwidth_over_bytes_per_token():
    hw = Hardware(bandwidth_gbs=20.0)
    expected = 20e9 / (7e9 * 2 + 2 * 32 * 8 * 128 * 1024 * 2)  # bf16 weights + KV at half of 2048
    assert predict_decode(SEVEN_B, hw, "bf16", 2048) == pytest.approx(expected)
    assert predict_decode(SEVEN_B, Hardware(), "bf16") is None  # no bandwidth measured: no guess


def test_model_shapes_are_read_from_the_files(tmp_path: Path):
    from slmforge.model import load_causal_lm

    from conftest import TINY, build_peaky_model, build_tiny_tokenizer

    folder = build_peaky_model(build_tiny_tokenizer(tmp_path, 400), tmp_path / "m", TINY)
    model, _ = load_causal_lm(folder)
    shape = model_shape(folder)
    assert shape.params == sum(p.numel() for p in model.parameters())
    assert (shape.layers, shape.hidden, shape.vocab) == (2, 32, model.config.vocab_size)
    from slmforge.config import ModelConfig
    from slmforge.model import build_model

    micro = build_model(ModelConfig(preset="micro"), vocab_size=8192, special_ids={"bos": 1, "eos": 2, "pad": 0})
    assert preset_shape("micro").params == sum(p.numel() for p in micro.parameters())
    with pytest.raises(Exception, match="neither a model folder"):
        model_shape(tmp_path)


def test_roi_against_hand_computed_cases():
    r = RoiInputs(api_usd_per_1m_input=1.0, api_usd_per_1m_output=2.0, monthly_input_tokens=100e6,
                  monthly_output_tokens=50e6, growth_per_month=0.0, tokens_per_s=100.0, utilization=0.5,
                  prefill_speedup=10.0, hardware_usd=1000.0, hardware_life_months=36, power_watts=100.0,
                  usd_per_kwh=0.2, ops_usd_per_month=50.0)
    rows = monthly(r, 12)
    assert rows[0]["api_usd"] == pytest.approx(200.0)  # 100 x $1 + 50 x $2
    assert rows[0]["owned_usd"] == pytest.approx(1000 + 0.1 * 730 * 0.2 + 50)  # the machine, power, ops
    assert rows[1]["owned_usd"] == pytest.approx(14.6 + 50) and rows[0]["machines"] == 1
    assert break_even_month(rows) == 8  # 1000 + 64.6 m <= 200 m from m = 7.4
    per_machine = 1000 / 36 + 14.6 + 50
    assert break_even_volume(r) == pytest.approx(per_machine / ((2 * 1.0 + 2.0) / 1e6))
    # a machine is replaced when its life ends
    short = RoiInputs(**{**r.__dict__, "hardware_life_months": 3})
    assert monthly(short, 7)[-1]["cumulative_owned_usd"] == pytest.approx(3 * 1000 + 7 * 64.6)
    # growth needs more machines: capacity 131.4M output-token equivalents a month per machine
    assert machines_needed(r, 0, 131.4e6) == 1 and machines_needed(r, 0, 131.5e6) == 2
    grows = RoiInputs(**{**r.__dict__, "growth_per_month": 0.5})
    assert monthly(grows, 6)[-1]["machines"] == machines_needed(grows, 100e6 * 1.5**5, 50e6 * 1.5**5) > 1
    report = roi_report(r, years=3)
    assert set(report["horizons"]) == {"1y", "3y"} and report["break_even_month"] == 8
    assert report["sensitivity"]["hardware_usd"]["x2"] > 8 > report["sensitivity"]["hardware_usd"]["x0.5"]
    with pytest.raises(ConfigError, match="roi.utilization"):
        monthly(RoiInputs(utilization=1.5), 1)


def test_roi_and_doctor_commands(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bench.json").write_text(json.dumps({"tokens_per_s": 150.0}))
    r = CliRunner().invoke(app, ["roi", "--bench", "bench.json", "--years", "3", "--plot", "roi.png",
                                 "--set", "roi.monthly_output_tokens=1e8"])
    assert r.exit_code == 0, r.output
    assert "| 3y |" in r.stdout and "break-even" in r.stdout and (tmp_path / "roi.png").stat().st_size > 0
    data = json.loads(CliRunner().invoke(app, ["roi", "--set", "roi.tokens_per_s=50", "--json"]).stdout)
    assert data["inputs"]["tokens_per_s"] == 50 and len(data["months"]) == 60
    r = CliRunner().invoke(app, ["roi"])
    assert isinstance(r.exception, ConfigError) and "--bench" in str(r.exception)
    r = CliRunner().invoke(app, ["doctor", "--no-measure", "--json", "--preset", "nano,micro"])
    doc = json.loads(r.stdout)
    assert doc["hardware"]["cores"] >= 1 and doc["hardware"]["ram_bytes"] > 0
    assert [f["model"] for f in doc["fits"]] == ["nano", "micro"] and doc["decode_check"] is None


def test_edge_plans_pick_the_type_that_fits_and_estimate_speed():
    from slmforge.sizing.edge import DEVICES, EFFICIENCY, GGUF_BYTES, plan

    one_b = ModelShape("1b", 1_100_000_000, 22, 2048, 4, 64, 32000, "preset")
    phone = plan(one_b, "iphone-15", context=2048)  # Q8_0: 1.2 GB + KV + runtime, under 80% of 3 GB
    assert phone.gguf_type == "Q8_0" and phone.fits["Q4_0"]
    per_token = 1.1e9 * GGUF_BYTES["Q8_0"] + one_b.kv_bytes(1024)
    assert phone.decode_tokens_per_s == pytest.approx(EFFICIENCY * DEVICES["iphone-15"].bandwidth_gbs * 1e9 / per_token)
    three_b = ModelShape("3b", 3_000_000_000, 28, 3072, 8, 128, 32000, "preset")
    assert plan(three_b, "iphone-15").gguf_type == "Q4_0"  # Q8_0 (3.2 GB) does not fit; Q4_0 (1.7 GB) does
    assert plan(three_b, "raspberry-pi-5").gguf_type == "Q8_0"
    none = plan(SEVEN_B, "iphone-15", context=8192)
    assert none.gguf_type is None and none.decode_tokens_per_s is None and "smaller model" in none.reason
    assert "upper bound" in plan(preset_shape("nano"), "android-8gb").reason  # cache-resident weights
    with pytest.raises(ConfigError, match="Unknown edge target 'toaster'"):
        plan(one_b, "toaster")


def test_export_edge_writes_a_bundle_llama_cpp_loads(tmp_path: Path, monkeypatch):
    from slmforge.generate import LlamaCppGenerator, SamplingParams

    from conftest import TINY, build_peaky_model, build_tiny_tokenizer

    folder = build_peaky_model(build_tiny_tokenizer(tmp_path, 400), tmp_path / "m", TINY)
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(app, ["export", "edge", "--target", "raspberry-pi-5", "-m", str(folder), "--out", "pi"])
    assert r.exit_code == 0, r.output
    record = json.loads((tmp_path / "pi" / "edge.json").read_text())
    assert record["gguf_type"] == "Q8_0" and (tmp_path / "pi" / record["gguf"]).stat().st_size == record["gguf_bytes"]
    assert 'llama-cli -m "$MODEL" -c 2048 -t 4' in (tmp_path / "pi" / "run.sh").read_text()
    gen = LlamaCppGenerator(tmp_path / "pi" / record["gguf"], n_threads=1)
    assert gen.complete("The garden", SamplingParams(max_new_tokens=4))[0].tokens > 0
    r = CliRunner().invoke(app, ["export", "edge", "-m", str(folder)])
    assert isinstance(r.exception, ConfigError) and "--target" in str(r.exception)
