"""`slmforge train --launcher accelerate`: the configs it writes load with accelerate's own loader for every
strategy; DDP and FSDP (torch FSDP2, gloo) on two CPU processes follow the one-process loss curve on the same
global batch; FSDP saves an ordinary Hugging Face folder; checkpoints resume across world sizes and strategies;
DeepSpeed runs where there is a GPU (marked gpu)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from slmforge.config import DistributedConfig, TrainConfig, dump_config

from conftest import tiny_pretrain_config

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "SLMFORGE_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}


@pytest.mark.parametrize(("strategy", "zero_stage", "offload", "precision"), [
    ("ddp", 2, False, "no"), ("ddp", 2, False, "bf16"), ("fsdp", 2, False, "bf16"), ("fsdp", 2, True, "no"),
    ("deepspeed", 1, False, "bf16"), ("deepspeed", 2, True, "fp16"), ("deepspeed", 3, True, "bf16"),
])
def test_generated_configs_load_with_accelerates_own_loader(tmp_path, strategy, zero_stage, offload, precision):
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    from slmforge.train.launch import launch_files

    section = TrainConfig(batch_size=8, grad_accum=2, grad_clip=0.5, distributed=DistributedConfig(
        strategy=strategy, zero_stage=zero_stage, offload=offload, mixed_precision=precision))
    loaded = load_config_from_file(str(launch_files(section, tmp_path, nproc=4)))
    assert loaded.num_processes == 4 and loaded.num_machines == 1 and loaded.main_process_port
    expected = {"ddp": DistributedType.MULTI_GPU, "fsdp": DistributedType.FSDP, "deepspeed": DistributedType.DEEPSPEED}
    assert loaded.distributed_type == expected[strategy]
    if strategy == "fsdp":
        assert loaded.fsdp_config["fsdp_version"] == 2 and loaded.fsdp_config["fsdp_offload_params"] is offload
        assert loaded.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"
    if strategy != "deepspeed":
        assert loaded.mixed_precision == precision and not (tmp_path / "deepspeed.json").exists()
        return
    ds = json.loads(Path(loaded.deepspeed_config["deepspeed_config_file"]).read_text())
    assert ds["train_micro_batch_size_per_gpu"] == 2 and ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == 16 and ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"]["stage"] == zero_stage
    assert ("offload_optimizer" in ds["zero_optimization"]) is offload
    assert ("offload_param" in ds["zero_optimization"]) is (offload and zero_stage == 3)
    assert ds["bf16"]["enabled"] is (precision == "bf16") and ds["fp16"]["enabled"] is (precision == "fp16")


def test_config_mistakes_are_refused(tmp_path):
    from slmforge.errors import ConfigError
    from slmforge.train.launch import launch_files

    with pytest.raises(ConfigError, match="fp16 needs distributed.strategy deepspeed"):
        launch_files(TrainConfig(distributed=DistributedConfig(strategy="fsdp", mixed_precision="fp16")), tmp_path)
    with pytest.raises(ConfigError, match="divide evenly over 3 processes"):
        launch_files(TrainConfig(batch_size=8), tmp_path, nproc=3)


def test_deepspeed_state_folders_go_with_their_checkpoints(tmp_path):
    from slmforge.train._distributed import prune_deepspeed_states

    for step in (4, 8, 12):
        (tmp_path / f"deepspeed-{step:06d}").mkdir()
    for step in (8, 12):  # keep_checkpoints 2: step-000004 is gone
        (tmp_path / f"step-{step:06d}").mkdir()
        (tmp_path / f"step-{step:06d}" / "state.json").write_text(json.dumps({"deepspeed_state": f"deepspeed-{step:06d}"}))
    prune_deepspeed_states(tmp_path)
    assert sorted(p.name for p in tmp_path.glob("deepspeed-*")) == ["deepspeed-000008", "deepspeed-000012"]


def test_print_config_from_the_command_line(tmp_path):
    from accelerate.commands.config.config_args import load_config_from_file

    (tmp_path / "slmforge.yaml").write_text(dump_config(tiny_pretrain_config(tmp_path)))
    r = subprocess.run([sys.executable, "-m", "slmforge", "train", "sft", "-c", str(tmp_path / "slmforge.yaml"),
                        "--launcher", "accelerate", "--print-config", "--nproc", "2",
                        "--set", "sft.distributed.strategy=deepspeed", "--set", "sft.distributed.zero_stage=3"],
                       env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert '"stage": 3' in r.stdout and "distributed_type: DEEPSPEED" in r.stdout
    launch = tmp_path / "runs" / "sft-work" / "launch"
    assert load_config_from_file(str(launch / "accelerate.yaml")).num_processes == 2
    assert not (tmp_path / "runs" / "sft").exists()  # printing trains nothing


# --------------------------------------------------------------------------- running under accelerate launch


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    from slmforge.data import run_data_stage
    from slmforge.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("accelerate")
    cfg = tiny_pretrain_config(root, max_steps=8, eval_every=8, save_every=4, keep_checkpoints=2, warmup_steps=2,
                               lr=3e-3)
    run_data_stage(cfg, progress=False)
    train_tokenizer(cfg, progress=False)
    (root / "slmforge.yaml").write_text(dump_config(cfg))
    return root


def _train(root: Path, out: str, *extra: str) -> list[dict]:
    r = subprocess.run([sys.executable, "-m", "slmforge", "train", "pretrain", "-c", str(root / "slmforge.yaml"),
                        "--out", str(root / out), *extra], env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return [json.loads(x) for x in (root / f"{out}-work" / "log.jsonl").read_text().splitlines()]


def _weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


@pytest.mark.integration
def test_ddp_and_fsdp_under_accelerate_follow_the_one_process_curve(project):
    """Tolerance: 1e-4 relative on every step's loss, 1e-4 absolute on the final weights. The same global
    batch, split in two; both strategies average the halves' gradients, so only the order of float sums
    differs."""
    import torch

    one = _train(project, "one")
    runs = {s: _train(project, s, "--launcher", "accelerate", "--nproc", "2", "--set",
                      f"train.distributed.strategy={s}") for s in ("ddp", "fsdp")}
    for strategy, log in runs.items():
        assert [r["step"] for r in log] == list(range(1, 9)), strategy
        for a, b in zip(one, log):
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-4), (strategy, a, b)
            assert b["tokens"] == a["tokens"]
        assert log[-1]["val_loss"] == pytest.approx(one[-1]["val_loss"], rel=1e-4)
        manifest = json.loads((project / strategy / "manifest.json").read_text())
        assert manifest["metrics"]["processes"] == 2 and manifest["metrics"]["strategy"] == strategy
    # FSDP gathered its shards: an ordinary Hugging Face folder with whole tensors, as the one-process run wrote
    config = json.loads((project / "fsdp" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    whole, sharded = _weights(project / "one"), _weights(project / "fsdp")
    assert sharded.keys() == whole.keys()
    for name in whole:
        torch.testing.assert_close(sharded[name], whole[name], rtol=1e-4, atol=1e-4)


@pytest.mark.integration
def test_checkpoints_resume_across_world_sizes_and_strategies(project):
    """A checkpoint holds whole tensors whoever wrote it: the one-process run's step-4 checkpoint resumed by two
    FSDP processes, and the FSDP run's resumed by one process, both end at the one-process run's weights (to
    1e-4); the FSDP run's resumed by two FSDP processes ends at the FSDP run's weights bit for bit."""
    import torch

    fsdp = ("--launcher", "accelerate", "--nproc", "2", "--set", "train.distributed.strategy=fsdp")
    if not (project / "one" / "manifest.json").exists():
        _train(project, "one")
    if not (project / "fsdp" / "manifest.json").exists():
        _train(project, "fsdp", *fsdp)
    for source, out, extra in (("one", "one-to-fsdp", fsdp), ("fsdp", "fsdp-to-one", ()),
                               ("fsdp", "fsdp-to-fsdp", fsdp)):
        ckpt = project / f"{out}-work" / "checkpoints" / "step-000004"
        shutil.copytree(project / f"{source}-work" / "checkpoints" / "step-000004", ckpt)
        log = _train(project, out, *extra)
        assert log[-1]["step"] == 8
        manifest = json.loads((project / out / "manifest.json").read_text())
        assert manifest["metrics"]["resumed_from_step"] == 4, out
        whole, resumed = _weights(project / "one"), _weights(project / out)
        for name in whole:
            torch.testing.assert_close(resumed[name], whole[name], rtol=1e-4, atol=1e-4)
        if out == "fsdp-to-fsdp":  # the same world size and strategy: bit for bit
            uninterrupted = _weights(project / "fsdp")
            assert all(torch.equal(resumed[n], uninterrupted[n]) for n in uninterrupted)


@pytest.mark.integration
def test_sft_lora_under_fsdp_matches_ddp(project):
    """`slmforge train sft --launcher accelerate` with FSDP: a LoRA over the pretrained model in two gloo
    processes ends at the adapter two DDP processes train (to 1e-5; the same split of every batch, so only
    the order of float sums differs), and writes an ordinary adapter folder."""
    import torch
    from safetensors.torch import load_file

    if not (project / "one" / "manifest.json").exists():
        _train(project, "one")
    sets = ["--set", f"sft.base={project / 'one'}", "--set", "sft.method=lora", "--set", "sft.max_steps=4",
            "--set", "sft.batch_size=4", "--set", "sft.seq_len=96", "--set", "sft.eval_every=4",
            "--set", "sft.precision=fp32", "--set", "sft.lr=3e-3", "--set", "sft.warmup_steps=1"]

    def sft(out: str, *extra: str) -> list[dict]:
        r = subprocess.run([sys.executable, "-m", "slmforge", "train", "sft", "-c", str(project / "slmforge.yaml"),
                            "--out", str(project / out), *sets, *extra], env=ENV, capture_output=True, text=True,
                           timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        return [json.loads(x) for x in (project / f"{out}-work" / "log.jsonl").read_text().splitlines()]

    ddp = sft("sft-ddp", "--nproc", "2")
    fsdp = sft("sft-fsdp", "--launcher", "accelerate", "--nproc", "2", "--set", "sft.distributed.strategy=fsdp")
    for a, b in zip(ddp, fsdp, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4), (a, b)
    manifest = json.loads((project / "sft-fsdp" / "manifest.json").read_text())
    assert manifest["kind"] == "adapter" and manifest["metrics"]["strategy"] == "fsdp"
    a, b = (load_file(str(project / o / "adapter_model.safetensors")) for o in ("sft-ddp", "sft-fsdp"))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="needs deepspeed")
def test_deepspeed_zero_trains_resumes_and_saves_an_ordinary_folder(project):
    """ZeRO-3 with bf16 on the GPUs there are (up to 2 processes): the run learns, its model folder loads with
    transformers, and the same command again resumes from DeepSpeed's checkpoint with nothing left to train;
    ZeRO-2 with the optimizer state offloaded to the CPU trains too."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from transformers import AutoModelForCausalLM

    nproc = str(min(2, torch.cuda.device_count()))
    zero3 = ("--launcher", "accelerate", "--nproc", nproc, "--set", "train.device=cuda", "--set",
             "train.distributed.strategy=deepspeed", "--set", "train.distributed.zero_stage=3",
             "--set", "train.distributed.mixed_precision=bf16")
    log = _train(project, "zero3", *zero3)
    assert log[-1]["step"] == 8 and log[-1]["loss"] < log[0]["loss"]
    AutoModelForCausalLM.from_pretrained(project / "zero3")
    _train(project, "zero3", *zero3)
    assert json.loads((project / "zero3" / "manifest.json").read_text())["metrics"]["resumed_from_step"] == 8
    offload = [a.replace("zero_stage=3", "zero_stage=2") for a in zero3] + ["--set", "train.distributed.offload=true"]
    log = _train(project, "zero2-offload", *offload)
    assert log[-1]["step"] == 8 and log[-1]["loss"] < log[0]["loss"]
    AutoModelForCausalLM.from_pretrained(project / "zero2-offload")
