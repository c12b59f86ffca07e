"""Models and training on tiny models: estimates, pretraining, resume, SFT, LoRA."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from slmforge.artifacts import read_manifest, verify_artifact
from slmforge.config import ModelConfig, ProjectConfig
from slmforge.errors import ConfigError, ModelError, TrainError

EXE = Path(sys.executable).parent / "slmforge"
TINY = {"preset": "custom", "hidden_size": 32, "num_layers": 2, "num_heads": 2, "num_kv_heads": 1, "intermediate_size": 64}


def _cfg(root: Path) -> ProjectConfig:
    cfg = ProjectConfig().rooted_at(root)
    cfg.data.sources = ["python-docs"]
    cfg.data.python_docs.max_modules = 10
    cfg.data.split.val = 0.1
    cfg.tokenizer.vocab_size = 600
    cfg.tokenizer.domain_terms = []
    for k, v in TINY.items():
        setattr(cfg.model, k, v)
    for section in (cfg.train, cfg.sft):
        section.seq_len = 64
        section.batch_size = 4
        section.eval_every = 10
        section.eval_batches = 4
        section.save_every = 10
        section.warmup_steps = 5
        section.precision = "fp32"
    cfg.train.max_steps = 40
    cfg.sft.max_steps = 10
    cfg.sft.lora.r = 4
    return cfg


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A data + tokenizer project shared by the tests in this file."""
    from slmforge.data import run_data_stage
    from slmforge.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("proj")
    cfg = _cfg(root)
    run_data_stage(cfg, progress=False)
    train_tokenizer(cfg, progress=False)
    return root


@pytest.fixture(scope="module")
def pretrained(project):
    from slmforge.train import pretrain

    return pretrain(_cfg(project), progress=False)


# --------------------------------------------------------------------------- model


@pytest.mark.parametrize("preset", ["nano", "micro", "small"])
def test_estimate_equals_built_parameter_count(preset):
    from slmforge.model import build_model, estimate

    cfg = ModelConfig(preset=preset)
    assert estimate(cfg, 8192).params == sum(p.numel() for p in build_model(cfg, 8192).parameters())


@pytest.mark.parametrize(
    "overrides",
    [
        {"tie_embeddings": False, "activation": "gelu"},
        {"norm": "layernorm", "num_kv_heads": 4},
        {**TINY, "num_kv_heads": 2, "rope_theta": 500000.0},
    ],
)
def test_estimate_equals_built_parameter_count_free_config(overrides):
    from slmforge.model import build_model, estimate

    cfg = ModelConfig(preset="nano", **overrides) if "preset" not in overrides else ModelConfig(**overrides)
    assert estimate(cfg, 1000).params == sum(p.numel() for p in build_model(cfg, 1000).parameters())


def test_estimate_memory_scales_with_dtype():
    from slmforge.model import estimate

    e = estimate(ModelConfig(preset="micro"), 8192, seq_len=512, batch_size=4)
    assert e.weights_bytes["fp32"] == 2 * e.weights_bytes["bf16"] == 8 * e.weights_bytes["int4"]
    assert e.kv_cache_bytes["fp32"] == 2 * 8 * 192 // 6 * 2 * 512 * 4 * 4  # 2 (k,v) x layers x kv width x tokens x 4 B
    assert e.train_bytes["fp32"]["total"] > e.train_bytes["bf16"]["total"]


def test_bad_architecture_is_a_config_error():
    from slmforge.model import resolve_architecture

    with pytest.raises(ConfigError, match="divisible"):
        resolve_architecture(ModelConfig(preset="nano", hidden_size=66))
    with pytest.raises(ConfigError, match="must be set"):
        resolve_architecture(ModelConfig(preset="custom", hidden_size=64))


def test_load_errors_name_the_model(tmp_path, monkeypatch):
    from slmforge.model import load_causal_lm

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="Qwen/Qwen2.5-0.5B-Instruct.*HF_HUB_OFFLINE"):
        load_causal_lm("Qwen/Qwen2.5-0.5B-Instruct")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        load_causal_lm(tmp_path / "empty")
    with pytest.raises(ModelError, match="does not exist"):
        load_causal_lm(tmp_path / "missing.gguf")


# --------------------------------------------------------------------------- pretraining


def test_pretraining_reduces_loss_and_writes_a_model_folder(pretrained):
    m = read_manifest(pretrained.path, "model")
    assert verify_artifact(pretrained.path) == []
    assert {p["kind"] for p in m.parents} == {"dataset", "tokenizer"}
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json", "loss.png", "log.jsonl"):
        assert name in m.files
    log = [json.loads(line) for line in (pretrained.path / "log.jsonl").read_text().splitlines()]
    assert len(log) == 40
    first_val = next(r["val_loss"] for r in log if "val_loss" in r)
    assert log[-1]["val_loss"] < first_val - 0.3
    assert sum(r["loss"] for r in log[-5:]) / 5 < sum(r["loss"] for r in log[:5]) / 5 - 0.5
    assert m.metrics["val_ppl"] < m.metrics["unigram_val_ppl"] * 1.5
    gen = json.loads((pretrained.path / "generation_config.json").read_text())
    assert set(gen["slmforge_profiles"]) >= {"factual", "creative"}
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(pretrained.path)
    assert sum(p.numel() for p in model.parameters()) == m.metrics["params"]


def _train_cli(project: Path, out: str, extra: list[str] = ()) -> subprocess.Popen:
    sets = [
        "--set", "model.preset=custom", "--set", "model.hidden_size=32", "--set", "model.num_layers=2",
        "--set", "model.num_heads=2", "--set", "model.num_kv_heads=1", "--set", "model.intermediate_size=64",
        "--set", "train.seq_len=64", "--set", "train.batch_size=4", "--set", "train.max_steps=150",
        "--set", "train.save_every=10", "--set", "train.eval_every=50", "--set", "train.precision=fp32",
        "--set", "train.warmup_steps=5",
    ]
    return subprocess.Popen(
        [str(EXE), "train", "pretrain", *sets, *extra, "--out", out],
        cwd=project, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "SLMFORGE_NO_PROGRESS": "1"},
    )


def _wait_for_checkpoint(work: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if (work / "checkpoints").is_dir() and any(p.name.startswith("step-") for p in (work / "checkpoints").iterdir()):
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    raise AssertionError("no checkpoint appeared")


@pytest.fixture(scope="module")
def uninterrupted(project):
    proc = _train_cli(project, "runs/straight")
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    return load_file(str(project / "runs" / "straight" / "model.safetensors"))


@pytest.mark.integration
@pytest.mark.parametrize("how", ["kill9", "ctrl_c"])
def test_interrupted_training_resumes_to_the_same_weights(project, uninterrupted, how):
    out = f"runs/{how}"
    work = project / "runs" / f"{how}-work"
    proc = _train_cli(project, out)
    _wait_for_checkpoint(work, proc)
    os.kill(proc.pid, signal.SIGKILL if how == "kill9" else signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert not (project / out).exists()  # no complete-looking model folder
    steps = sorted(int(p.name.split("-")[1]) for p in (work / "checkpoints").iterdir() if p.name.startswith("step-"))
    assert steps and steps[-1] < 150
    if how == "ctrl_c":
        assert "Run the same command again to resume" in err
    again = _train_cli(project, out)
    _, err = again.communicate(timeout=600)
    assert again.returncode == 0, err
    assert "resuming from" in err and f"(step {steps[-1]})" in err
    resumed = load_file(str(project / out / "model.safetensors"))
    assert resumed.keys() == uninterrupted.keys()
    for name in resumed:
        torch.testing.assert_close(resumed[name], uninterrupted[name], rtol=0, atol=0)
    m = read_manifest(project / out)
    assert m.metrics["resumed_from_step"] == steps[-1]


def test_changed_config_does_not_resume_old_checkpoints(project):
    from slmforge.train import pretrain

    cfg = _cfg(project)
    cfg.train.max_steps = 10
    cfg.train.save_every = 5
    first = pretrain(cfg, out=project / "runs" / "cfgchange", progress=False)
    assert "resumed_from_step" not in first.metrics
    again = pretrain(cfg, out=project / "runs" / "cfgchange", progress=False)
    assert again.metrics["resumed_from_step"] == 10  # same settings: picks up the final checkpoint
    cfg.train.lr = 1e-3
    changed = pretrain(cfg, out=project / "runs" / "cfgchange", progress=False)
    assert "resumed_from_step" not in changed.metrics


def test_a_run_the_clock_stops_ends_with_its_learning_rate_annealed(project):
    """With max_minutes, the cosine decay follows the clock when it runs out before the steps: the last step
    of a run stopped by the clock has decayed to lr * min_lr_ratio, not to where max_steps would put it."""
    from slmforge.train import pretrain

    cfg = _cfg(project)
    cfg.train.max_steps, cfg.train.max_minutes, cfg.train.warmup_steps = 100_000, 0.02, 0
    cfg.train.eval_every = cfg.train.save_every = 100_000
    result = pretrain(cfg, out=project / "runs" / "clock", progress=False)
    assert result.metrics["stopped_early"] and result.metrics["steps"] < 100_000
    log = [json.loads(line) for line in (result.path / "log.jsonl").read_text().splitlines()]
    assert log[-1]["lr"] == pytest.approx(cfg.train.lr * cfg.train.min_lr_ratio)
    assert log[0]["lr"] > log[-1]["lr"]


def test_the_schedule_keeps_its_clock_through_a_checkpoint():
    """LambdaLR saves the schedule object's state (JSON in state.json): a resumed run's decay starts where it
    was, however little of its own minutes it has spent."""
    import torch

    from slmforge.config import LoopConfig
    from slmforge.train._loop import CosineSchedule

    loop = LoopConfig(max_steps=1000, warmup_steps=10, min_lr_ratio=0.1)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = CosineSchedule(loop)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    assert schedule(20) == pytest.approx(1.0, abs=1e-3)
    schedule.used = 0.5
    assert schedule(20) == pytest.approx(0.55) and schedule(900) < 0.55  # the later of steps and clock
    state = json.loads(json.dumps(scheduler.state_dict()))
    fresh = CosineSchedule(loop)
    torch.optim.lr_scheduler.LambdaLR(opt, fresh).load_state_dict(state)
    assert fresh.used == 0.5 and fresh(20) == pytest.approx(0.55)


def test_too_little_text_is_a_clear_error(project):
    from slmforge.train import pretrain

    cfg = _cfg(project)
    cfg.train.seq_len = 10_000_000
    with pytest.raises(TrainError, match="fewer than one sequence"):
        pretrain(cfg, out=project / "runs" / "never", progress=False)
    assert not (project / "runs" / "never").exists()


# --------------------------------------------------------------------------- fine-tuning


def test_sft_masks_everything_but_assistant_tokens(project):
    from slmforge.tokenizer import load_tokenizer
    from slmforge.train._data import ChatExamples

    tok = load_tokenizer(project / "runs" / "tokenizer")
    record = {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What does len do?"},
        {"role": "assistant", "content": "Return the number of items."},
    ]}
    ex = ChatExamples([record], tok, seq_len=512)
    ids, labels = ex.examples[0]
    trained = tok.decode(ids[labels != -100])
    assert trained == "Return the number of items.<|im_end|>"
    untrained = tok.decode(ids[labels == -100])
    assert "What does len do?" in untrained and "Be brief." in untrained and "Return" not in untrained
    batch = ex.batch([0, 0])
    assert batch["labels"].shape == batch["input_ids"].shape == (2, len(ids))


def test_sft_finds_assistant_tokens_without_generation_blocks(project):
    """Published templates (Gemma's turns, say) have no {% generation %} blocks: the assistant turns are
    found from the conversation rendered up to and through each one, and match the marked way."""
    from slmforge.tokenizer import load_tokenizer
    from slmforge.train._data import ChatExamples

    tok = load_tokenizer(project / "runs" / "tokenizer")
    record = {"messages": [
        {"role": "user", "content": "What does len do?"}, {"role": "assistant", "content": "Return the size."},
        {"role": "user", "content": "And abs?"}, {"role": "assistant", "content": "The absolute value."},
    ]}
    marked = ChatExamples([record], tok, seq_len=512).examples[0]
    tok.chat_template = tok.chat_template.replace("{% generation %}", "").replace("{%- generation %}", "") \
        .replace("{% endgeneration %}", "").replace("{%- endgeneration %}", "")
    assert "generation %}" not in tok.chat_template
    plain = ChatExamples([record], tok, seq_len=512).examples[0]
    trained = [tok.decode(ids[labels != -100]).strip() for ids, labels in (marked, plain)]
    assert trained[0] == "Return the size.<|im_end|>The absolute value.<|im_end|>"
    assert "".join(trained[1].split()) == "".join(trained[0].split())  # the tags' whitespace control aside
    untrained = tok.decode(plain[0][plain[1] == -100])
    assert "What does len do?" in untrained and "And abs?" in untrained and "Return" not in untrained


@pytest.fixture(scope="module")
def lora_adapters(project, pretrained):
    from slmforge.train import finetune

    made = {}
    for name, seed in (("alpha", 1), ("beta", 2)):
        cfg = _cfg(project)
        cfg.project.seed = seed
        cfg.sft.method = "lora"
        cfg.sft.adapter_name = name
        cfg.sft.lr = 5e-3
        made[name] = finetune(cfg, out=project / "runs" / f"sft-{name}", progress=False)
    return made


def test_lora_adapter_save_reload_merge_gives_matching_logits(project, pretrained, lora_adapters):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from slmforge.train import merge_adapter

    adapter = lora_adapters["alpha"]
    assert adapter.kind == "adapter"
    files = read_manifest(adapter.path, "adapter").files
    assert "adapter_config.json" in files and "adapter_model.safetensors" in files
    assert "model.safetensors" not in files  # only the adapter, not the base
    assert adapter.metrics["trainable_params"] < 0.5 * read_manifest(pretrained.path).metrics["params"]
    x = torch.randint(5, 500, (2, 24))
    base = AutoModelForCausalLM.from_pretrained(pretrained.path)
    with torch.no_grad():
        base_logits = base(x).logits
    reloaded = PeftModel.from_pretrained(base, adapter.path)
    with torch.no_grad():
        adapter_logits = reloaded(x).logits
    assert not torch.allclose(adapter_logits, base_logits, atol=1e-4)  # the adapter changed something
    merged_dir = merge_adapter(pretrained.path, adapter.path, project / "runs" / "merged")
    assert read_manifest(merged_dir, "model").parents[-1]["kind"] == "adapter"
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    with torch.no_grad():
        torch.testing.assert_close(merged(x).logits, adapter_logits, atol=1e-4, rtol=1e-4)


def test_several_adapters_over_one_base(pretrained, lora_adapters):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    x = torch.randint(5, 500, (1, 16))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(pretrained.path),
                                      lora_adapters["alpha"].path, adapter_name="alpha")
    model.load_adapter(lora_adapters["beta"].path, adapter_name="beta")
    outs = {}
    for name in ("alpha", "beta"):
        model.set_adapter(name)
        with torch.no_grad():
            outs[name] = model(x).logits
    assert not torch.allclose(outs["alpha"], outs["beta"], atol=1e-4)
    with model.disable_adapter(), torch.no_grad():
        plain = model(x).logits
    with torch.no_grad():
        torch.testing.assert_close(plain, AutoModelForCausalLM.from_pretrained(pretrained.path)(x).logits)


def test_full_sft_writes_a_model_and_lowers_loss(project, pretrained):
    from slmforge.train import finetune

    cfg = _cfg(project)
    cfg.sft.max_steps = 15
    res = finetune(cfg, progress=False)
    assert res.kind == "model"
    log = [json.loads(line) for line in (res.path / "log.jsonl").read_text().splitlines()]
    assert log[-1]["loss"] < log[0]["loss"]
    assert res.metrics["trainable_params"] == read_manifest(pretrained.path).metrics["params"]


def test_extended_tokenizer_starts_new_rows_at_their_names_words(pretrained):
    from transformers import AutoModelForCausalLM

    from slmforge.tokenizer import load_tokenizer
    from slmforge.tokenizer.fim import FIM_TOKENS
    from slmforge.train import _resize_embeddings

    model = AutoModelForCausalLM.from_pretrained(pretrained.path)
    tok = load_tokenizer(pretrained.path)
    old = model.get_input_embeddings().weight.detach().clone()
    words = [tok(f"fim {w}", add_special_tokens=False)["input_ids"] for w in ("prefix", "suffix", "middle")]
    tok.add_special_tokens({"additional_special_tokens": [*FIM_TOKENS, "<|%%|>"]})
    info = _resize_embeddings(model, tok)
    assert info["embeddings_resized"] == {"from": old.shape[0], "to": old.shape[0] + 4}
    new = model.get_input_embeddings().weight.detach()
    torch.testing.assert_close(new[: old.shape[0]], old)
    sentinels = new[old.shape[0] : old.shape[0] + 3]
    for row, ids in zip(sentinels, words):
        torch.testing.assert_close(row, old[ids].mean(dim=0))
    distances = torch.cdist(sentinels, sentinels)
    assert distances[~torch.eye(3, dtype=torch.bool)].min() > 0.1 * old.norm(dim=1).median()  # told apart
    torch.testing.assert_close(new[-1], old.mean(dim=0), atol=1e-3, rtol=0)  # no words in its name: the mean


def test_qlora_without_cuda_is_a_clear_error(project):
    from slmforge.train import finetune

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; the gpu test covers QLoRA")
    cfg = _cfg(project)
    cfg.sft.method = "qlora"
    with pytest.raises(TrainError, match="needs a CUDA GPU and the bitsandbytes package"):
        finetune(cfg, progress=False)


@pytest.mark.gpu
def test_qlora_on_cuda(project, pretrained):
    from slmforge.train import finetune

    cfg = _cfg(project)
    cfg.sft.method = "qlora"
    cfg.sft.device = "cuda"
    res = finetune(cfg, out=project / "runs" / "qlora", progress=False)
    assert res.kind == "adapter" and res.metrics["steps"] == cfg.sft.max_steps


def test_sft_with_an_extended_tokenizer_grows_the_model(project, pretrained):
    """tokenizer.method extend + sft.tokenizer: the new domain tokens get embedding rows and are trained."""
    from slmforge.tokenizer import train_tokenizer
    from slmforge.train import finetune

    cfg = _cfg(project)
    cfg.tokenizer.method = "extend"
    cfg.tokenizer.base = str(pretrained.path)
    cfg.tokenizer.domain_terms = ["zyxwvut", "qqqdomainword"]
    extended = train_tokenizer(cfg, out=project / "runs" / "tok-extended", progress=False)
    assert extended.vocab_size > 600
    cfg.sft.tokenizer = str(extended.path)
    cfg.sft.method = "lora"
    cfg.sft.max_steps = 3
    res = finetune(cfg, out=project / "runs" / "sft-extended", progress=False)
    assert res.metrics["embeddings_resized"]["to"] == extended.vocab_size
    assert any(p["kind"] == "tokenizer" for p in read_manifest(res.path).parents)
