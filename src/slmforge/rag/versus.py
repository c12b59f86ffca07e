"""RAG vs fine-tuning vs both, on the same questions with the same answer metrics.

The questions are ``rag.evaluate.make_questions`` (made from the corpus, with the document's own
sentences as reference answers). Each configuration answers every question greedily:

- ``fine-tuned``: the fine-tuned model alone (what it learned in its weights);
- ``pretrained + RAG``: the pretrained model answering from retrieved sources;
- ``fine-tuned + RAG``: the fine-tuned model answering from retrieved sources.

Scored per item by token F1 and ROUGE-L against the reference; each configuration is compared with
``fine-tuned`` by ``slmforge.evaluate.stats.compare`` (paired bootstrap interval and permutation test),
the test ``slmforge eval compare`` uses.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from slmforge.rag.answer import answer
from slmforge.rag.evaluate import Question
from slmforge.rag.index import Index


def _rouge_l(pred: str, ref: str) -> float:
    from slmforge.evaluate.metrics import rouge

    return float(rouge([pred], [ref])["rougeL"])


def answers(generator: Any, index: Index | None, questions: Sequence[Question], k: int, max_new_tokens: int,
            min_score: float, progress: bool = True, label: str = "") -> list[str]:
    """Each question's answer: the model alone (``index`` None) or from the index's sources."""
    from slmforge._progress import progress_bar
    from slmforge.generate import SamplingParams

    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, repetition_penalty=1.1)
    out = []
    with progress_bar(progress) as bar:
        task = bar.add_task(f"answering: {label}", total=len(questions), info="")
        for q in questions:
            if index is None:
                out.append(generator.chat([{"role": "user", "content": q.question}], params)[0].text)
            else:
                out.append(answer(index, generator, q.question, "hybrid", k, min_score=min_score,
                                  max_new_tokens=max_new_tokens).text)
            bar.update(task, advance=1)
    return out


def compare_configurations(configs: dict[str, tuple[Any, Index | None]], questions: Sequence[Question],
                           baseline: str, k: int = 3, max_new_tokens: int = 64, min_score: float = 0.25,
                           progress: bool = True) -> list[dict[str, Any]]:
    """One row per configuration: mean token F1 and ROUGE-L, and the paired comparison with ``baseline``."""
    texts = {name: answers(gen, index, questions, k, max_new_tokens, min_score, progress, name)
             for name, (gen, index) in configs.items()}
    return score_answers(texts, [q.answer for q in questions], baseline)


def score_answers(texts: dict[str, list[str]], references: Sequence[str], baseline: str) -> list[dict[str, Any]]:
    """Each configuration's answers (name -> one text per question) scored against the references: mean
    token F1 and ROUGE-L, and, except for ``baseline``, the paired bootstrap interval and permutation test
    of its token F1 against the baseline's (``slmforge.evaluate.stats.compare``, as ``eval compare``)."""
    from slmforge.evaluate.metrics import token_f1
    from slmforge.evaluate.stats import compare

    n = len(references)
    scores = {name: {"token_f1": [token_f1(t, r) for t, r in zip(ts, references)],
                     "rougeL": [_rouge_l(t, r) for t, r in zip(ts, references)]} for name, ts in texts.items()}
    rows = []
    for name, s in scores.items():
        row: dict[str, Any] = {"configuration": name, "questions": n,
                               "token_f1": round(sum(s["token_f1"]) / n, 4) if n else 0.0,
                               "rougeL": round(sum(s["rougeL"]) / n, 4) if n else 0.0}
        if name != baseline and n:
            c = compare(scores[baseline]["token_f1"], s["token_f1"])
            row.update({f"vs {baseline}": c["verdict"], "diff": round(c["diff"], 4),
                        "ci": [round(c["ci_low"], 4), round(c["ci_high"], 4)], "p_value": round(c["p_value"], 4)})
        rows.append(row)
    return rows
