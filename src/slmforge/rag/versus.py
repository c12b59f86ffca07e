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
    from slmforge.evaluate.metrics import token_f1
    from slmforge.evaluate.stats import compare

    scores: dict[str, dict[str, list[float]]] = {}
    for name, (gen, index) in configs.items():
        texts = answers(gen, index, questions, k, max_new_tokens, min_score, progress, name)
        scores[name] = {"token_f1": [token_f1(t, q.answer) for t, q in zip(texts, questions)],
                        "rougeL": [_rouge_l(t, q.answer) for t, q in zip(texts, questions)]}
    rows = []
    for name, s in scores.items():
        row: dict[str, Any] = {"configuration": name, "questions": len(questions),
                               "token_f1": round(sum(s["token_f1"]) / len(questions), 4),
                               "rougeL": round(sum(s["rougeL"]) / len(questions), 4)}
        if name != baseline:
            c = compare(scores[baseline]["token_f1"], s["token_f1"])
            row.update({f"vs {baseline}": c["verdict"], "diff": round(c["diff"], 4),
                        "ci": [round(c["ci_low"], 4), round(c["ci_high"], 4)], "p_value": round(c["p_value"], 4)})
        rows.append(row)
    return rows
