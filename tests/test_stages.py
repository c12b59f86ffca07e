"""The pipeline's stages: what each would write is pinned, so that a refactoring of the stage table
cannot make an existing project's finished stages look out of date.

The fingerprints below were computed by the stage table before it became one object per stage
(issue 11). A stage's fingerprint decides whether ``slmforge run`` skips it; if one of them
changes, every existing project re-runs that stage (and everything after it) once. Change a value
here only on purpose, and say so in the changelog.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import slmforge.artifacts as artifacts
from slmforge.artifacts import MANIFEST, MANIFEST_FORMAT
from slmforge.config import ProjectConfig

ALL_STAGES = ["data", "tokenizer", "train", "sft", "encoder", "quantize", "eval", "report"]
# The biomolecular recipes' stages (tests/test_bio_recipes.py runs them) and their artifact kinds.
BIO_STAGES = {"bio-data": "dataset", "bio-tokenizer": "tokenizer", "bio-sample": "molecule-samples",
              "bio-mlm": "masked-lm", "bio-property": "property-model"}

# Output folder (relative to the project), artifact kind and fingerprint of each stage, for the config
# of the ``project`` fixture, when every stage before it holds the output pinned here.
PINNED = {
    "data": ("runs/data", "dataset", "77fb38662f4554cdbed48610dd6b5751f5060551a83b680a896bf2435aa17f85"),
    "tokenizer": ("runs/tokenizer", "tokenizer", "3dad994ed384e2486f6795f2223f33a0f9191811891776e32438664bf7bbb7a1"),
    "train": ("runs/train", "model", "d0749764239a8e794846c922d377d91c1d03193ac5e317fbde56c5a7bc5823d2"),
    "sft": ("runs/sft", "adapter", "531859b9f7a605aec5515d9f0a6b9a52aa6e0f6f95102f80632e7068435670d8"),
    "encoder": ("runs/encoder-classification", "encoder", "0f0a9448b674d729511443fd7658de84d2a1bbc8db85f438c9a80d1b4ecc1f06"),
    "quantize": ("runs/quantize-int8_weight_only", "quantized-model", "2496b276a231f8546e4fd862eca200c91b152c0e67fa15fc6c995fd011f79fe8"),
    "eval": ("runs/eval", "evaluation", "d84d86c10576d887220a3716ce2d15743e8adc234c86cfeee57b695cabf7706c"),
    "report": ("runs/report", "report", "d69a04bddb9d65606cfa46a11f397934f92d5dd94bdbe1949058f18d75e5e283"),
}


def _manifest(folder: Path, kind: str, fingerprint: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MANIFEST).write_text(json.dumps({
        "format": MANIFEST_FORMAT, "kind": kind, "slmforge_version": "pinned", "command": [], "config": {},
        "parents": [], "files": {}, "metrics": {}, "created_at": "", "finished_at": "", "duration_s": 0.0,
        "fingerprint": fingerprint,
    }))


@pytest.fixture
def project(tmp_path, monkeypatch) -> ProjectConfig:
    """A project with every stage and one source file of fixed name, size and modification time.

    The project is rooted at the relative folder ``.`` (the test runs in tmp_path), so that paths
    that reach a stage's config (the sft base, the quantized and reported model) are the same on
    every machine; the version is fixed too."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(artifacts, "__version__", "0.0.0-pinned")
    (tmp_path / "corpus").mkdir()
    doc = tmp_path / "corpus" / "a.txt"
    doc.write_text("A document about gardens.\n")
    os.utime(doc, ns=(1_700_000_000_000_000_000, 1_700_000_000_000_000_000))
    cfg = ProjectConfig().rooted_at(Path("."))
    cfg.project.stages = list(ALL_STAGES)
    cfg.data.sources = ["corpus"]
    cfg.sft.method = "lora"
    return cfg


def _current(cfg: ProjectConfig) -> dict[str, bool]:
    from slmforge.pipeline import is_current

    return {name: is_current(cfg, name) for name in ALL_STAGES}


def test_each_stages_output_folder_and_fingerprint_are_pinned(project, tmp_path):
    assert _current(project) == dict.fromkeys(ALL_STAGES, False)
    for folder, kind, fingerprint in PINNED.values():
        _manifest(tmp_path / folder, kind, fingerprint)
    assert _current(project) == dict.fromkeys(ALL_STAGES, True)
    project.train.lr = 0.5  # the test can tell: a changed section makes its stage out of date
    assert [n for n, current in _current(project).items() if not current] == ["train"]


# --------------------------------------------------------------------------- the stage table


def test_every_stage_names_its_output_kind_and_functions_that_exist():
    import inspect

    from slmforge.pipeline import STAGES, Stage, _Deferred

    assert [n for n in STAGES if n not in BIO_STAGES] == ALL_STAGES and set(BIO_STAGES) <= set(STAGES)
    for name, stage in STAGES.items():
        assert isinstance(stage, Stage) and stage.name == name
        assert (PINNED[name][1] if name in PINNED else BIO_STAGES[name]) in stage.kinds
        for fn in (stage.plan, stage.make):
            if isinstance(fn, _Deferred):  # imported when called: check here that it resolves
                assert not fn.module.startswith("slmforge.cli"), fn
                fn = fn.resolve()
            params = inspect.signature(fn).parameters
            assert "cfg" in params, (name, fn)
        made = inspect.signature(stage.make.resolve()).parameters
        assert "command" in made and ("log" in made) == stage.logs, name


def test_output_folders_follow_each_sections_out_key(project, tmp_path):
    from slmforge.artifacts import output_dir
    from slmforge.pipeline import STAGES

    for name in ALL_STAGES:
        assert STAGES[name].output(project) == Path(PINNED[name][0])
        getattr(project, name).out = f"elsewhere/{name}"
        assert output_dir(project, name) == Path("elsewhere") / name
    project.quantize.out = None
    project.quantize.method = "ternary"
    assert output_dir(project, "quantize") == Path("runs/quantize-ternary")


# --------------------------------------------------------------------------- the project's model


def test_default_model_is_the_sft_output_else_the_train_output(project, tmp_path):
    from slmforge.artifacts import default_model
    from slmforge.errors import ArtifactError, GenerateError

    with pytest.raises(ArtifactError, match=r"No model to quantize: neither runs/sft nor runs/train exists\. "
                                            r"Train one first \(`slmforge train`\), or set quantize\.model\."):
        default_model(project, "quantize", "set quantize.model")
    with pytest.raises(GenerateError, match="No model to generate with"):
        default_model(project, "generate with", error=GenerateError)
    (tmp_path / "runs" / "train").mkdir(parents=True)
    assert default_model(project) == Path("runs/train")
    project.sft.out = "tuned"
    (tmp_path / "runs" / "sft").mkdir()  # not the sft stage's folder any more
    assert default_model(project) == Path("runs/train")
    (tmp_path / "tuned").mkdir()
    assert default_model(project) == Path("tuned")


def test_quantize_eval_and_report_plans_all_use_the_projects_model(project, tmp_path):
    from slmforge.pipeline import STAGES

    for folder, kind, fingerprint in PINNED.values():
        _manifest(tmp_path / folder, kind, fingerprint)
    project.project.stages.remove("sft")  # the report once ignored an sft output outside project.stages
    for name in ("quantize", "eval", "report"):
        parents = STAGES[name].plan(project).parents
        assert parents[0]["fingerprint"] == PINNED["sft"][2], name


# --------------------------------------------------------------------------- data.out


def test_a_moved_dataset_is_found_by_the_tokenizer_and_training(project, tmp_path):
    from slmforge.pipeline import STAGES

    _manifest(tmp_path / "runs" / "tokenizer", "tokenizer", "fingerprint-of-tokenizer")
    _manifest(tmp_path / "datasets" / "v2", "dataset", "fingerprint-of-v2")
    project.data.out = "datasets/v2"
    project.sft.base = "runs/tokenizer"  # any folder with a manifest: sft needs a base model to plan
    for name in ("tokenizer", "train", "sft", "encoder"):
        parents = STAGES[name].plan(project).parents
        dataset = next(p for p in parents if p["kind"] == "dataset")
        assert dataset["fingerprint"] == "fingerprint-of-v2", name


def test_the_tokenizer_trains_on_a_moved_dataset(tmp_path):
    from slmforge.artifacts import ArtifactWriter, read_manifest
    from slmforge.tokenizer import train_tokenizer

    cfg = ProjectConfig().rooted_at(tmp_path)
    cfg.data.out = "datasets/v2"
    cfg.tokenizer.vocab_size = 300
    words = "garden lighthouse bread river train museum honey orchestra".split()
    with ArtifactWriter(tmp_path / "datasets" / "v2", kind="dataset", command=["test"]) as w:
        (w.path / "text").mkdir()
        for split, n in (("train", 40), ("val", 4), ("test", 2)):
            lines = [json.dumps({"id": f"{split}-{i}", "text": " ".join(words[(i + j) % 8] for j in range(30))})
                     for i in range(n)]
            (w.path / "text" / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    res = train_tokenizer(cfg, command=["test"], progress=False)
    assert res.path == (tmp_path / "runs" / "tokenizer").resolve()
    (parent,) = read_manifest(res.path).parents
    assert Path(parent["path"]) == (tmp_path / "datasets" / "v2").resolve()


# --------------------------------------------------------------------------- eval outside a project


def test_eval_run_with_a_named_model_outside_a_project(tmp_path, monkeypatch):
    """`slmforge eval run --model X` where no project model exists: once it failed after scoring,
    asking the (absent) project model whether X was it."""
    import slmforge.generate
    from slmforge.evaluate.run import run_eval
    from slmforge.generate import Completion

    class Echo:
        def complete_batch(self, prompts, params):
            return [[Completion("4", 1, "stop")] * params.n for _ in prompts]

    monkeypatch.setattr(slmforge.generate, "load_generator", lambda model, endpoints=None: Echo())
    (tmp_path / "items.jsonl").write_text(json.dumps({"id": "a", "input": "2+2", "target": "4"}) + "\n")
    suite = tmp_path / "sums.yaml"
    suite.write_text("name: sums\ntask: generate\ndata: {source: file, path: items.jsonl}\nmetrics: [exact_match]\n")
    cfg = ProjectConfig().rooted_at(tmp_path)
    res = run_eval(cfg, model=tmp_path / "elsewhere-model", suites=[str(suite)], use_cache=False, progress=False)
    assert res.metrics == {"sums.exact_match": 1.0}
    assert json.loads((tmp_path / "runs" / "eval" / "results.json").read_text())["model"] == str(
        tmp_path / "elsewhere-model")
