"""Chain-of-thought fine-tuning: the problem generator, teacher filtering with a scripted teacher, the
character tokenizer, and a tiny end-to-end run of the experiment."""

from __future__ import annotations

import json
import re

import pytest

from slmforge.config import LoopConfig, ModelConfig
from slmforge.errors import ReasoningError
from slmforge.generate import Completion, SamplingParams
from slmforge.reasoning.cot import char_tokenizer, cot_experiment, make_problems, teacher_rationales

from conftest import CompleteOnly

LINE = re.compile(r"^(\d+) ([+-]) (\d+) = (\d+)$")


def recompute(problem):
    """Check every scratchpad line's arithmetic and the chain from the question to the answer; the
    operands in order."""
    lines = problem["rationale"].split("\n")
    assert lines[-1] == f"The answer is {problem['answer']}."
    value, operands = None, []
    for line in lines[:-1]:
        a, op, b, c = LINE.match(line).groups()
        a, b, c = int(a), int(b), int(c)
        assert value is None or a == value, f"{line!r} does not continue from {value}"
        assert c == (a + b if op == "+" else a - b) and c >= 0
        operands += [a] if value is None else []
        operands.append(b)
        value = c
    assert str(value) == problem["answer"]
    return operands, len(lines) - 1


def test_problems_are_deterministic_distinct_and_correct():
    first = make_problems(40, 3, 2, seed=5)
    assert first == make_problems(40, 3, 2, seed=5)
    assert first != make_problems(40, 3, 2, seed=6)
    assert len({p["question"] for p in first}) == len({p["id"] for p in first}) == 40
    for p in first:
        operands, _ = recompute(p)
        assert [int(x) for x in re.findall(r"\d+", p["question"])] == operands  # the question's numbers, in order


@pytest.mark.parametrize("steps,digits", [(1, 1), (2, 3), (5, 2)])
def test_difficulty_knobs(steps, digits):
    for p in make_problems(30, steps, digits, seed=1):
        operands, lines = recompute(p)
        assert p["steps"] == lines == steps and p["digits"] == digits
        assert all(len(str(x)) == digits for x in operands)
        assert len(operands) == steps + 1


@pytest.mark.parametrize("kwargs,needle", [
    ({"n": 0, "steps": 2, "digits": 2}, "n must be"),
    ({"n": 3, "steps": 0, "digits": 2}, "steps must be"),
    ({"n": 3, "steps": 2, "digits": 10}, "digits must be"),
])
def test_bad_problem_settings_raise(kwargs, needle):
    with pytest.raises(ReasoningError, match=needle):
        make_problems(**kwargs)


class Teacher(CompleteOnly):
    """A scripted teacher: ``reply(problem, i)`` writes the i-th sample for the problem asked about."""

    def __init__(self, problems, reply) -> None:
        self.by_question = {p["question"]: p for p in problems}
        self.reply, self.prompts = reply, []

    def complete(self, prompt, params):
        self.prompts.append(prompt)
        problem = next(p for q, p in self.by_question.items() if q in prompt)
        return [Completion(text=self.reply(problem, i), tokens=10, finish_reason="stop") for i in range(params.n)]


def test_teacher_rationales_keep_only_right_answers():
    problems = make_problems(6, 2, 2, seed=3)

    def reply(problem, i):  # even problems: right on the first sample only; odd ones: always wrong
        right = int(problem["id"].rsplit("-", 1)[1]) % 2 == 0 and i == 0
        answer = int(problem["answer"]) + (0 if right else 1)
        return f"First I add.\nSo the total is {answer}.\nThe answer is {answer}."

    teacher = Teacher(problems, reply)
    kept, rate = teacher_rationales(problems, teacher, SamplingParams(max_new_tokens=64), samples=2,
                                    progress=False)
    assert [k["id"] for k in kept] == [p["id"] for p in problems[::2]]
    assert all(k["source"] == "teacher" and k["rationale"].endswith(f"{k['answer']}.") for k in kept)
    assert rate == pytest.approx(3 / 12)
    assert len(teacher.prompts) == 6 and "step by step" in teacher.prompts[0]
    with pytest.raises(ReasoningError, match="samples"):
        teacher_rationales(problems, teacher, samples=0, progress=False)


def test_char_tokenizer_is_one_token_per_character():
    tok = char_tokenizer(["Question: Ana has 12 pens.\nAnswer: 12 + 7 = 19"])
    text = "Ana has 907 pens.\nAnswer: 9 - 7 = 2"
    ids = tok(text, add_special_tokens=True)["input_ids"]
    assert ids[0] == tok.bos_token_id and len(ids) == len(text) + 1
    assert tok.decode(ids, skip_special_tokens=True) == text


TINY_MODEL = ModelConfig(preset="custom", hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1,
                         intermediate_size=32)
TINY_LOOP = LoopConfig(max_steps=3, batch_size=4, warmup_steps=1, eval_every=3, save_every=3, precision="fp32",
                       device="cpu")


def test_cot_experiment_writes_its_table_plot_and_models(tmp_path):
    from slmforge.generate import TorchGenerator

    r = cot_experiment(tmp_path, preset=TINY_MODEL, train_problems=8, train_steps=(1, 2), eval_steps=(1, 3),
                       eval_problems=3, sc_samples=2, loop=TINY_LOOP, minutes=None, progress=False)
    files = {p.name for p in tmp_path.iterdir()}
    assert {"cot_results.json", "cot_table.md", "cot_accuracy.png", "cot_predictions.jsonl", "direct-model",
            "cot-model"} <= files
    assert json.loads((tmp_path / "cot_results.json").read_text())["overall"] == r["overall"]
    assert set(r["by_steps"]) == {"1", "3"} and r["overall"]["n"] == 6
    for part in r["by_steps"].values():
        assert set(part["accuracy"]) == set(part["tokens_mean"]) == {"direct", "cot", "cot_sc"}
        assert set(part["p_value"]) == {"direct_vs_cot", "cot_vs_cot_sc"}
        assert all(0 <= p <= 1 for p in part["p_value"].values())
    assert r["training"]["direct"]["steps"] == r["training"]["cot"]["steps"] == 3
    assert r["training"]["direct"]["params"] == r["training"]["cot"]["params"]
    table = (tmp_path / "cot_table.md").read_text().splitlines()
    assert len(table) == 2 + 2 + 1 and table[-1].startswith("| all | 6 |")
    rows = [json.loads(line) for line in (tmp_path / "cot_predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all(len(row["cot_sc"]["samples"]) == 2 for row in rows)
    gen = TorchGenerator.from_pretrained(tmp_path / "cot-model", device="cpu")  # what reasoning_tradeoff loads
    assert gen.complete("Question: Ana has 3 pens.\nAnswer:", SamplingParams(max_new_tokens=4))[0].tokens <= 4


def test_cot_experiment_with_a_teacher_trains_on_what_it_solved(tmp_path):
    train = make_problems(2, 1, 2, seed=0) + make_problems(2, 2, 2, seed=0)

    def reply(problem, i):  # solves the one-step problems only
        answer = int(problem["answer"]) + (0 if problem["steps"] == 1 else 5)
        return f"Adding it up gives {answer}.\nThe answer is {answer}."

    r = cot_experiment(tmp_path, preset=TINY_MODEL, train_problems=4, train_steps=(1, 2), eval_steps=(1,), digits=2,
                       eval_problems=2, sc_samples=2, loop=TINY_LOOP, minutes=None, teacher=Teacher(train, reply),
                       progress=False)
    assert r["teacher"] == {"problems": 4, "kept": 2, "keep_rate": 0.5}
    assert r["training"]["cot"]["examples"] == r["training"]["direct"]["examples"] == 2


def test_cot_experiment_rejects_bad_settings(tmp_path):
    with pytest.raises(ReasoningError, match="sc_samples"):
        cot_experiment(tmp_path, sc_samples=0, progress=False)
    with pytest.raises(ReasoningError, match="difficult"):
        cot_experiment(tmp_path, train_steps=(), progress=False)
