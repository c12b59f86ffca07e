"""Data-parallel pretraining on CPU: two gloo processes (`slmforge train pretrain --nproc 2`, torchrun) follow
the one-process loss curve on the same global batch, and write one model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from slmforge.config import dump_config

from conftest import tiny_pretrain_config


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    from slmforge.data import run_data_stage
    from slmforge.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("ddp")
    cfg = tiny_pretrain_config(root, max_steps=12, eval_every=12, save_every=6, warmup_steps=2, lr=3e-3)
    run_data_stage(cfg, progress=False)
    train_tokenizer(cfg, progress=False)
    (root / "slmforge.yaml").write_text(dump_config(cfg))
    return root


def _train(root: Path, out: str, *extra: str) -> list[dict]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SLMFORGE_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "slmforge", "train", "pretrain", "-c", str(root / "slmforge.yaml"),
                        "--out", str(root / out), *extra], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return [json.loads(x) for x in (root / f"{out}-work" / "log.jsonl").read_text().splitlines()]


def test_two_gloo_processes_follow_the_one_process_loss_curve(project):
    one = _train(project, "one")
    two = _train(project, "two", "--nproc", "2")
    assert [r["step"] for r in two] == [r["step"] for r in one] == list(range(1, 13))
    for a, b in zip(one, two):
        # the same global batch, split in two; DDP averages the halves' gradients: float error only
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-4), (a, b)
        assert b["tokens"] == a["tokens"]
    assert two[-1]["val_loss"] == pytest.approx(one[-1]["val_loss"], rel=1e-4)
    manifest = json.loads((project / "two" / "manifest.json").read_text())
    assert manifest["kind"] == "model" and manifest["metrics"]["steps"] == 12
    assert manifest["metrics"]["processes"] == 2  # and the one-process run records none:
    assert "processes" not in json.loads((project / "one" / "manifest.json").read_text())["metrics"]
    ckpts = sorted(p.name for p in (project / "two-work" / "checkpoints").iterdir())
    assert ckpts and all(name.startswith("step-") for name in ckpts)  # one writer: no partial duplicates


def test_sft_runs_data_parallel_too(project):
    """`slmforge train sft --nproc 2`: a LoRA over the pretrained model in two gloo processes, one adapter
    written. The halves of a batch hold different numbers of answer tokens and each is averaged on its own,
    so the curve is close to the one-process curve, not equal to it."""
    if not (project / "one" / "manifest.json").exists():
        _train(project, "one")

    def sft(out: str, *extra: str) -> list[dict]:
        sets = ["--set", f"sft.base={project / 'one'}", "--set", "sft.method=lora", "--set", "sft.max_steps=6",
                "--set", "sft.batch_size=4", "--set", "sft.seq_len=96", "--set", "sft.eval_every=6",
                "--set", "sft.precision=fp32", "--set", "sft.lr=3e-3", "--set", "sft.warmup_steps=1"]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "SLMFORGE_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
        r = subprocess.run([sys.executable, "-m", "slmforge", "train", "sft", "-c", str(project / "slmforge.yaml"),
                            "--out", str(project / out), *sets, *extra], env=env, capture_output=True, text=True,
                           timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        return [json.loads(x) for x in (project / f"{out}-work" / "log.jsonl").read_text().splitlines()]

    one, two = sft("sft-one"), sft("sft-two", "--nproc", "2")
    assert [r["step"] for r in two] == [r["step"] for r in one] == list(range(1, 7))
    assert two[0]["loss"] == pytest.approx(one[0]["loss"], rel=0.01)
    assert two[-1]["val_loss"] == pytest.approx(one[-1]["val_loss"], rel=0.01)
    manifest = json.loads((project / "sft-two" / "manifest.json").read_text())
    assert manifest["kind"] == "adapter" and manifest["metrics"]["processes"] == 2
    assert (project / "sft-two" / "adapter_model.safetensors").is_file()


def test_a_killed_data_parallel_run_resumes_to_the_same_weights(project):
    """kill -9 of both processes after a checkpoint; the same command resumes from it and ends with the
    weights of an uninterrupted two-process run."""
    import signal
    import time

    import torch
    from safetensors.torch import load_file

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SLMFORGE_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    sets = ["--set", "train.max_steps=24", "--set", "train.save_every=6", "--set", "train.eval_every=24"]

    def start(out: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "slmforge", "train", "pretrain", "-c",
                                 str(project / "slmforge.yaml"), "--out", str(project / out), "--nproc", "2", *sets],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)

    reference = start("ddp-whole")
    assert reference.wait(timeout=600) == 0, reference.stderr.read()[-3000:] if reference.stderr else ""
    run = start("ddp-killed")
    checkpoints = project / "ddp-killed-work" / "checkpoints"
    deadline = time.monotonic() + 300
    while not (checkpoints.is_dir() and any(p.name.startswith("step-") for p in checkpoints.iterdir())):
        assert run.poll() is None and time.monotonic() < deadline, "no checkpoint before the run ended"
        time.sleep(0.2)
    os.killpg(run.pid, signal.SIGKILL)
    run.wait(timeout=60)
    assert not (project / "ddp-killed").exists()
    again = start("ddp-killed")
    _, err = again.communicate(timeout=600)
    assert again.returncode == 0, err[-3000:]
    manifest = json.loads((project / "ddp-killed" / "manifest.json").read_text())
    assert manifest["metrics"]["resumed_from_step"] >= 6 and manifest["metrics"]["processes"] == 2
    whole, resumed = (load_file(str(project / o / "model.safetensors")) for o in ("ddp-whole", "ddp-killed"))
    for name in whole:
        torch.testing.assert_close(resumed[name], whole[name], rtol=1e-5, atol=1e-6)
