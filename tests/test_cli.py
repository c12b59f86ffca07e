"""The command line, run as a user runs it: a subprocess of the installed console script."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

EXE = Path(sys.executable).parent / "slmforge"


def slm(*args: str, cwd: Path | None = None, ok: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(EXE), *args], cwd=cwd, capture_output=True, text=True, timeout=600)
    if ok:
        assert proc.returncode == 0, f"slmforge {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def test_help_lists_every_command():
    out = slm("--help").stdout
    for command in ("init", "config", "inspect", "data", "tokenizer", "model", "train", "generate", "chat", "run", "quickstart"):
        assert command in out
    assert "train" in slm("tokenizer", "--help").stdout
    assert slm("--version").stdout.startswith("slmforge ")


def test_init_and_config_show(tmp_path):
    slm("init", str(tmp_path / "proj"))
    shown = slm("config", "show", "-c", str(tmp_path / "proj" / "slmforge.yaml"), "--set", "data.split.val=0.25").stdout
    assert "val: 0.25" in shown and "python-docs" in shown
    again = slm("init", str(tmp_path / "proj"), ok=False)
    assert again.returncode == 2 and "already exists" in again.stderr


def test_config_error_is_one_message_not_a_traceback(tmp_path):
    f = tmp_path / "slmforge.yaml"
    f.write_text("data:\n  dedup:\n    treshold: 0.9\n")
    proc = slm("config", "show", "-c", str(f), ok=False)
    assert proc.returncode == 2
    assert "data.dedup.treshold" in proc.stderr and "line 3" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = slm("data", "-c", str(f), "--set", "data.formats=[text, poetry]", ok=False)
    assert proc.returncode == 2 and "data.formats.1" in proc.stderr and "'poetry'" in proc.stderr


@pytest.mark.integration
def test_data_tokenizer_run_and_skip(tmp_path, mixed_corpus):
    root, _ = mixed_corpus
    proj = tmp_path / "proj"
    slm("init", str(proj), "--template", "blank")
    cfg = proj / "slmforge.yaml"
    sets = ["--set", f"data.sources=[{root}]", "--set", "tokenizer.vocab_size=400", "--set", "tokenizer.min_frequency=1",
            "--set", "project.stages=[data, tokenizer]"]
    out = slm("data", "-c", str(cfg), *sets).stdout
    assert "kept" in out and "PII replaced" in out
    data_dir = proj / "runs" / "data"
    assert slm("inspect", str(data_dir)).returncode == 0

    slm("tokenizer", "train", "-c", str(cfg), *sets, "--set", "tokenizer.domain_terms=[lighthouse]")
    tok_dir = proj / "runs" / "tokenizer"
    table = slm("tokenizer", "analyze", str(tok_dir), "--data", str(data_dir), "--split", "train").stdout
    assert "fertility" in table
    stats = json.loads(slm("tokenizer", "analyze", str(tok_dir), "--text", str(root / "notes.txt"), "--json").stdout)
    assert stats[0]["tokens"] > 0 and stats[0]["fertility"] >= 1

    # run: everything is current, then a config change re-runs only what depends on it.
    run = slm("run", "-c", str(cfg), *sets, "--set", "tokenizer.domain_terms=[lighthouse]").stdout
    assert run.count("up to date") == 2
    run = slm("run", "-c", str(cfg), *sets, "--set", "tokenizer.domain_terms=[lighthouse, orchestra]").stdout
    assert "data       up to date" in run and "tokenizer  ran" in run
    # A changed source file re-runs the data stage and, through lineage, the tokenizer.
    (root / "notes.txt").write_text((root / "notes.txt").read_text() + "\nThe seeds arrived on Monday morning.\n")
    run = slm("run", "-c", str(cfg), *sets, "--set", "tokenizer.domain_terms=[lighthouse, orchestra]").stdout
    assert "data       ran" in run and "tokenizer  ran" in run
    run = slm("run", "-c", str(cfg), *sets, "--until", "data", "--force").stdout
    assert "data       ran" in run and "  tokenizer " not in run
    bad = slm("run", "-c", str(cfg), *sets, "--until", "deploy", ok=False)
    assert bad.returncode == 2 and "data, tokenizer" in bad.stderr


def test_stage_error_exit_code_and_message(tmp_path):
    proc = slm("data", "--set", "data.sources=[does-not-exist]", cwd=tmp_path, ok=False)
    assert proc.returncode == 1
    assert "does-not-exist" in proc.stderr and "Traceback" not in proc.stderr
    proc = slm("tokenizer", "train", "--data", str(tmp_path / "nothing"), cwd=tmp_path, ok=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr


@pytest.mark.integration
def test_quickstart_end_to_end(tmp_path):
    """`make demo` runs this on the full python-docs source with a micro model; here it is shrunk
    (30 modules, a nano model, a few dozen steps) so that it takes seconds."""
    proj = tmp_path / "qs"
    small = [
        "data.python_docs.max_modules=30", "tokenizer.vocab_size=2000", "model.preset=nano", "train.max_steps=30",
        "train.compile=false", "train.seq_len=64", "train.eval_every=10", "sft.max_steps=8", "sft.seq_len=256",
        "report.max_new_tokens=8", "report.heldout_questions=1", "eval.limit=4",
    ]
    sets = [arg for item in small for arg in ("--set", item)]
    out = slm("quickstart", "--out", str(proj), *sets).stdout
    for stage in ("data", "tokenizer", "train", "sft", "eval", "report"):
        assert f"{stage:<10} ran" in out
    assert "held-out perplexity" in out and "unigram baseline" in out and "slmforge chat --model" in out
    report = (proj / "runs" / "report" / "report.md").read_text()
    assert "Perplexity" in report and "Sample answers" in report and "pretraining_loss.png" in report
    assert "python-docs-qa.token_f1" in report  # the domain suite score
    assert (proj / "runs" / "report" / "report.html").read_text().startswith("<!doctype html>")
    m = json.loads((proj / "runs" / "report" / "report.json").read_text())
    assert m["metrics"]["ppl"] > 1 and m["metrics"]["unigram_ppl"] > 1
    assert {"factual", "creative"} == set(m["samples"][0]["answers"])
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(proj / "runs" / "tokenizer")
    assert len(tok) == 2000
    for term in ("asyncio", "dataclass", "coroutine"):
        assert len(tok.encode(" " + term, add_special_tokens=False)) == 1
    rerun = slm("quickstart", "--out", str(proj), *sets).stdout
    assert rerun.count("up to date") == 6
