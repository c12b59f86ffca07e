"""Evaluation: suites, runner, gates, A/B comparison — with scripted fake generators
(what a model says is fixed, so every number is known) and one tiny real model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from slmforge.errors import EvalError, GateFailed
from slmforge.evaluate.gates import check_gates, enforce, parse_gate
from slmforge.evaluate.runner import run_suite
from slmforge.evaluate.suites import arithmetic_problems, builtin_suites, load_items, load_suite
from slmforge.generate import Completion

EXE = Path(sys.executable).parent / "slmforge"


class Scripted:
    """A Generator whose answers are a function of the prompt."""

    def __init__(self, answer, loglik=None):
        self.answer = answer
        self.loglik = loglik
        self.calls = 0

    def complete(self, prompt, params):
        return [Completion(self.answer(prompt), 1, "stop")] * params.n

    def complete_batch(self, prompts, params):
        self.calls += 1
        return [self.complete(p, params) for p in prompts]

    def chat(self, messages, params):
        return self.complete(messages[-1]["content"], params)

    def loglikelihood(self, requests, batch_size=8):
        return [self.loglik(c, x) for c, x in requests]


def _suite(tmp_path: Path, body: str, items: list[dict] | None = None) -> Path:
    if items is not None:
        (tmp_path / "items.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
    f = tmp_path / "suite.yaml"
    f.write_text(body)
    return f


def test_builtin_suites_load():
    names = builtin_suites()
    assert {"python-docs-qa", "humaneval", "arithmetic", "gsm8k", "sentiment"} <= set(names)
    for name in names:
        spec, base = load_suite(name)
        assert spec.name == name and base.is_dir()


@pytest.mark.parametrize(
    ("body", "match"),
    [
        ("name: x\ntask: generate\n", r"`data`: Field required"),
        ("name: x\ntask: guess\ndata: {source: arithmetic}\n", r"`task`"),
        ("name: x\ntask: generate\ndata: {source: arithmetic}\nmetrics: [accuracy]\n", "do not apply to task generate"),
        ("name: x\ntask: code\ndata: {source: humaneval}\nn_samples: 2\nk: [1, 10]\n", r"k <= n_samples"),
        ("name: [unclosed\n", "not valid YAML at line"),
        ("name: x\ntask: generate\ndata: {source: arithmetic}\nbogus: 1\n", r"`bogus`"),
    ],
)
def test_bad_suite_files_have_clear_errors(tmp_path, body, match):
    with pytest.raises(EvalError, match=match):
        load_suite(_suite(tmp_path, body))


def test_unknown_suite_lists_builtins():
    with pytest.raises(EvalError, match="python-docs-qa"):
        load_suite("no-such-suite")


def test_generate_suite_scores_and_fewshot_prompt(tmp_path):
    items = [{"id": "a", "input": "2+2", "target": "4"}, {"id": "b", "input": "3+3", "target": "6"},
             {"id": "c", "input": "5+5", "target": "10"}]
    f = _suite(tmp_path, "name: sums\ntask: generate\ndata: {source: file, path: items.jsonl}\n"
               'prompt: "Q: {input}\\nA:"\nfewshot: [{input: "1+1", target: " 2"}]\n'
               "extract: {method: last_number}\nmetrics: [exact_match, token_f1]\n", items)
    spec, base = load_suite(f)
    answers = {"2+2": "The answer is 4", "3+3": "maybe 7", "5+5": "10."}
    gen = Scripted(lambda p: answers[p.rsplit("Q: ", 1)[1].split("\n")[0]])
    res = run_suite(gen, spec, base, tmp_path / "model", batch_size=2, progress=False)
    assert res.metrics["exact_match"] == pytest.approx(2 / 3)
    assert res.scores() == {"a": 1.0, "b": 0.0, "c": 1.0}
    assert res.items[0]["prompt"] == "Q: 1+1\nA: 2\n\nQ: 2+2\nA:"
    assert gen.calls == 2  # batched: 3 prompts in batches of 2


def test_results_are_cached(tmp_path):
    items = [{"id": "a", "input": "x", "target": "y"}]
    spec, base = load_suite(_suite(tmp_path, "name: c\ntask: generate\ndata: {source: file, path: items.jsonl}\n", items))
    gen = Scripted(lambda p: "y")
    first = run_suite(gen, spec, base, tmp_path / "m", cache_dir=tmp_path / "cache", progress=False)
    again = run_suite(gen, spec, base, tmp_path / "m", cache_dir=tmp_path / "cache", progress=False)
    assert not first.cached and again.cached and gen.calls == 1
    assert again.metrics == first.metrics


def test_multiple_choice_by_loglikelihood():
    spec, base = load_suite("sentiment")
    items = load_items(spec, base, None)
    gold = {it["input"]: it["target"] for it in items}
    # Right on every item but the first positive one.
    wrong = next(i["input"] for i in items if i["target"] == "positive")

    def loglik(context, cont):
        text = context.split("Review: ")[1].split("\n")[0]
        right = gold[text] if text != wrong else "negative"
        return 0.0 if cont.strip() == right else -5.0

    res = run_suite(Scripted(lambda p: "", loglik), spec, base, "fake", progress=False)
    assert res.metrics["accuracy"] == pytest.approx((len(items) - 1) / len(items))
    assert 0.9 < res.metrics["macro_f1"] < 1.0


def _humaneval(limit: int):
    """The humaneval suite cut to ``limit`` items, and each prompt's canonical completion."""
    spec, base = load_suite("humaneval")
    spec.limit = limit
    return spec, base, {it["input"]: it["target"] for it in load_items(spec, base, None)}


def test_code_suite_passes_canonical_and_fails_broken():
    spec, base, canonical = _humaneval(6)
    good = run_suite(Scripted(lambda p: canonical[p]), spec, base, "good", progress=False)
    assert good.metrics["pass@1"] == 1.0
    assert good.sandbox["weak"] is False and good.sandbox["executions"] == 6
    assert "read-only filesystem" in good.sandbox["protections"]
    bad = run_suite(Scripted(lambda p: "    return None\n"), spec, base, "bad", progress=False)
    assert bad.metrics["pass@1"] == 0.0
    assert {s for it in bad.items for s in it["statuses"]} <= {"failed", "timeout", "crashed"}
    # a model that ends its program before the tests run scored 1.0 before the verdict harness
    exits = run_suite(Scripted(lambda p: "    return None\nimport sys\nsys.exit(0)\n"), spec, base, "exits",
                      progress=False)
    assert exits.metrics["pass@1"] == 0.0 and {s for it in exits.items for s in it["statuses"]} == {"failed"}


def test_arithmetic_problems_are_seeded_and_correct():
    a = arithmetic_problems(20, seed=3)
    assert a == arithmetic_problems(20, seed=3) and a != arithmetic_problems(20, seed=4)
    assert all(it["target"].lstrip("-").isdigit() for it in a)


@pytest.mark.parametrize(
    ("rule", "metrics", "baseline", "passed"),
    [
        ("exact_match >= 0.6", {"qa.exact_match": 0.7}, None, True),
        ("exact_match >= 0.6", {"qa.exact_match": 0.5}, None, False),
        ("qa.token_f1 > 0.2", {"qa.token_f1": 0.2}, None, False),
        ("ppl_delta_pct <= 1.0", {"perplexity.ppl": 101.5}, {"perplexity.ppl": 100.0}, False),
        ("ppl_delta_pct <= 1.0", {"perplexity.ppl": 100.5}, {"perplexity.ppl": 100.0}, True),
        ("exact_match_delta >= -0.01", {"qa.exact_match": 0.6}, {"qa.exact_match": 0.65}, False),
    ],
)
def test_gates(rule, metrics, baseline, passed):
    (result,) = check_gates([rule], metrics, baseline)
    assert result.passed is passed


def test_gate_errors():
    with pytest.raises(EvalError, match="metric op number"):
        parse_gate("accuracy is great")
    with pytest.raises(EvalError, match="was not measured"):
        check_gates(["bleu >= 1"], {"qa.exact_match": 1.0})
    with pytest.raises(EvalError, match="ambiguous"):
        check_gates(["exact_match >= 1"], {"a.exact_match": 1.0, "b.exact_match": 1.0})
    with pytest.raises(GateFailed, match=r"measured qa.exact_match|measured exact_match = 0.5"):
        enforce(check_gates(["exact_match >= 0.6"], {"qa.exact_match": 0.5}), "model X")


# --------------------------------------------------------------------------- a tiny real model end to end


@pytest.fixture(scope="module")
def tiny_project(tmp_path_factory):
    from slmforge.config import ProjectConfig
    from slmforge.data import run_data_stage
    from slmforge.tokenizer import train_tokenizer
    from slmforge.train import finetune, pretrain

    root = tmp_path_factory.mktemp("evalproj")
    cfg = ProjectConfig().rooted_at(root)
    cfg.data.sources = ["python-docs"]
    cfg.data.python_docs.max_modules = 8
    cfg.tokenizer.vocab_size = 500
    cfg.tokenizer.domain_terms = []
    for k, v in {"preset": "custom", "hidden_size": 32, "num_layers": 2, "num_heads": 2, "num_kv_heads": 1,
                 "intermediate_size": 64}.items():
        setattr(cfg.model, k, v)
    for section in (cfg.train, cfg.sft):
        section.seq_len, section.batch_size, section.max_steps, section.precision = 64, 4, 6, "fp32"
        section.eval_every = section.save_every = 100
    cfg.sft.seq_len = 256
    run_data_stage(cfg, progress=False)
    train_tokenizer(cfg, progress=False)
    pretrain(cfg, progress=False)
    finetune(cfg, progress=False)
    (root / "slmforge.yaml").write_text(
        "data: {sources: [python-docs], python_docs: {max_modules: 8}}\n"
        "tokenizer: {vocab_size: 500, domain_terms: []}\n"
        "model: {preset: custom, hidden_size: 32, num_layers: 2, num_heads: 2, num_kv_heads: 1, intermediate_size: 64}\n"
        "train: {seq_len: 64, batch_size: 4, max_steps: 6, precision: fp32, eval_every: 100, save_every: 100}\n"
        "sft: {seq_len: 256, batch_size: 4, max_steps: 6, precision: fp32, eval_every: 100, save_every: 100}\n"
        "eval: {limit: 6, suites: [python-docs-qa, perplexity], regression_vs: parent}\n"
    )
    return root


def test_eval_run_writes_results_and_manifest(tiny_project):
    from slmforge.artifacts import read_manifest, verify_artifact
    from slmforge.config import load_config
    from slmforge.evaluate.run import run_eval

    cfg = load_config(tiny_project / "slmforge.yaml")
    res = run_eval(cfg, gates=["perplexity.ppl > 1"], progress=False)
    assert {"python-docs-qa.token_f1", "perplexity.ppl", "perplexity.bits_per_byte"} <= set(res.metrics)
    assert res.baseline is not None and "perplexity.ppl" in res.baseline  # regression_vs: parent = the train output
    assert res.passing
    assert verify_artifact(res.path) == []
    for name in ("results.json", "report.md", "report.html", "metrics.png", "items/python-docs-qa.jsonl"):
        assert (res.path / name).exists()
    model_manifest = read_manifest(tiny_project / "runs" / "sft")
    assert model_manifest.metrics["eval"]["perplexity.ppl"] == res.metrics["perplexity.ppl"]
    assert model_manifest.metrics["passing"] is True
    assert verify_artifact(tiny_project / "runs" / "sft") == []


def test_failing_gate_exits_nonzero_and_marks_the_model(tiny_project):
    proc = subprocess.run([str(EXE), "eval", "run", "-c", str(tiny_project / "slmforge.yaml"), "--suite", "perplexity",
                           "--gate", "perplexity.ppl < 1.0"], capture_output=True, text=True, cwd=tiny_project)
    assert proc.returncode == 3, proc.stderr
    assert "quality gate(s) failed" in proc.stderr and "perplexity.ppl < 1.0" in proc.stderr
    manifest = json.loads((tiny_project / "runs" / "sft" / "manifest.json").read_text())
    assert manifest["metrics"]["passing"] is False


def test_compare_same_model_reports_no_difference(tiny_project):
    from slmforge.config import load_config
    from slmforge.evaluate.run import compare_models

    cfg = load_config(tiny_project / "slmforge.yaml")
    sft = tiny_project / "runs" / "sft"
    res = compare_models(cfg, sft, sft, ["python-docs-qa"], limit=6, progress=False)
    r = res.suites["python-docs-qa"]
    assert r["diff"] == 0 and r["verdict"] == "no significant difference"
    assert (res.path / "difference.png").exists() and "verdict" in (res.path / "report.md").read_text()


def test_lm_eval_task_export(tmp_path):
    import yaml

    from slmforge.evaluate.suites import export_lm_eval_task

    spec, base = load_suite("arithmetic")
    spec.limit = 5
    task = yaml.safe_load(export_lm_eval_task(spec, base, None, tmp_path).read_text())
    assert task["task"] == "slmforge_arithmetic" and task["output_type"] == "generate_until"
    rows = [json.loads(line) for line in (tmp_path / "slmforge_arithmetic.jsonl").read_text().splitlines()]
    assert len(rows) == 5 and rows[0]["prompt"].startswith("Question: Mia has 4 pens")
    assert Path(task["dataset_kwargs"]["data_files"]["test"]).exists()
    spec, base = load_suite("sentiment")
    text = export_lm_eval_task(spec, base, None, tmp_path).read_text()
    task = yaml.safe_load(text.replace("!function ", ""))  # macro_f1: an aggregation in the task's own .py
    assert task["output_type"] == "multiple_choice"
    assert task["metric_list"][1]["aggregation"] == "slmforge_sentiment.macro_f1"
    with pytest.raises(EvalError, match="code suite"):
        export_lm_eval_task(*load_suite("humaneval"), None, tmp_path)


# --------------------------------------------------------------------------- code suites: the sandbox on record


@pytest.fixture
def weak_sandbox(monkeypatch):
    from slmforge.evaluate import sandbox

    refused = sandbox._probe(("unprivileged uid", "process limit", "no new privileges"))
    monkeypatch.setattr(sandbox, "_probe", lambda allowed=sandbox._KERNEL_STEPS: refused)


def test_code_suite_fails_closed_on_a_weak_sandbox(weak_sandbox):
    from slmforge.errors import SandboxError

    spec, base, canonical = _humaneval(2)
    gen = Scripted(lambda p: canonical[p])
    with pytest.raises(SandboxError, match="allow_weak_sandbox"):
        run_suite(gen, spec, base, "m", progress=False)
    assert gen.calls == 0  # refused before any generation time was spent
    res = run_suite(gen, spec, base, "m", progress=False, allow_weak_sandbox=True)
    assert res.metrics["pass@1"] == 1.0
    assert res.sandbox["weak"] is True and "audit hook" in res.sandbox["protections"]
    assert res.sandbox["missing"] == ["read-only filesystem", "network namespace", "pid namespace"]


def test_eval_run_writes_the_sandbox_into_results_manifest_and_report(tiny_project, weak_sandbox, monkeypatch,
                                                                      tmp_path):
    """`slmforge eval run --allow-weak-sandbox` on a weak machine: it runs, and every record says weak."""
    from typer.testing import CliRunner

    import slmforge.generate
    from slmforge.cli.main import app

    _, _, canonical = _humaneval(2)
    monkeypatch.setattr(slmforge.generate, "load_generator", lambda model, *a, **k: Scripted(lambda p: canonical[p]))
    monkeypatch.chdir(tiny_project)
    args = ["eval", "run", "-c", str(tiny_project / "slmforge.yaml"), "--suite", "humaneval", "--limit", "2",
            "--no-cache", "--out", str(tmp_path / "eval")]
    refused = CliRunner().invoke(app, args)
    assert refused.exit_code != 0 and "allow_weak_sandbox" in str(refused.exception)
    ran = CliRunner().invoke(app, args + ["--allow-weak-sandbox"])
    assert ran.exit_code == 0, ran.output
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert results["sandbox"]["humaneval"]["weak"] is True
    assert results["suites"]["humaneval"]["sandbox"]["missing"] == ["read-only filesystem", "network namespace",
                                                                    "pid namespace"]
    assert "WEAK SANDBOX" in (tmp_path / "eval" / "report.md").read_text()
    manifest = json.loads((tiny_project / "runs" / "sft" / "manifest.json").read_text())
    assert manifest["metrics"]["eval_sandbox"]["humaneval"]["weak"] is True
