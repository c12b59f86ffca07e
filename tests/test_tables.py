"""Extension points are tables, and the config's choices are those tables' keys.

A new engine, metric, quantization method, stage or export format is added in its table
(docs/ARCHITECTURE.md says where); these tests fail when the config's ``Literal`` (what a
project file may say) and the table (what the code can do) disagree, so neither is forgotten.
"""

from __future__ import annotations

import typing
from pathlib import Path

import pytest

from slmforge.config import ExportConfig, ProjectConfig, QuantizeConfig, Section, ServeModelConfig


def _choices(model: type[Section], field: str) -> list[str]:
    """The values a ``Literal`` field (or a list of one) allows, in the order the config lists them."""
    annotation = model.model_fields[field].annotation
    if typing.get_origin(annotation) is list:
        (annotation,) = typing.get_args(annotation)
    assert typing.get_origin(annotation) is typing.Literal, f"{model.__name__}.{field} is not a Literal"
    return list(typing.get_args(annotation))


# --------------------------------------------------------------------------- quantization methods


def test_quantize_methods_are_the_config_choices():
    from slmforge.compress import METHODS

    assert _choices(QuantizeConfig, "method") == list(METHODS)


def test_each_method_makes_a_known_layer_and_says_whether_it_is_grouped():
    import inspect

    from slmforge.compress import METHODS
    from slmforge.model.quant_layers import LAYER_FORMATS

    for name, method in METHODS.items():
        assert method.layer in LAYER_FORMATS, name
        takes_groups = "group_size" in inspect.signature(LAYER_FORMATS[method.layer].__init__).parameters
        assert method.grouped == takes_groups, f"{name}: grouped={method.grouped} but its layer format disagrees"
        assert method.one_shot == (method.prepare is None), f"{name}: a model-wide step makes a method not one-shot"


def test_embedding_choices_are_weight_only_methods_whose_layers_gather_rows():
    from slmforge.compress import METHODS
    from slmforge.model.quant_layers import LAYER_FORMATS, _QuantLinear

    named = [c for c in _choices(QuantizeConfig, "embeddings") if c not in ("auto", "none")]
    tables = {m.embedding for m in METHODS.values()} - {None} | {METHODS[c].layer for c in named}
    for fmt in tables:
        assert fmt in LAYER_FORMATS and LAYER_FORMATS[fmt].rows is not _QuantLinear.rows, fmt


def test_a_methods_plan_settings_reach_the_artifact_config(tmp_path, monkeypatch):
    import slmforge.compress as compress
    from slmforge.compress import quantize_plan

    monkeypatch.setattr(compress, "parent_ref", lambda path, kind=None: {"path": str(path)})  # no data stage here
    cfg = ProjectConfig()
    cfg.quantize.model = str(tmp_path)
    cfg.quantize.method = "ternary"
    assert "qat_loop" in quantize_plan(cfg).config
    cfg.quantize.method = "int8_weight_only"
    assert "qat_loop" not in quantize_plan(cfg).config
    cfg.quantize.plan = {"model.layers.0": "ternary"}  # a plan value uses the method too
    assert "qat_loop" in quantize_plan(cfg).config


# --------------------------------------------------------------------------- suite metrics and extraction


def test_every_suite_task_has_its_metrics_in_the_table():
    from slmforge.evaluate.metrics import SUITE_METRICS, suite_metrics
    from slmforge.evaluate.suites import SuiteSpec

    tasks = _choices(SuiteSpec, "task")
    assert {m.task for m in SUITE_METRICS.values()} <= set(tasks)
    assert suite_metrics("generate") == ("exact_match", "token_f1", "bleu", "chrf", "rouge", "code_exact", "edit_sim")
    assert suite_metrics("multiple_choice") == ("accuracy", "macro_f1")
    assert suite_metrics("code") == ()  # pass@k, from the suite's k


def test_lm_eval_translates_only_table_metrics():
    from slmforge.evaluate.metrics import SUITE_METRICS
    from slmforge.evaluate.suites import _LM_EVAL_METRICS

    assert _LM_EVAL_METRICS <= set(SUITE_METRICS)  # a renamed metric is renamed in the lm-eval export too


def test_extraction_methods_are_the_suite_choices():
    from slmforge.evaluate.metrics import EXTRACTION_METHODS
    from slmforge.evaluate.suites import ExtractSpec

    assert set(_choices(ExtractSpec, "method")) == set(EXTRACTION_METHODS)


def test_builtin_suites_name_only_table_metrics():
    from slmforge.evaluate.metrics import suite_metrics
    from slmforge.evaluate.suites import builtin_suites, load_suite

    for name in builtin_suites():
        spec, _ = load_suite(name)  # the suite check runs here
        if spec.task != "code":
            assert set(spec.metrics) <= set(suite_metrics(spec.task)), name


def test_a_metric_added_to_the_table_is_accepted_and_scored(monkeypatch):
    """The suite check and the runner read one table: a new entry is enough for both."""
    from slmforge.errors import EvalError
    from slmforge.evaluate import metrics as M
    from slmforge.evaluate.suites import SuiteSpec

    spec = SuiteSpec.model_validate({"name": "s", "task": "generate", "data": {"source": "file", "path": "x.jsonl"},
                                     "metrics": ["length_ratio", "exact_match"]})
    with pytest.raises(EvalError, match=r"length_ratio.*do not apply to task generate"):
        spec.check("s.yaml")
    ratio = M.SuiteMetric(task="generate", item=lambda a, t: {"length_ratio": len(a) / max(len(t), 1)})
    monkeypatch.setitem(M.SUITE_METRICS, "length_ratio", ratio)
    spec.check("s.yaml")
    rows, agg, primary = M.score_items(spec.metrics, ["ab", "abcd"], ["abcd", "abcd"])
    assert rows == [{"length_ratio": 0.5, "exact_match": 0.0}, {"length_ratio": 1.0, "exact_match": 1.0}]
    assert agg == {"length_ratio": 0.75, "exact_match": 0.5} and primary == "length_ratio"


def test_score_items_means_then_corpus_scores():
    from slmforge.evaluate import metrics as M

    answers, targets = ["the cat sat on the mat", "a dog"], ["the cat sat on the mat", "the dog barked"]
    rows, agg, primary = M.score_items(["rouge", "bleu", "chrf"], answers, targets)
    assert primary == "rougeL" and list(rows[0]) == ["rouge1", "rouge2", "rougeL", "bleu", "chrf"]
    assert agg["rougeL"] == pytest.approx((rows[0]["rougeL"] + rows[1]["rougeL"]) / 2)
    assert agg["bleu"] == M.bleu(answers, targets) and agg["chrf"] == M.chrf(answers, targets)  # corpus, not mean
    rows, agg, primary = M.score_items(M.suite_metrics("multiple_choice"), ["pos", "pos", "neg"],
                                       ["pos", "neg", "neg"], ["pos", "neg", "neutral"])
    assert rows == [{"accuracy": 1.0}, {"accuracy": 0.0}, {"accuracy": 1.0}] and primary == "accuracy"
    want = M.classification_metrics(["pos", "neg", "neg"], ["pos", "pos", "neg"], ["pos", "neg", "neutral"])
    assert agg == {"accuracy": 2 / 3, "macro_f1": want["f1"]}


# --------------------------------------------------------------------------- stages, export formats, engines


def test_pipeline_stages_are_the_config_choices():
    from slmforge.config import ProjectSection
    from slmforge.pipeline import STAGES

    assert _choices(ProjectSection, "stages") == list(STAGES)


def test_export_formats_are_the_config_sections():
    from slmforge.export import FORMATS

    sections = [name for name, f in ExportConfig.model_fields.items()
                if isinstance(f.annotation, type) and issubclass(f.annotation, Section)]
    assert sections == list(FORMATS)


def test_the_engine_table_is_what_engine_for_picks_and_the_config_allows(tmp_path: Path):
    """``load_generator`` loads the engine ``engine_for`` names from ``ENGINE_LOADERS``; each is a
    choice of serve.models[].engine, which also has auto and the server-only embedding and vllm."""
    from slmforge.generate import ENGINE_LOADERS, engine_for

    onnx, hf = tmp_path / "onnx", tmp_path / "hf"
    for folder in (onnx, hf):
        folder.mkdir()
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    (onnx / "genai_config.json").write_text("{}")
    (hf / "config.json").write_text("{}")
    picked = [engine_for(p) for p in (hf, onnx, tmp_path / "m.gguf", "http://127.0.0.1:1/v1#m")]
    assert picked == list(ENGINE_LOADERS)
    assert set(_choices(ServeModelConfig, "engine")) == {*ENGINE_LOADERS, "auto", "embedding", "vllm"}
