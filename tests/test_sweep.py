"""slmforge sweep: two keys on a tiny model; the planted best is found, the smallest passing configuration
named, unchanged stages reused across points and on a rerun."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from slmforge.cli.main import app
from slmforge.config import ProjectConfig
from slmforge.errors import ConfigError
from slmforge.sweep import parse_gate, points, run_sweep

from conftest import tiny_pretrain_config


def _cfg(root: Path) -> ProjectConfig:
    cfg = tiny_pretrain_config(root, eval_every=15, save_every=15, warmup_steps=2, max_steps=15)
    cfg.project.stages = ["data", "tokenizer", "train"]
    return cfg


def test_points_and_gates():
    assert points({"a": [1, 2], "b": ["x", "y"]}) == [{"a": 1, "b": "x"}, {"a": 1, "b": "y"}, {"a": 2, "b": "x"},
                                                      {"a": 2, "b": "y"}]
    drawn = points({"a": [1, 2, 3], "b": [4, 5]}, "random", 3, seed=1)
    assert len(drawn) == 3 and len({json.dumps(p) for p in drawn}) == 3
    metric, op, threshold, sign = parse_gate("train.val_ppl <= 200")
    assert (metric, threshold, sign, op(150, threshold), op(250, threshold)) == ("train.val_ppl", 200, "<=", True,
                                                                                 False)
    for bad in ({}, {"a": []}):
        with pytest.raises(ConfigError, match="non-empty list"):
            points(bad)
    with pytest.raises(ConfigError, match="not <stage>.<metric>"):
        parse_gate("ppl is low")


def test_sweep_finds_the_planted_best_and_reuses_stages(tmp_path: Path, one_torch_thread):
    cfg = _cfg(tmp_path)
    space = {"train.lr": [1e-6, 3e-3], "model.num_layers": [1, 2]}
    result = run_sweep(cfg, space, metric="train.val_ppl", gate="train.val_ppl<=1e9", out=tmp_path / "sw")
    rows = result["points"]
    assert len(rows) == 4 and all(r["metric"] is not None for r in rows)
    assert result["best"]["overrides"]["train.lr"] == 3e-3  # 1e-6 barely moves from the random start
    # the data and the tokenizer were made once and shared; every point trained its own model
    assert [r["stages"]["data"] for r in rows] == ["ran", "reused", "reused", "reused"]
    assert [r["stages"]["tokenizer"] for r in rows] == ["ran", "reused", "reused", "reused"]
    assert all(r["stages"]["train"] == "ran" for r in rows)
    made = [p.name.split("-")[0] for p in (tmp_path / "sw" / "stages").iterdir()
            if not p.name.endswith(("-work", ".lock"))]
    assert sorted(made) == ["data", "tokenizer", "train", "train", "train", "train"]
    # the smallest passing: one layer has fewer parameters; among those, the better metric
    small = result["smallest_passing"]
    assert small["overrides"]["model.num_layers"] == 1 and small["size"] == min(r["size"] for r in rows)
    again = run_sweep(cfg, space, metric="train.val_ppl", out=tmp_path / "sw")  # resumes: nothing reruns
    assert all(s == "reused" for r in again["points"] for s in r["stages"].values())
    assert [r["metric"] for r in again["points"]] == [r["metric"] for r in rows]


def test_cli_sweep(tmp_path: Path, monkeypatch, one_torch_thread):
    monkeypatch.chdir(tmp_path)
    cfg = _cfg(tmp_path)
    from slmforge.config import dump_config

    (tmp_path / "slmforge.yaml").write_text(dump_config(cfg))
    r = CliRunner().invoke(app, ["sweep", "-g", "train.lr=[1e-6, 3e-3]", "--gate", "train.val_ppl<=1e9"])
    assert r.exit_code == 0, r.output
    assert "| 0.003 |" in r.stdout and "smallest meeting" in r.stdout
    assert (tmp_path / "runs" / "sweep" / "sweep.png").stat().st_size > 0
    r = CliRunner().invoke(app, ["sweep", "-g", "train.lr=0.1"])
    assert r.exit_code != 0 and "KEY=[v1, v2, ...]" in r.output
    r = CliRunner().invoke(app, ["sweep", "-g", "train.nope=[1, 2]"])
    assert isinstance(r.exception, ConfigError) and "nope" in str(r.exception)


def test_a_sweep_uses_the_projects_own_current_outputs(tmp_path: Path, one_torch_thread):
    """Stages `slmforge run` already made for the same settings are used where they are."""
    from slmforge.pipeline import run_pipeline

    cfg = _cfg(tmp_path)
    run_pipeline(cfg, until="tokenizer")
    result = run_sweep(cfg, {"train.lr": [3e-3]}, out=tmp_path / "sw")
    assert result["points"][0]["stages"] == {"data": "project", "tokenizer": "project", "train": "ran"}
    assert not any(p.name.startswith(("data-", "tokenizer-")) for p in (tmp_path / "sw" / "stages").iterdir())


def test_points_in_parallel_share_their_common_stages(tmp_path: Path):
    """Two points at once (two worker processes): the data and the tokenizer are made once, under a lock,
    and both points train."""
    cfg = _cfg(tmp_path)
    result = run_sweep(cfg, {"train.lr": [1e-3, 3e-3]}, out=tmp_path / "sw", jobs=2)
    stages = [r["stages"] for r in result["points"]]
    assert sorted(s["data"] for s in stages) == ["ran", "reused"]
    assert sorted(s["tokenizer"] for s in stages) == ["ran", "reused"]
    assert all(s["train"] == "ran" for s in stages) and all(r["metric"] is not None for r in result["points"])
    made = [p.name.split("-")[0] for p in (tmp_path / "sw" / "stages").iterdir()
            if not p.name.endswith(("-work", ".lock"))]
    assert sorted(made) == ["data", "tokenizer", "train", "train"]
