"""Chain-of-thought fine-tuning: arithmetic word problems with verified answers and step-by-step
scratchpads, teacher rationales filtered by answer, and an experiment that trains a direct-answer and a
chain-of-thought model of the same size on the same problems and compares them on held-out problems of
increasing difficulty (plus self-consistency over the CoT model's samples), with McNemar's paired test.

    from slmforge.reasoning.cot import make_problems, cot_experiment
    make_problems(1, steps=2, digits=2, seed=0)[0]["rationale"]   # "34 + 12 = 46\\n46 - 19 = 27\\nThe answer is 27."
    cot_experiment(Path("runs/cot"))                              # cot_results.json, cot_table.md, cot_accuracy.png

Why programmatic problems: every answer is computed, so accuracy needs no judge and a teacher's rationale
can be kept only when its final number is right. Why a character-level tokenizer (built here with the
``tokenizers`` library rather than the tokenizer stage's byte-level BPE, which merges digit runs and needs
300+ tokens): one token per digit is what lets a tiny transformer learn column arithmetic at all.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from slmforge.config import LoopConfig, ModelConfig
from slmforge.errors import ReasoningError

__all__ = ["make_problems", "teacher_rationales", "cot_experiment", "prompt_of", "TEACHER_PROMPT"]

_NAMES = ["Ana", "Ben", "Chen", "Dina", "Eli", "Farah", "Gus", "Hana", "Ivo", "Jun", "Kim", "Lea", "Omar", "Zoe"]
_ITEMS = ["apples", "pens", "cards", "coins", "books", "stamps", "shells", "marbles", "eggs", "stickers"]
_PRONOUN = {name: ("She" if name in {"Ana", "Dina", "Farah", "Hana", "Kim", "Lea", "Zoe"} else "He") for name in _NAMES}
# operation -> sentence templates; the operand is {x}
_SENTENCES = {
    "+": ["{p} buys {x} more.", "{p} finds {x} more.", "{p} gets {x} more.", "{p} is given {x} more."],
    "-": ["{p} gives away {x}.", "{p} loses {x}.", "{p} sells {x}.", "{p} uses {x}."],
}
TEACHER_PROMPT = (
    "Solve the problem step by step. Write each calculation on its own line, like `12 + 7 = 19`, "
    "and end with `The answer is N.` where N is the final number.\n\nQuestion: {question}"
)


def prompt_of(question: str) -> str:
    """The prompt both trained models see: ``Question: ...\\nAnswer:``; the model writes the rest."""
    return f"Question: {question}\nAnswer:"


# --------------------------------------------------------------------------- problems


def make_problems(n: int, steps: int, digits: int, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` distinct multi-step arithmetic word problems with computed answers.

    A problem starts from a ``digits``-digit number and applies ``steps`` additions or subtractions of
    ``digits``-digit numbers; a subtraction is only drawn when it keeps the running value non-negative.

    Args:
        n: How many problems.
        steps: Operations per problem (the difficulty).
        digits: Digits of every number in the question.
        seed: The same (n, steps, digits, seed) always gives the same problems.

    Returns:
        Dicts with ``id``, ``question``, ``answer`` (an integer as text), ``steps``, ``digits`` and
        ``rationale``: one ``a + b = c`` line per step, then ``The answer is c.``.

    Raises:
        ReasoningError: n, steps or digits below 1, digits above 9, or fewer distinct problems exist
            than asked for.
    """
    for name, value, top in (("n", n, None), ("steps", steps, None), ("digits", digits, 9)):
        if value < 1 or (top is not None and value > top):
            bound = f"between 1 and {top}" if top else ">= 1"
            raise ReasoningError(f"make_problems: {name} must be {bound} (got {value}).")
    rng = random.Random(f"slmforge-cot/{seed}/{steps}/{digits}")
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 20 * n + 1000:
            raise ReasoningError(f"make_problems: only {len(out)} distinct problems with steps={steps}, "
                                 f"digits={digits}; ask for fewer or raise digits.")
        problem = _one_problem(rng, steps, digits)
        if problem["question"] in seen:
            continue
        seen.add(problem["question"])
        problem["id"] = f"s{steps}-d{digits}-seed{seed}-{len(out)}"
        out.append(problem)
    return out


def _one_problem(rng: random.Random, steps: int, digits: int) -> dict[str, Any]:
    lo, hi = (1 if digits == 1 else 10 ** (digits - 1)), 10**digits - 1
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    value = rng.randint(lo, hi)
    sentences, lines = [f"{name} has {value} {item}."], []
    for _ in range(steps):
        op = rng.choice("+-")
        if op == "-" and value < lo:  # nothing this size can be taken away: add instead
            op = "+"
        x = rng.randint(lo, hi) if op == "+" else rng.randint(lo, min(hi, value))
        new = value + x if op == "+" else value - x
        sentences.append(rng.choice(_SENTENCES[op]).format(p=_PRONOUN[name], x=x))
        lines.append(f"{value} {op} {x} = {new}")
        value = new
    sentences.append(f"How many {item} now?")
    lines.append(f"The answer is {value}.")
    return {"id": "", "question": " ".join(sentences), "answer": str(value), "steps": steps, "digits": digits,
            "rationale": "\n".join(lines)}


# --------------------------------------------------------------------------- teacher rationales


def teacher_rationales(problems: Sequence[dict[str, Any]], generator: Any, params: Any = None, samples: int = 1,
                       progress: bool = True) -> tuple[list[dict[str, Any]], float]:
    """Ask a teacher model (any ``slmforge.generate.Generator``, e.g. ``OpenAIGenerator``) to solve each
    problem step by step, and keep only the rationales whose last number is the verified answer.

    Args:
        problems: Items from ``make_problems`` (``question`` and ``answer`` are read).
        generator: The teacher; asked through ``chat`` with ``TEACHER_PROMPT``.
        params: ``SamplingParams`` (default: 384 new tokens, greedy for one sample, temperature 0.7 for more);
            ``n`` is set to ``samples``.
        samples: Rationales asked per problem; every distinct correct one is kept.
        progress: Show a progress bar.

    Returns:
        (kept items: the problem with the teacher's ``rationale`` and ``source: "teacher"``, the keep rate:
        kept rationales / rationales generated).

    Raises:
        ReasoningError: samples < 1.
    """
    from slmforge._progress import progress_bar
    from slmforge.evaluate.metrics import extract_answer
    from slmforge.generate import SamplingParams

    if samples < 1:
        raise ReasoningError(f"teacher_rationales: samples must be >= 1 (got {samples}).")
    base = params or SamplingParams(max_new_tokens=384, temperature=0.0 if samples == 1 else 0.7)
    asked = replace(base, n=samples)
    kept: list[dict[str, Any]] = []
    generated = 0
    with progress_bar(progress) as bar:
        task = bar.add_task("teacher rationales", total=len(problems), info="")
        for problem in problems:
            completions = generator.chat(
                [{"role": "user", "content": TEACHER_PROMPT.format(question=problem["question"])}], asked)
            generated += len(completions)
            texts = {c.text.strip() for c in completions}
            for text in sorted(texts):
                if _same_number(extract_answer(text, "last_number"), problem["answer"]):
                    kept.append({**problem, "rationale": text, "source": "teacher"})
            bar.update(task, advance=1, info=f"kept {len(kept)}/{generated}")
    return kept, (len(kept) / generated if generated else 0.0)


def _same_number(got: str | None, want: str) -> bool:
    """``"27"``, ``"27.0"`` and ``"27"`` agree; None or a non-number never does."""
    if got is None:
        return False
    try:
        return float(got) == float(want)
    except ValueError:
        return False


# --------------------------------------------------------------------------- tokenizer and training data


def char_tokenizer(texts: Sequence[str]) -> Any:
    """A character-level tokenizer over every character in ``texts`` (and digits, operators, punctuation), with
    ``<|bos|>`` added in front of every encoded text, ``<|eos|>``, ``<|pad|>`` and ``<|unk|>``.

    A BPE model with no merges is exactly one token per known character, and it is an ordinary Hugging
    Face fast tokenizer, so ``save_model_folder``/``TorchGenerator.from_pretrained`` handle it as any other.
    """
    from tokenizers import Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<|bos|>", "<|eos|>", "<|pad|>", "<|unk|>"]
    chars = sorted(set("".join(texts)) | set("0123456789 +-*/=.,:?\n"))
    vocab = {tok: i for i, tok in enumerate(specials + chars)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<|unk|>"))
    tok.add_special_tokens(specials)
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="<|bos|> $A", special_tokens=[("<|bos|>", 0)])
    fast: Any = PreTrainedTokenizerFast  # untyped in transformers
    return fast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>",
                unk_token="<|unk|>", model_input_names=["input_ids", "attention_mask"],
                clean_up_tokenization_spaces=False)  # decode(encode(x)) == x


class _AnswerExamples:
    """(prompt, target) pairs as ``<bos> prompt target <eos>`` with the loss on target and eos only:
    the ``BatchSource`` the shared training loop takes."""

    def __init__(self, pairs: Sequence[tuple[str, str]], tokenizer: Any) -> None:
        import torch

        self.pad = tokenizer.pad_token_id
        self.examples = []
        for prompt, target in pairs:
            head = tokenizer(prompt, add_special_tokens=True)["input_ids"]
            tail = tokenizer(target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            ids = torch.tensor(head + tail, dtype=torch.long)
            labels = torch.tensor([-100] * len(head) + tail, dtype=torch.long)
            self.examples.append((ids, labels))

    def __len__(self) -> int:
        return len(self.examples)

    def batch(self, indices: list[int]) -> dict[str, Any]:
        from slmforge.train import right_padded

        return right_padded([self.examples[i] for i in indices], self.pad)

    def tokens_in(self, batch: dict[str, Any]) -> int:
        return int(batch["attention_mask"].sum())

    def longest_target(self) -> int:
        return max(int((labels != -100).sum()) for _, labels in self.examples)


# --------------------------------------------------------------------------- the experiment

# The training a quiet 2-core CPU finishes, both models together, in about 10 minutes
# (benchmarks/cot_finetune.py).
DEFAULT_LOOP = LoopConfig(max_steps=1200, batch_size=32, lr=5e-3, warmup_steps=50, weight_decay=0.1,
                          precision="fp32", keep_checkpoints=1)
_KINDS = ("direct", "cot")


def cot_experiment(
    out: str | Path,
    preset: str | ModelConfig = "nano",
    train_problems: int = 4000,
    train_steps: Sequence[int] = (1, 2, 3, 4),
    eval_steps: Sequence[int] = (1, 2, 3, 4),
    eval_problems: int = 100,
    digits: int = 1,
    sc_samples: int = 5,
    temperature: float = 0.7,
    loop: LoopConfig | None = None,
    minutes: float | None = 16.0,
    seed: int = 0,
    teacher: Any = None,
    teacher_params: Any = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Train a direct-answer and a chain-of-thought model from scratch on the same problems, then compare
    direct, CoT (greedy) and CoT + self-consistency on held-out problems at each difficulty.

    Both models have the same size, tokenizer, training problems, optimizer steps and seed; they differ
    only in the target after ``Answer:``: the number, or the scratchpad ending ``The answer is N.``.
    Writes ``direct-model/`` and ``cot-model/`` (model folders ``TorchGenerator.from_pretrained`` loads),
    ``cot_results.json``, ``cot_table.md``, ``cot_accuracy.png`` and ``cot_predictions.jsonl`` into ``out``.

    Args:
        out: The output folder (training state goes to ``out/work``; a rerun resumes finished training).
        preset: A model preset name, or a whole ``ModelConfig``.
        train_problems: Training problems, split evenly over ``train_steps``.
        train_steps: Difficulties (operations per problem) trained on.
        eval_steps: Difficulties evaluated, each on ``eval_problems`` problems never trained on.
        eval_problems: Held-out problems per difficulty.
        digits: Digits per number, in training and evaluation.
        sc_samples: Samples voted over in self-consistency.
        temperature: Sampling temperature of self-consistency.
        loop: Training settings of each model (default ``DEFAULT_LOOP``).
        minutes: Training time limit of the two models together, split evenly (None: no limit). The CoT
            model trains first; when the limit stops it early, the direct model trains for as many steps.
        seed: Seeds the problems, the initialisation, the data order and the sampling.
        teacher: A ``Generator`` whose filtered rationales (``teacher_rationales``) replace the computed
            scratchpads; both models then train on the problems the teacher solved.
        teacher_params: ``SamplingParams`` for the teacher.
        progress: Show progress bars.
        log: Called with one line per notable event.

    Returns:
        The contents of ``cot_results.json``: per difficulty and overall, n, the three accuracies, mean
        generated tokens and McNemar p-values (direct vs CoT, CoT vs CoT + SC); the training of each model.

    Raises:
        ReasoningError: Bad problem counts, difficulties, samples or temperature.
    """
    t0, out = time.monotonic(), Path(out)
    _check_settings(train_problems, train_steps, eval_steps, eval_problems, sc_samples, temperature)
    model_cfg = preset if isinstance(preset, ModelConfig) else ModelConfig(preset=preset)
    base_loop = loop or DEFAULT_LOOP
    if minutes is not None:
        base_loop = base_loop.model_copy(update={"max_minutes": minutes / len(_KINDS)})
    train, teacher_info = _training_problems(train_problems, train_steps, digits, seed, teacher, teacher_params,
                                             progress)
    held_out = _held_out(eval_problems, eval_steps, digits, seed, {p["question"] for p in train})
    texts = [prompt_of(p["question"]) + " " + p["rationale"] for p in train + held_out]
    tok = char_tokenizer(texts)
    trained = _train_both(train, tok, model_cfg, base_loop, out, seed, progress, log)
    preds = _predict(trained, tok, base_loop.device, held_out, sc_samples, temperature, seed, progress)
    results: dict[str, Any] = {
        "settings": {"preset": model_cfg.model_dump(mode="json"), "train_problems": len(train),
                     "train_steps": list(train_steps), "eval_steps": list(eval_steps), "eval_problems": eval_problems,
                     "digits": digits, "sc_samples": sc_samples, "temperature": temperature, "seed": seed,
                     "loop": base_loop.model_dump(mode="json"), "vocab_size": len(tok)},
        "teacher": teacher_info,
        "training": {kind: info for kind, (_, info) in trained.items()},
        "by_steps": {str(s): _score([r for r in preds if r["steps"] == s]) for s in eval_steps},
        "overall": _score(preds),
    }
    results["seconds"] = round(time.monotonic() - t0, 1)
    _write_outputs(out, results, preds, sc_samples)
    return results


def _check_settings(train_problems: int, train_steps: Sequence[int], eval_steps: Sequence[int], eval_problems: int,
                    sc_samples: int, temperature: float) -> None:
    problems = []
    if train_problems < len(train_steps) or not train_steps:
        problems.append(f"train_problems ({train_problems}) must be at least one per training difficulty "
                        f"({len(train_steps)})")
    if eval_problems < 1 or not eval_steps:
        problems.append(f"eval_problems ({eval_problems}) must be >= 1, with at least one difficulty")
    if any(s < 1 for s in list(train_steps) + list(eval_steps)):
        problems.append(f"difficulties must be >= 1 step (train {list(train_steps)}, eval {list(eval_steps)})")
    if sc_samples < 1 or temperature <= 0:
        problems.append(f"self-consistency needs sc_samples >= 1 and temperature > 0 (got {sc_samples}, "
                        f"{temperature})")
    if problems:
        raise ReasoningError("cot_experiment: " + "; ".join(problems) + ".")


def _training_problems(total: int, train_steps: Sequence[int], digits: int, seed: int, teacher: Any,
                       teacher_params: Any, progress: bool) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """The training problems (an even split over the difficulties), with the teacher's rationales when
    one is given (then only the problems it solved)."""
    per = [total // len(train_steps) + (1 if i < total % len(train_steps) else 0) for i in range(len(train_steps))]
    train = [p for s, k in zip(train_steps, per) for p in make_problems(k, s, digits, seed)]
    if teacher is None:
        return train, None
    kept, rate = teacher_rationales(train, teacher, teacher_params, progress=progress)
    if not kept:
        raise ReasoningError(f"cot_experiment: the teacher solved none of the {len(train)} training problems "
                             "(no rationale ended with the right number); check the endpoint and its model.")
    return kept, {"problems": len(train), "kept": len(kept), "keep_rate": round(rate, 4)}


def _held_out(n: int, eval_steps: Sequence[int], digits: int, seed: int, exclude: set[str]) -> list[dict[str, Any]]:
    """``n`` problems per difficulty whose question is not among the training questions."""
    out = []
    for s in eval_steps:
        pool = make_problems(n + min(len(exclude), 4 * n), s, digits, seed + 1)
        fresh = [p for p in pool if p["question"] not in exclude][:n]
        if len(fresh) < n:
            raise ReasoningError(f"cot_experiment: fewer than {n} held-out problems with {s} steps and {digits} "
                                 "digits differ from the training problems; raise digits or lower the counts.")
        out.extend(fresh)
    return out


def _train_both(train: list[dict[str, Any]], tok: Any, model_cfg: ModelConfig, loop: LoopConfig, out: Path,
                seed: int, progress: bool, log: Callable[[str], None] | None) -> dict[str, tuple[Any, dict[str, Any]]]:
    """Both models, CoT first: when the time limit stops it early, the direct model trains for as many steps."""
    trained = {"cot": _train("cot", train, tok, model_cfg, loop, out, seed, progress, log)}
    same_steps = loop.model_copy(update={"max_steps": trained["cot"][1]["steps"]})
    trained["direct"] = _train("direct", train, tok, model_cfg, same_steps, out, seed, progress, log)
    return trained


def _train(kind: str, problems: list[dict[str, Any]], tok: Any, model_cfg: ModelConfig, loop: LoopConfig, out: Path,
           seed: int, progress: bool, log: Callable[[str], None] | None) -> tuple[Any, dict[str, Any]]:
    """Train one model from scratch with the shared loop and save it to ``out/<kind>-model``."""
    from slmforge.model import build_model, save_model_folder
    from slmforge.train import run_loop

    pairs = [(prompt_of(p["question"]), " " + (p["rationale"] if kind == "cot" else p["answer"])) for p in problems]
    source = _AnswerExamples(pairs, tok)
    ids = {"bos": tok.bos_token_id, "eos": tok.eos_token_id, "pad": tok.pad_token_id}
    model_cfg = model_cfg.model_copy(update={"max_position_embeddings": max(256, 2 * max(len(x) for x, _ in
                                                                                         source.examples))})
    model = build_model(model_cfg, len(tok), ids, seed=seed)
    loop = loop.model_copy(update={"save_every": loop.max_steps, "eval_every": loop.max_steps})  # keep the end
    digest = hashlib.sha256(json.dumps(pairs).encode()).hexdigest()[:16]
    run_key = {"cot_experiment": kind, "data": digest, "model": model_cfg.model_dump(mode="json"),
               "vocab": len(tok)}
    res = run_loop(model, source, None, loop, out / "work" / kind, seed, run_key, f"training {kind}", progress, log)
    model.to("cpu")
    save_model_folder(model, tok, out / f"{kind}-model")
    return model, {"steps": res.steps, "stopped_early": res.stopped_early, "final_loss": round(res.final_loss, 4),
                   "seconds": round(res.seconds, 1), "tokens": res.tokens, "examples": len(source),
                   "params": sum(p.numel() for p in model.parameters()), "longest_target": source.longest_target()}


# --------------------------------------------------------------------------- evaluation and report

_METHODS = ("direct", "cot", "cot_sc")
_CHUNK = 25  # prompts per batched generate call: large enough to batch, small enough for steady progress


def _predict(trained: dict[str, tuple[Any, dict[str, Any]]], tok: Any, device: str, problems: list[dict[str, Any]],
             sc_samples: int, temperature: float, seed: int, progress: bool) -> list[dict[str, Any]]:
    """Every held-out problem answered three ways: the direct model greedily, the CoT model greedily, and
    the CoT model's majority answer over ``sc_samples`` sampled rationales."""
    from slmforge._progress import progress_bar
    from slmforge.evaluate.metrics import extract_answer
    from slmforge.generate import SamplingParams, TorchGenerator

    gens = {kind: TorchGenerator(model, tok, device=device) for kind, (model, _) in trained.items()}
    longest = {kind: info["longest_target"] for kind, (_, info) in trained.items()}

    plans = {
        "direct": ("direct", SamplingParams(max_new_tokens=longest["direct"] + 4)),
        "cot": ("cot", SamplingParams(max_new_tokens=longest["cot"] + 16)),
        "cot_sc": ("cot", SamplingParams(max_new_tokens=longest["cot"] + 16, temperature=temperature, top_p=1.0,
                                         n=sc_samples, seed=seed)),
    }
    rows = [{"id": p["id"], "steps": p["steps"], "question": p["question"], "answer": p["answer"]} for p in problems]
    with progress_bar(progress) as bar:
        for method, (kind, params) in plans.items():
            task = bar.add_task(f"evaluating {method}", total=len(problems), info="")
            right = 0
            for start in range(0, len(problems), _CHUNK):
                chunk = rows[start : start + _CHUNK]
                outs = gens[kind].complete_batch([prompt_of(r["question"]) for r in chunk], params)
                for row, completions in zip(chunk, outs):
                    answers = [extract_answer(c.text, "last_number") for c in completions]
                    votes = Counter(a for a in answers if a is not None)
                    answer = votes.most_common(1)[0][0] if votes else None  # ties: the first sample's answer
                    row[method] = {"answer": answer, "correct": _same_number(answer, row["answer"]),
                                   "tokens": sum(c.tokens for c in completions),
                                   "text": completions[0].text if len(completions) == 1 else None,
                                   "samples": answers if len(completions) > 1 else None}
                    right += row[method]["correct"]
                done = min(start + _CHUNK, len(problems))
                bar.update(task, completed=done, info=f"accuracy {right / done:.2f}")
    return rows


def _score(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Accuracies, mean generated tokens and McNemar's test (direct vs CoT, CoT vs CoT + SC) over ``rows``."""
    from slmforge.evaluate.stats import mcnemar

    correct = {m: [bool(r[m]["correct"]) for r in rows] for m in _METHODS}
    tests = {"direct_vs_cot": mcnemar(correct["direct"], correct["cot"]),
             "cot_vs_cot_sc": mcnemar(correct["cot"], correct["cot_sc"])}
    return {
        "n": len(rows),
        "accuracy": {m: round(sum(v) / len(v), 4) for m, v in correct.items()},
        "tokens_mean": {m: round(sum(r[m]["tokens"] for r in rows) / len(rows), 1) for m in _METHODS},
        "p_value": {k: t["p_value"] for k, t in tests.items()},
        "mcnemar": tests,
    }


def _table(results: dict[str, Any], sc_samples: int) -> str:
    head = (f"| steps | n | direct | CoT | CoT + SC ({sc_samples}) | tokens direct | tokens CoT | tokens CoT + SC "
            "| p direct vs CoT | p CoT vs CoT + SC |")
    lines = [head, "|" + "---|" * 10]
    entries = [(s, r) for s, r in results["by_steps"].items()] + [("all", results["overall"])]
    for label, r in entries:
        a, t, p = r["accuracy"], r["tokens_mean"], r["p_value"]
        lines.append(f"| {label} | {r['n']} | {a['direct']:.2f} | {a['cot']:.2f} | {a['cot_sc']:.2f} | "
                     f"{t['direct']:.1f} | {t['cot']:.1f} | {t['cot_sc']:.1f} | {p['direct_vs_cot']:.2g} | "
                     f"{p['cot_vs_cot_sc']:.2g} |")
    return "\n".join(lines) + "\n"


def _write_outputs(out: Path, results: dict[str, Any], preds: list[dict[str, Any]], sc_samples: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    (out / "cot_results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "cot_predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in preds))
    (out / "cot_table.md").write_text(_table(results, sc_samples))
    steps = [int(s) for s in results["by_steps"]]
    fig, ax = plt.subplots(figsize=(6, 4))
    labels = {"direct": "direct answer", "cot": "CoT (greedy)", "cot_sc": f"CoT + self-consistency ({sc_samples})"}
    for method, label in labels.items():
        ax.plot(steps, [results["by_steps"][str(s)]["accuracy"][method] for s in steps], "o-", label=label)
    ax.set_xlabel("operations per problem")
    ax.set_ylabel("accuracy (held-out)")
    ax.set_xticks(steps)
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"{results['settings']['digits']}-digit word problems, "
                 f"{results['training']['cot']['params'] / 1e6:.2f}M-parameter models")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "cot_accuracy.png", dpi=110)
    plt.close(fig)
