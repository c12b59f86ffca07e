"""Issue 14: adapting a pretrained base. Continued pretraining of ``model.base`` with its own tokenizer
(no tokenizer artifact), a BOS at the start of every packed window for the models that need one (Gemma),
and the perplexity suite on a .gguf file (read through transformers)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from slmforge.artifacts import read_manifest
from slmforge.tokenizer.packing import PackedTokens, window_bos_id
from slmforge.train import pretrain

from conftest import tiny_pretrain_config


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    yield


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, object]:
    from slmforge.pipeline import run_pipeline

    root = tmp_path_factory.mktemp("adapt")
    cfg = tiny_pretrain_config(root, max_steps=40, eval_every=20, lr=3e-3)
    cfg.project.stages = ["data", "tokenizer", "train"]
    run_pipeline(cfg)
    return root, cfg


def test_continued_pretraining_starts_from_the_base_with_its_tokenizer(trained):
    root, cfg = trained
    base = root / "runs" / "train"
    base_log = [json.loads(x) for x in (base / "log.jsonl").read_text().splitlines()]
    shutil.rmtree(root / "runs" / "tokenizer")  # the base brings its own tokenizer
    cont = cfg.model_copy(deep=True)
    cont.model.base = "runs/train"
    cont.train.out, cont.train.max_steps, cont.train.lr = "runs/continued", 10, 1e-3
    result = pretrain(cont, progress=False)
    manifest = read_manifest(result.path)
    assert [p["kind"] for p in manifest.parents] == ["dataset", "model"]
    assert manifest.parents[1]["path"] == str(base.resolve())
    assert (result.path / "tokenizer.json").read_text() == (base / "tokenizer.json").read_text()
    log = [json.loads(x) for x in (result.path / "log.jsonl").read_text().splitlines()]
    fresh_loss = base_log[0]["loss"]  # a random model's first step: about ln(vocab)
    assert log[0]["loss"] < fresh_loss - 0.5, (log[0]["loss"], fresh_loss)  # it starts where the base was
    assert manifest.metrics["params"] == read_manifest(base).metrics["params"]


def test_packed_windows_can_start_with_bos():
    stream = np.arange(1, 12, dtype=np.int32)
    plain = PackedTokens(stream, 4)
    assert plain.chunks.tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]]
    with_bos = PackedTokens(stream, 4, window_bos=0)
    assert with_bos.chunks.tolist() == [[0, 1, 2, 3], [0, 4, 5, 6], [0, 7, 8, 9]]
    tok = SimpleNamespace(bos_token_id=2)
    assert window_bos_id(SimpleNamespace(config=SimpleNamespace(model_type="gemma3_text")), tok) == 2
    assert window_bos_id(SimpleNamespace(config=SimpleNamespace(model_type="llama")), tok) is None


def test_perplexity_suite_reads_a_gguf_through_transformers(trained, tmp_path):
    from slmforge.evaluate.run import evaluate_suites
    from slmforge.export.gguf import export_gguf
    from slmforge.generate import load_generator

    root, cfg = trained
    model = root / "runs" / "train"
    gguf = export_gguf(model, tmp_path / "m.gguf", type="F32")
    ours = evaluate_suites(load_generator(str(model)), str(model), ["perplexity"], cfg, use_cache=False)
    theirs = evaluate_suites(load_generator(str(gguf)), str(gguf), ["perplexity"], cfg, use_cache=False)
    assert theirs["perplexity"].metrics["ppl"] == pytest.approx(ours["perplexity"].metrics["ppl"], rel=1e-3)


def test_continued_pretraining_can_trim_the_vocabulary_first(trained):
    from slmforge.artifacts import ArtifactWriter
    from slmforge.tokenizer import load_tokenizer

    from conftest import PROSE

    root, cfg = trained
    with ArtifactWriter(root / "runs" / "prose", kind="dataset", command=["test"]) as w:  # another domain
        (w.path / "text").mkdir()
        for split, n in (("train", 40), ("val", 8)):
            lines = [json.dumps({"id": f"{split}-{i}", "text": PROSE[i % 3]}) for i in range(n)]
            (w.path / "text" / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    cont = cfg.model_copy(deep=True)
    cont.model.base, cont.model.trim_vocab = "runs/train", True
    cont.train.data, cont.train.out, cont.train.max_steps, cont.train.lr = "runs/prose", "runs/continued-trimmed", 5, 1e-3
    result = pretrain(cont, progress=False)
    assert len(load_tokenizer(result.path)) < len(load_tokenizer(root / "runs" / "train"))
    work = [p for p in (root / "runs" / "continued-trimmed-work").iterdir() if p.name.startswith("trimmed-base-")]
    assert len(work) == 1 and read_manifest(work[0]).metrics["vocab_after"] == len(load_tokenizer(result.path))
    again = pretrain(cont, progress=False)  # the trimmed base is found, not made again
    assert again.path == result.path
    assert len([p for p in work[0].parent.iterdir() if p.name.startswith("trimmed-base-")]) == 1


def test_the_adapt_recipe_runs_end_to_end_on_a_small_base(trained, tmp_path, monkeypatch):
    """`slmforge quickstart --recipe adapt`, with a tiny base in Gemma's place: trims, continues pretraining,
    and evaluates against the untrimmed base."""
    from typer.testing import CliRunner

    from slmforge.cli.main import app
    from slmforge.config import load_config

    root, _ = trained
    base = str(root / "runs" / "train")
    sets = [f"model.base={base}", f"eval.regression_vs={base}", "data.python_docs.max_modules=8", "train.max_steps=3",
            "train.max_minutes=null", "train.seq_len=64", "train.eval_every=3", "eval.limit=3", "train.precision=fp32",
            "sft.max_steps=2", "sft.max_minutes=null", "sft.seq_len=64", "sft.batch_size=2", "sft.precision=fp32"]
    monkeypatch.setenv("SLMFORGE_NO_PROGRESS", "1")
    r = CliRunner().invoke(app, ["quickstart", "--recipe", "adapt", "--out", str(tmp_path / "p"),
                                 *[x for s in sets for x in ("--set", s)]])
    assert r.exit_code == 0, r.output
    cfg = load_config(tmp_path / "p" / "slmforge.yaml")
    assert cfg.project.stages == ["data", "train", "sft", "eval"] and cfg.model.trim_vocab and cfg.model.base
    results = json.loads((tmp_path / "p" / "runs" / "eval" / "results.json").read_text())
    assert results["baseline"] is not None and "perplexity.ppl" in results["baseline"]
    assert "perplexity.ppl" in results["metrics"] and "report.md" in r.stdout


def test_an_unknown_offline_base_says_which_exist(tmp_path):
    from slmforge.errors import ModelError
    from slmforge.model.offline import offline_base

    with pytest.raises(ModelError, match="gemma-3-270m"):
        offline_base(tmp_path / "x", "llama-9000")


def test_compare_gives_a_template_less_base_its_fine_tunes_template(trained, tmp_path):
    """A GGUF of a pretrained base has no chat template: `eval compare BASE.gguf FINETUNE` evaluates it with
    the fine-tune's, and says so in the report."""
    from slmforge.evaluate.run import compare_models
    from slmforge.export.gguf import export_gguf

    root, cfg = trained
    model = root / "runs" / "train"
    bare = tmp_path / "bare"
    shutil.copytree(model, bare)
    (bare / "chat_template.jinja").unlink(missing_ok=True)
    tok_cfg = json.loads((bare / "tokenizer_config.json").read_text())
    tok_cfg.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    gguf = export_gguf(bare, tmp_path / "base.gguf", type="F32")
    result = compare_models(cfg, gguf, model, ["arithmetic"], tmp_path / "cmp", limit=3, progress=False)
    assert result.suites["arithmetic"]["n"] == 3
    data = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert data["note"] and "no chat template" in data["note"] and str(gguf) in data["note"]
    assert "no chat template" in (tmp_path / "cmp" / "report.md").read_text()
