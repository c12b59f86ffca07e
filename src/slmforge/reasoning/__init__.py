"""Reasoning: test-time compute strategies over any ``Generator``, by name.

    from slmforge.reasoning import run_strategy, Budget
    r = run_strategy("sc", gen, "Question: Ana has 3 boxes of 12 pens ...\\nAnswer:", n=8,
                     budget=Budget(max_tokens=3000))
    print(r.answer, r.votes, r.tokens, r.samples)

Strategies: ``direct``, ``cot`` (step-by-step cue), ``sc`` (self-consistency), ``bon`` (best-of-N with a
verifier), ``tot`` (tree-of-thought search over steps), ``refine`` (self-refine), ``adaptive`` (cheap
samples first, more only on disagreement) and ``auto`` (adaptive). ``slmforge proxy`` applies them per
request in front of any OpenAI-compatible endpoint; ``slmforge reason bench`` measures accuracy, tokens and
latency per strategy on an evaluation suite.
"""

from __future__ import annotations

import re
from typing import Any

from slmforge.errors import ReasoningError
from slmforge.reasoning.strategies import (
    COT_CUE,
    Budget,
    Call,
    Extractor,
    Prompt,
    ReasonResult,
    Verifier,
    adaptive,
    best_of_n,
    chain_of_thought,
    direct,
    extractor,
    self_consistency,
    self_refine,
    tree_search,
    with_cue,
)
from slmforge.reasoning.verifiers import loglik_verifier, regex_verifier, sandbox_verifier

__all__ = [
    "STRATEGIES", "run_strategy", "split_model_prefix", "Budget", "Call", "ReasonResult", "Prompt", "Extractor",
    "Verifier", "COT_CUE", "direct", "chain_of_thought", "self_consistency", "best_of_n", "tree_search",
    "self_refine", "adaptive", "extractor", "with_cue", "regex_verifier", "sandbox_verifier", "loglik_verifier",
]

# name -> what it does (the CLI's and the proxy's help, and the model-name prefixes)
STRATEGIES = {
    "direct": "one greedy reply",
    "cot": "one greedy reply with a step-by-step cue",
    "sc": "self-consistency: n samples, majority answer",
    "bon": "best-of-N: n samples, the verifier's best",
    "tot": "tree-of-thought search over reasoning steps",
    "refine": "self-refine: answer, critique, revise",
    "adaptive": "a few samples; more only when they disagree",
    "auto": "adaptive",
}
_PREFIX = re.compile(r"^(direct|cot|sc|bon|tot|refine|adaptive|auto)(\d*)-(.+)$")


def split_model_prefix(model: str) -> tuple[str | None, int | None, str]:
    """``sc8-mymodel`` -> ("sc", 8, "mymodel"); ``cot-m`` -> ("cot", None, "m"); a name without a strategy
    prefix -> (None, None, name). OptiLLM's convention of naming the approach in the model name."""
    m = _PREFIX.match(model)
    if not m:
        return None, None, model
    return m.group(1), int(m.group(2)) if m.group(2) else None, m.group(3)


def run_strategy(name: str, gen: Any, prompt: Prompt, n: int = 5, params: Any = None, budget: Budget | None = None,
                 extract: Extractor | None = None, verifier: Verifier | None = None, temperature: float = 0.7,
                 cue: str | None = COT_CUE) -> ReasonResult:
    """Run the strategy ``name`` (see ``STRATEGIES``); ``n`` is the sample count of sc and bon, the most
    samples of adaptive, the breadth of tot and the rounds of refine.

    ``cue`` is the step-by-step instruction the reasoning strategies add (None: the prompt as it is, for a
    model fine-tuned to reason, or one whose prompt already asks). best-of-N without a ``verifier`` scores by the model's log-likelihood where the engine can; where it
    cannot (an HTTP endpoint), the samples vote as in self-consistency.

    Raises:
        ReasoningError: An unknown strategy or n < 1.
    """
    if n < 1:
        raise ReasoningError(f"n must be >= 1 for strategy {name!r} (got {n}).")
    b = budget or Budget()
    if name == "direct":
        return direct(gen, prompt, params, b, extract)
    if name == "cot":
        return chain_of_thought(gen, prompt, params, b, extract, cue=cue or "")
    if name == "sc":
        return self_consistency(gen, prompt, n, params, b, extract, temperature, cue=cue)
    if name == "bon":
        if verifier is None and not _scores_text(gen):  # nothing to verify with: the samples vote
            r = self_consistency(gen, prompt, n, params, b, extract, temperature, cue=cue)
            r.strategy = "bon"
            return r
        return best_of_n(gen, prompt, verifier or loglik_verifier(gen, prompt), n, params, b, extract,
                         temperature, cue=cue)
    if name == "tot":
        return tree_search(gen, prompt, verifier, breadth=n, params=params, budget=b, extract=extract,
                           temperature=temperature, cue=cue)
    if name == "refine":
        return self_refine(gen, prompt, n if n < 5 else 2, params, b, extract, cue=cue)
    if name in ("adaptive", "auto"):
        r = adaptive(gen, prompt, first=min(3, n), max_n=max(n, 3), params=params, budget=b, extract=extract,
                     temperature=temperature, cue=cue)
        r.strategy = name
        return r
    raise ReasoningError(f"Unknown reasoning strategy {name!r}; choose one of {', '.join(STRATEGIES)}.")


def _scores_text(gen: Any) -> bool:
    from slmforge.generate import as_engine

    return as_engine(gen).capabilities.loglikelihood
