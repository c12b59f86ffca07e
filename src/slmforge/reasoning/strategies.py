"""Test-time compute strategies: plain functions over a ``Generator``, each within a token and time budget,
each returning the answer and a record of every call it made.

    from slmforge.reasoning import self_consistency, Budget
    r = self_consistency(gen, "Question: ...\\nAnswer:", n=8, budget=Budget(max_tokens=2000))
    r.answer, r.votes, r.tokens, len(r.calls)

A prompt is a string (``complete``) or a message list (``chat``). Answers are read from replies by an
extractor (``extractor("last_number")``, any ``slmforge.evaluate`` extraction method, or a function).
"""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from slmforge.errors import ReasoningError

Prompt = str | list[dict[str, Any]]
Extractor = Callable[[str], str | None]
Verifier = Callable[[str], float]
COT_CUE = "Let's think step by step."


@dataclass
class Budget:
    """What one request may spend, all internal calls together."""

    max_tokens: int = 4096
    max_seconds: float = 120.0


@dataclass
class Call:
    """One internal call."""

    kind: str  # "answer", "sample", "step", "critique", "revise", "verify"
    text: str
    tokens: int
    seconds: float
    finish_reason: str = "stop"


@dataclass
class ReasonResult:
    strategy: str
    answer: str | None  # the extracted answer (None: none found)
    text: str  # the chosen reply, whole
    calls: list[Call] = field(default_factory=list)
    votes: dict[str, int] | None = None  # answer -> samples, for the voting strategies
    stopped: str = "done"  # "done", "max_tokens", "max_seconds"
    seconds: float = 0.0

    @property
    def tokens(self) -> int:
        return sum(c.tokens for c in self.calls)

    @property
    def samples(self) -> int:
        return sum(1 for c in self.calls if c.kind in ("answer", "sample"))


def extractor(method: str = "last_number", arg: str | None = None) -> Extractor:
    """An extractor by ``slmforge.evaluate`` method name (``last_number``, ``regex``, ``first_line``...);
    ``auto`` takes the last number, else the first line, normalised.

    Raises:
        ReasoningError: An unknown method.
    """
    from slmforge.evaluate.metrics import EXTRACTION_METHODS, extract_answer, normalize_answer

    if method == "auto":
        def auto(text: str) -> str | None:
            value = extract_answer(text, "last_number") or extract_answer(text, "first_line")
            return normalize_answer(value) if value is not None else None

        return auto
    if method not in EXTRACTION_METHODS:
        raise ReasoningError(f"Unknown answer extraction {method!r}; choose auto or one of "
                             f"{', '.join(sorted(EXTRACTION_METHODS))}.")
    return lambda text: extract_answer(text, method, arg)


class _Run:
    """Calls against a budget: each call's ``max_new_tokens`` is capped by the tokens left."""

    def __init__(self, gen: Any, params: Any, budget: Budget, strategy: str) -> None:
        from slmforge.generate import SamplingParams

        self.gen, self.budget = gen, budget
        self.params = params or SamplingParams(max_new_tokens=256)
        self.result = ReasonResult(strategy, None, "")
        self.start = time.perf_counter()

    def left(self) -> int:
        return self.budget.max_tokens - self.result.tokens

    def exhausted(self) -> bool:
        if self.left() <= 0:
            self.result.stopped = "max_tokens"
        elif time.perf_counter() - self.start > self.budget.max_seconds:
            self.result.stopped = "max_seconds"
        else:
            return False
        return True

    def generate(self, prompt: Prompt, kind: str, n: int = 1, temperature: float | None = None,
                 stop: list[str] | None = None, seed: int | None = None) -> list[str]:
        """``n`` replies (fewer tokens each when the budget is short); [] when the budget is spent."""
        if self.exhausted():
            return []
        per = max(1, min(self.params.max_new_tokens, self.left() // max(n, 1)))
        t = self.params.temperature if temperature is None else temperature
        params = replace(self.params, n=n, max_new_tokens=per, temperature=t,
                         stop=list(stop) if stop is not None else list(self.params.stop),
                         seed=seed if seed is not None else self.params.seed)
        t0 = time.perf_counter()
        replies = self.gen.complete(prompt, params) if isinstance(prompt, str) else self.gen.chat(prompt, params)
        seconds = (time.perf_counter() - t0) / max(len(replies), 1)
        for c in replies:
            self.result.calls.append(Call(kind, c.text, c.tokens, seconds, c.finish_reason))
        return [c.text for c in replies]

    def done(self, text: str, extract: Extractor) -> ReasonResult:
        self.result.text, self.result.answer = text, extract(text) if text else None
        self.result.seconds = time.perf_counter() - self.start
        return self.result


def with_cue(prompt: Prompt, cue: str = COT_CUE) -> Prompt:
    """The prompt asking for step-by-step reasoning: the cue after a text prompt, or appended to the last
    user message."""
    if isinstance(prompt, str):
        return f"{prompt.rstrip()} {cue}"
    messages = [dict(m) for m in prompt]
    for m in reversed(messages):
        if m.get("role") == "user":
            m["content"] = f"{m.get('content') or ''}\n\n{cue}".lstrip()
            break
    return messages


def _vote(texts: list[str], extract: Extractor) -> tuple[str, Counter[str]]:
    """The reply of the earliest sample with the most common answer, and the tally (no answer: no vote)."""
    answers = [extract(t) for t in texts]
    tally = Counter(a for a in answers if a is not None)
    if not tally:
        return (texts[0] if texts else ""), tally
    best = max(tally.values())
    winner = next(a for a in answers if a is not None and tally[a] == best)
    return texts[answers.index(winner)], tally


def _check_n(n: int, name: str) -> None:
    if n < 1:
        raise ReasoningError(f"{name} needs n >= 1 samples (got {n}).")


# --------------------------------------------------------------------------- strategies


def direct(gen: Any, prompt: Prompt, params: Any = None, budget: Budget | None = None,
           extract: Extractor | None = None) -> ReasonResult:
    """One greedy reply, as asked."""
    run = _Run(gen, params, budget or Budget(), "direct")
    texts = run.generate(prompt, "answer", temperature=0.0)
    return run.done(texts[0] if texts else "", extract or extractor("auto"))


def chain_of_thought(gen: Any, prompt: Prompt, params: Any = None, budget: Budget | None = None,
                     extract: Extractor | None = None, cue: str = COT_CUE) -> ReasonResult:
    """One greedy reply to the prompt with a step-by-step cue."""
    run = _Run(gen, params, budget or Budget(), "cot")
    texts = run.generate(with_cue(prompt, cue) if cue else prompt, "answer", temperature=0.0)
    return run.done(texts[0] if texts else "", extract or extractor("auto"))


def self_consistency(gen: Any, prompt: Prompt, n: int = 5, params: Any = None, budget: Budget | None = None,
                     extract: Extractor | None = None, temperature: float = 0.7, cue: str | None = COT_CUE
                     ) -> ReasonResult:
    """``n`` sampled replies (one call, ``n`` choices); the majority answer wins (Wang et al., 2023)."""
    _check_n(n, "self-consistency")
    extract = extract or extractor("auto")
    run = _Run(gen, params, budget or Budget(), "sc")
    texts = run.generate(with_cue(prompt, cue) if cue else prompt, "sample", n=n, temperature=temperature)
    text, tally = _vote(texts, extract)
    run.result.votes = dict(tally)
    return run.done(text, extract)


def best_of_n(gen: Any, prompt: Prompt, verifier: Verifier, n: int = 5, params: Any = None,
              budget: Budget | None = None, extract: Extractor | None = None, temperature: float = 0.7,
              cue: str | None = None) -> ReasonResult:
    """``n`` sampled replies; the one the verifier scores highest wins (the earliest among equals)."""
    _check_n(n, "best-of-N")
    run = _Run(gen, params, budget or Budget(), "bon")
    texts = run.generate(with_cue(prompt, cue) if cue else prompt, "sample", n=n, temperature=temperature)
    scores = [verifier(t) for t in texts]
    run.result.votes = {f"sample {i}": round(s, 4) for i, s in enumerate(scores)}  # type: ignore[misc]
    best = max(range(len(texts)), key=lambda i: (scores[i], -i)) if texts else None
    return run.done(texts[best] if best is not None else "", extract or extractor("auto"))


def self_refine(gen: Any, prompt: Prompt, rounds: int = 2, params: Any = None, budget: Budget | None = None,
                extract: Extractor | None = None, cue: str | None = COT_CUE) -> ReasonResult:
    """Answer, then up to ``rounds`` times: critique the answer and, unless the critique finds it
    correct, revise it (Madaan et al., 2023)."""
    run = _Run(gen, params, budget or Budget(), "refine")
    question = _question(prompt)
    texts = run.generate(with_cue(prompt, cue) if cue else prompt, "answer", temperature=0.0)
    answer = texts[0] if texts else ""
    for _ in range(rounds):
        critique = run.generate([{"role": "user", "content": f"Question: {question}\nProposed answer: {answer}\n\n"
                                  "Check the answer step by step. If it is correct, reply CORRECT. Otherwise say "
                                  "what is wrong."}], "critique", temperature=0.0)
        if not critique or re.search(r"\bCORRECT\b", critique[0]) and "INCORRECT" not in critique[0].upper():
            break
        revised = run.generate([{"role": "user", "content": f"Question: {question}\nPrevious answer: {answer}\n"
                                 f"Feedback: {critique[0]}\n\nWrite a corrected answer, step by step."}],
                               "revise", temperature=0.0)
        if not revised:
            break
        answer = revised[0]
    return run.done(answer, extract or extractor("auto"))


def adaptive(gen: Any, prompt: Prompt, first: int = 3, max_n: int = 12, step: int = 3, agreement: float = 0.6,
             params: Any = None, budget: Budget | None = None, extract: Extractor | None = None,
             temperature: float = 0.7, cue: str | None = COT_CUE) -> ReasonResult:
    """Adaptive compute: ``first`` samples; when they all agree, stop; otherwise ``step`` more at a time
    until the leading answer holds ``agreement`` of the votes or ``max_n`` samples are spent. Easy items
    cost ``first`` samples, hard ones up to ``max_n``."""
    _check_n(first, "adaptive compute")
    extract = extract or extractor("auto")
    run = _Run(gen, params, budget or Budget(), "adaptive")
    asked = with_cue(prompt, cue) if cue else prompt
    texts = run.generate(asked, "sample", n=first, temperature=temperature)
    while texts:
        _, tally = _vote(texts, extract)
        lead = max(tally.values()) if tally else 0
        if (lead == len(texts)) or lead / len(texts) >= agreement and len(texts) > first or len(texts) >= max_n:
            break
        more = run.generate(asked, "sample", n=min(step, max_n - len(texts)), temperature=temperature,
                            seed=None if run.params.seed is None else run.params.seed + len(texts))
        if not more:
            break
        texts += more
    text, tally = _vote(texts, extract)
    run.result.votes = dict(tally)
    return run.done(text, extract)


def tree_search(gen: Any, prompt: Prompt, scorer: Verifier | None = None, breadth: int = 3, beam: int = 2,
                depth: int = 4, params: Any = None, budget: Budget | None = None, extract: Extractor | None = None,
                temperature: float = 0.8, cue: str | None = COT_CUE) -> ReasonResult:
    """Tree-of-thought search over reasoning steps (lines): from each of the ``beam`` best partial solutions,
    sample ``breadth`` next steps, score every new partial (``scorer``; default: agreement of its answer
    with the other finished ones, then length), keep the best ``beam``; a partial whose step holds an
    answer (or whose reply ended) is finished. After ``depth`` steps the best finished solution wins
    (Yao et al., 2023, breadth-first variant).

    The prompt is continued as text (a message list is rendered by the engine's chat template; an HTTP
    endpoint gets the contents joined), so every step extends the same reply.
    """
    from slmforge.generate import as_engine

    extract = extract or extractor("auto")
    run = _Run(gen, params, budget or Budget(), "tot")
    base = with_cue(prompt, cue) if cue else prompt
    text_prompt = base if isinstance(base, str) else as_engine(gen).render_chat(base)
    frontier, finished = [""], []
    for _ in range(depth):
        grown: list[str] = []
        for partial in frontier:
            steps = run.generate(text_prompt + partial, "step", n=breadth, temperature=temperature, stop=["\n"])
            for s in steps:
                (finished if extract(s) is not None and _answered(s) else grown).append(partial + s + "\n")
        if not grown or run.result.stopped != "done":
            break
        score = scorer or (lambda t: -len(t))
        frontier = sorted(dict.fromkeys(grown), key=score, reverse=True)[:beam]
    pool = finished or frontier
    if scorer is not None:
        text = max(pool, key=scorer)
    else:
        text, tally = _vote(pool, extract)
        run.result.votes = dict(tally)
    return run.done(text.strip(), extract)


def _answered(step: str) -> bool:
    """A step that states the answer ends its branch (an intermediate "3 * 4 = 12" does not)."""
    return bool(re.search(r"\banswer\b|\btherefore\b", step, re.IGNORECASE))


def _question(prompt: Prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    return next((str(m.get("content") or "") for m in reversed(prompt) if m.get("role") == "user"), "")
