"""lm-evaluation-harness, run for real on tasks exported by ``slmforge eval lm-eval-task``: its filters and
metric settings score answers as ``slmforge eval`` does, and a generate and a multiple-choice task give the
same per-item scores under ``slmforge eval``, ``lm_eval --model hf`` and ``--model local-completions``
against ``slmforge serve`` on 127.0.0.1."""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import pytest

from slmforge.evaluate import metrics as M
from slmforge.evaluate.suites import SuiteSpec, export_lm_eval_task, load_suite

from conftest import PROSE, TINY, LiveServer, build_peaky_model, build_tiny_tokenizer

pytestmark = pytest.mark.interop
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # the exported tasks read local JSONL only


def lm_eval_answers(task_yaml: Path, outputs: list[str], docs: list[dict]) -> tuple[list[str], dict]:
    """The task's filter_list applied by lm-eval to one output per doc -> (answers, the task config)."""
    from lm_eval.filters import build_filter_ensemble
    from lm_eval.tasks._yaml_loader import load_yaml

    config = load_yaml(task_yaml)
    pipeline = config["filter_list"][0]
    steps = [[f["function"], {k: v for k, v in f.items() if k != "function"}] for f in pipeline["filter"]]
    resps = [[o] for o in outputs]
    for step in build_filter_ensemble(pipeline["name"], steps).filters:
        resps = step().apply(resps, docs)
    return list(resps), config


WORDS = ["The", "the", "a", "An", "answer", "is", "158", "1,234", "-5", "3.5", "x-y", "don't", "a.b", "a-b", "\n",
         "\t", "  ", "\u00a0", "ünï", '{"answer": "Paris"}', '{"answer": 7}', "```py\nx = 1\n```", "Paris.", "158."]


@pytest.mark.parametrize(("method", "arg", "targets"), [
    ("last_number", None, ["158", "1234", "-5", "3.5"]),
    ("regex", r"answer is (\S+)", ["158", "Paris", "x-y"]),
    ("regex", r"\d+", ["158", "12"]),
    ("regex", r"(answer) is (\S+)", ["answer", "is"]),  # several groups: slmforge's own code
    ("first_line", None, ["the answer", "158", "a b"]),
    ("none", None, ["new york", "The Cat", "158"]),  # multi-word: whitespace collapsed
    ("none", None, ["158", "Cat"]),  # one word: built-in settings alone
    ("json_field", "answer", ["Paris", "7"]),
    ("code_block", None, ["x = 1"]),
])
def test_exported_filters_and_exact_match_score_answers_as_slmforge_does(tmp_path, method, arg, targets):
    rng = random.Random(0)

    def text() -> str:
        return "".join(rng.choice(WORDS) + rng.choice(["", " ", "\n", "  "]) for _ in range(rng.randint(0, 7)))

    (tmp_path / "items.jsonl").write_text("".join(json.dumps({"input": "q", "target": t}) + "\n" for t in targets))
    spec = SuiteSpec(name="fuzz", task="generate", data={"source": "file", "path": "items.jsonl"},
                     extract={"method": method, "arg": arg}, metrics=["exact_match"])
    task = export_lm_eval_task(spec, tmp_path, None, tmp_path / "tasks")
    rows = [json.loads(line) for line in (tmp_path / "tasks" / f"{task.stem}.jsonl").read_text().splitlines()]
    docs, outputs = [], []
    for _ in range(600):
        doc = rng.choice(rows)
        wrap = rng.choice(["{}", "{}.", "The {}", "answer is {}", "{}\nmore", "{{\"answer\": \"{}\"}}", "```\n{}\n```"])
        outputs.append(text() + (wrap.format(doc["target"].upper()) if rng.random() < 0.4 else ""))
        docs.append(doc)
    answers, config = lm_eval_answers(task, outputs, docs)
    from lm_eval.api.metrics import exact_match_hf_evaluate

    settings = {k: v for k, v in config["metric_list"][0].items() if k not in ("metric", "aggregation",
                                                                              "higher_is_better")}
    original = {" ".join(t.split()): t for t in targets} | {t: t for t in targets}
    ours = [M.exact_match(M.extract_answer(o, method, arg) or "", original[d["target"]])
            for o, d in zip(outputs, docs)]
    theirs = [exact_match_hf_evaluate(predictions=[a], references=[d["target"]], **settings)["exact_match"]
              for a, d in zip(answers, docs)]
    assert theirs == ours
    assert 0 < sum(ours) < len(ours)  # both verdicts occur


def test_a_perfect_arithmetic_answer_scores_1_in_lm_eval(tmp_path):
    spec, base = load_suite("arithmetic")
    spec.limit = 2
    task = export_lm_eval_task(spec, base, None, tmp_path)
    docs = [json.loads(line) for line in (tmp_path / f"{task.stem}.jsonl").read_text().splitlines()]
    outputs = [f" 9 * 19 = 171. 171 - 13 = {d['target']}. The answer is {d['target']}." for d in docs]
    answers, config = lm_eval_answers(task, outputs, docs)
    assert answers == [d["target"] for d in docs]
    assert "!function" not in task.read_text() and not (tmp_path / f"{task.stem}.py").exists()  # built-ins only


class Arithmetician:
    """An engine (not torch) that writes GSM8K-style reasoning ending "The answer is N.", wrong on every third
    problem: what `slmforge eval` and lm-eval must both score by the extracted number, not the whole text."""

    def __init__(self, problems: list[dict]) -> None:
        self.answers = {p["input"]: int(p["target"]) for p in problems}

    def complete(self, prompt, params):
        from slmforge.generate import Completion

        question = prompt.rsplit("Question: ", 1)[-1].rsplit("\nAnswer:", 1)[0]
        n = list(self.answers).index(question)
        answer = self.answers[question] + (n % 3 == 2)
        return [Completion(text=f" First 2 * 3 = 6, so {answer - 6} + 6 = {answer}. The answer is {answer:,}.",
                           tokens=20, finish_reason="stop")] * params.n

    def complete_batch(self, prompts, params):
        return [self.complete(p, params) for p in prompts]


def test_arithmetic_scores_alike_in_slmforge_eval_and_lm_eval_against_slmforge_serve(tmp_path):
    """The issue's case: a right answer in a sentence is right in lm-eval too (it scored 0 before)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from slmforge.evaluate.runner import run_suite
    from slmforge.evaluate.suites import load_items
    from slmforge.serve import create_app

    spec, base = load_suite("arithmetic")
    spec.limit = 6
    engine = Arithmetician(load_items(spec, base, None))
    ours = run_suite(engine, spec, base, tmp_path, progress=False)
    assert [r["scores"]["exact_match"] for r in ours.items] == [1.0, 1.0, 0.0] * 2
    task = export_lm_eval_task(spec, base, None, tmp_path / "tasks")
    with LiveServer(create_app({"arith": engine})) as url:
        run = lm_eval.simple_evaluate(
            model="local-completions", model_args=f"model=arith,base_url={url}/v1/completions,tokenizer_backend=None,"
            "tokenized_requests=False,max_retries=1", tasks=[task.stem],
            task_manager=TaskManager(include_path=str(task.parent), include_defaults=False), log_samples=True)
    want = {r["id"]: r for r in ours.items}
    samples = run["samples"][task.stem]
    assert len(samples) == 6
    for s in samples:
        mine = want[s["doc"]["id"]]
        assert s["resps"][0][0] == mine["output"]
        assert s["exact_match"] == mine["scores"]["exact_match"], s["doc"]["id"]
    assert run["results"][task.stem]["exact_match,slmforge"] == pytest.approx(4 / 6)


# --------------------------------------------------------------------------- the three runners, item by item


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("lm_eval")
    return build_peaky_model(build_tiny_tokenizer(workdir, vocab_size=400), workdir / "tiny", TINY)


@pytest.fixture(scope="module")
def gen(model_dir, one_torch_thread):
    from slmforge.generate import TorchGenerator

    return TorchGenerator.from_pretrained(model_dir, device="cpu")


def tiny_suites(gen, folder: Path) -> tuple[Path, Path]:
    """A generate suite whose even items' targets are the peaky model's own first line (so exact match is
    1 there and 0 on the others, not 0 everywhere), multi-word, with token F1; and a multiple-choice one."""
    from slmforge.generate import SamplingParams

    folder.mkdir(parents=True, exist_ok=True)
    inputs = [p.split(".")[0] for p in PROSE[:6]]
    outs = gen.complete_batch([f"Q: {x}\nA:" for x in inputs],
                              SamplingParams(max_new_tokens=10, repetition_penalty=1.1, stop=["\n"]))
    items = [{"id": f"g{i}", "input": x, "target": o[0].text.strip() if i % 2 == 0 else "something else"}
             for i, (x, o) in enumerate(zip(inputs, outs))]
    (folder / "gen.jsonl").write_text("".join(json.dumps(it) + "\n" for it in items))
    (folder / "gen.yaml").write_text(
        'name: tiny-gen\ntask: generate\ndata: {source: file, path: gen.jsonl}\nprompt: "Q: {input}\\nA:"\n'
        'max_new_tokens: 10\nstop: ["\\n"]\nextract: {method: first_line}\nmetrics: [exact_match, token_f1]\n')
    reviews = [("A joy from start to finish.", "positive"), ("Dull and far too long.", "negative"),
               ("The best meal in years.", "positive"), ("Cold food and rude staff.", "negative"),
               ("I would go again tomorrow.", "positive"), ("Never again.", "negative")]
    (folder / "mc.jsonl").write_text("".join(json.dumps({"id": f"m{i}", "input": r, "target": t}) + "\n"
                                             for i, (r, t) in enumerate(reviews)))
    (folder / "mc.yaml").write_text(
        'name: tiny-mc\ntask: multiple_choice\ndata: {source: file, path: mc.jsonl}\n'
        'prompt: "Review: {input}\\nSentiment:"\nchoices: [positive, negative]\nmetrics: [accuracy, macro_f1]\n')
    return folder / "gen.yaml", folder / "mc.yaml"


def test_generate_and_multiple_choice_tasks_score_alike_in_slmforge_lm_eval_hf_and_local_completions(
        gen, model_dir, tmp_path):
    import lm_eval
    from lm_eval.tasks import TaskManager

    from slmforge.evaluate.runner import run_suite
    from slmforge.serve import create_app

    gen_yaml, mc_yaml = tiny_suites(gen, tmp_path / "suites")
    ours, tasks = {}, {}
    for file in (gen_yaml, mc_yaml):
        spec, base = load_suite(file)
        ours[spec.task] = run_suite(gen, spec, base, model_dir, progress=False)
        tasks[spec.task] = export_lm_eval_task(spec, base, None, tmp_path / "tasks").stem
    manager = TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False)  # indexing its own: ~35 s
    common = {"tasks": list(tasks.values()), "task_manager": manager, "log_samples": True}
    # transformers prefers the model folder's generation_config.json max_new_tokens (the default profile's,
    # 128) to the max_length lm-eval's hf model passes: without it there, lm-eval's cap (the suite's) holds.
    hf_dir = tmp_path / "hf-model"
    shutil.copytree(model_dir, hf_dir)
    config = json.loads((hf_dir / "generation_config.json").read_text())
    del config["max_new_tokens"]
    (hf_dir / "generation_config.json").write_text(json.dumps(config))
    runs = {"hf": lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={hf_dir},add_bos_token=True,"
                                          "device=cpu,dtype=float32", batch_size=1, **common)}
    with LiveServer(create_app({"tiny": gen})) as url:
        runs["local-completions"] = lm_eval.simple_evaluate(
            model="local-completions", model_args=f"model=tiny,base_url={url}/v1/completions,tokenizer_backend="
            f"huggingface,tokenizer={model_dir},add_bos_token=True,max_retries=1", **common)

    want_gen = {r["id"]: r for r in ours["generate"].items}
    want_mc = {r["id"]: r for r in ours["multiple_choice"].items}
    assert [r["scores"]["exact_match"] for r in ours["generate"].items] == [1.0, 0.0] * 3
    for name, run in runs.items():
        samples = run["samples"][tasks["generate"]]
        assert len(samples) == 6, name
        for s in samples:
            mine = want_gen[s["doc"]["id"]]
            assert s["filtered_resps"][0] == " ".join(mine["answer"].split()), (name, s["doc"]["id"])
            assert s["exact_match"] == mine["scores"]["exact_match"], (name, s["doc"]["id"])
            assert s["token_f1"] == pytest.approx(mine["scores"]["token_f1"]), (name, s["doc"]["id"])
        result = run["results"][tasks["generate"]]
        assert result["exact_match,slmforge"] == pytest.approx(ours["generate"].metrics["exact_match"])
        assert result["token_f1,slmforge"] == pytest.approx(ours["generate"].metrics["token_f1"])

        samples = run["samples"][tasks["multiple_choice"]]
        assert len(samples) == 6, name
        for s in samples:
            mine = want_mc[s["doc"]["id"]]
            lls = [r[0][0] for r in s["resps"]]
            assert lls == pytest.approx([mine["loglikelihoods"][c] for c in s["doc"]["choices"]], abs=1e-3), name
            assert s["acc"] == mine["scores"]["accuracy"], (name, s["doc"]["id"])
        result = run["results"][tasks["multiple_choice"]]
        assert result["acc,none"] == pytest.approx(ours["multiple_choice"].metrics["accuracy"])
        assert result["f1,none"] == pytest.approx(ours["multiple_choice"].metrics["macro_f1"])
