"""Verifiers for best-of-N and tree search: a reply in, a score out (higher is better)."""

from __future__ import annotations

import re
from typing import Any

from slmforge.errors import ReasoningError
from slmforge.reasoning.strategies import Prompt, Verifier


def regex_verifier(pattern: str) -> Verifier:
    """1.0 when the reply matches ``pattern`` (a rule the answer must satisfy), else 0.0.

    Raises:
        ReasoningError: An invalid pattern.
    """
    try:
        rx = re.compile(pattern)
    except re.error as e:
        raise ReasoningError(f"The verifier pattern {pattern!r} is not a regular expression: {e}.") from None
    return lambda text: 1.0 if rx.search(text) else 0.0


def sandbox_verifier(tests: str, entry_point: str | None = None, prompt: str = "", allow_weak: bool = False
                     ) -> Verifier:
    """1.0 when the reply's code (its first fenced block, else the whole reply, after ``prompt`` for a
    completion that continues a function) passes ``tests`` in the evaluation sandbox, else 0.0."""
    from slmforge.evaluate.metrics import extract_answer
    from slmforge.evaluate.sandbox import check_program

    def verify(text: str) -> float:
        code = extract_answer(text, "code_block") or text
        whole = code.lstrip().startswith(("def ", "import ", "from ", "class "))  # not a continuation
        program = code if whole or not prompt else prompt + code
        return 1.0 if check_program(program, tests, entry_point, allow_weak=allow_weak).status == "passed" else 0.0

    return verify


def loglik_verifier(gen: Any, prompt: Prompt) -> Verifier:
    """The model's own mean log-likelihood per character of the reply given the prompt (a length-fair
    confidence score).

    Raises:
        ReasoningError: An engine that cannot score text (no ``loglikelihood`` capability: HTTP endpoints).
    """
    from slmforge.generate import as_engine

    engine = as_engine(gen)
    if not engine.capabilities.loglikelihood:
        raise ReasoningError(f"The {engine.engine} engine cannot score text by log-likelihood; use a rule or "
                             "sandbox verifier, or self-consistency.")
    context = prompt if isinstance(prompt, str) else engine.render_chat(prompt)

    def verify(text: str) -> float:
        if not text.strip():
            return float("-inf")
        return engine.loglikelihood([(context, text)])[0] / max(len(text), 1)  # type: ignore[attr-defined]

    return verify
