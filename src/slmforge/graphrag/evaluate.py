"""Vector RAG vs Graph RAG vs hybrid on two-document questions written independently of the graph.

``graphrag.multihop_questions`` builds its questions from the graph's own entities and bridges, which
favours graph retrieval by construction. Here the questions come from ``rag.questions.linked_questions``
(a teacher model writes a question and its answer from two documents the corpus itself links: the first
names the second's full dotted title), so neither retrieval had a hand in them. Each retrieval is scored
twice: the documents it finds (both documents among the top ``k`` chunks' documents, and the share found),
and the answer a generator writes from its top ``k`` chunks (token F1 and ROUGE-L against the teacher's
reference, each compared with vector retrieval by the paired test of ``slmforge eval compare``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from slmforge.graphrag import Graph, graph_retrieve

VECTOR = "vector (hybrid)"


def _retrievals(graph: Graph, index: Any, k: int) -> dict[str, Callable[[str], list[Any]]]:
    """Each retrieval as question -> its top ``k`` hits (``rag.Hit``: graph results carry no scores)."""
    from slmforge.rag.retrieve import Hit, retrieve

    def from_graph(mode: str) -> Callable[[str], list[Any]]:
        def run(q: str) -> list[Any]:
            ids = [r["id"] for r in graph_retrieve(graph, index, q, mode, k)]
            chunks = index.chunks(ids)
            return [Hit(i, chunks[i], 0.0, 0.0) for i in ids if i in chunks]
        return run

    return {VECTOR: lambda q: retrieve(index, q, "hybrid", k),
            "graph (multihop)": from_graph("multihop"),
            "graph + vector (hybrid)": from_graph("hybrid")}


def compare_linked(graph: Graph, index: Any, questions: Sequence[dict[str, Any]], generator: Any = None,
                   k: int = 3, max_new_tokens: int = 64, progress: bool = True) -> dict[str, Any]:
    """Documents found and (with a ``generator``) answers scored, per retrieval.

    Args:
        questions: ``{"question", "answer", "docs": [first, second]}`` dicts (``linked_questions``).
        generator: Answers from each retrieval's chunks (``rag.answer.answer_from``); None: documents only.

    Returns:
        ``{"rows": [{"retrieval", f"both@{k}", f"recall@{k}", and with a generator "token_f1", "rougeL" and
        the paired comparison with vector retrieval}], "answers": {retrieval: [text, ...]}}``.
    """
    from slmforge._progress import progress_bar
    from slmforge.rag.answer import answer_from
    from slmforge.rag.versus import score_answers

    runs = _retrievals(graph, index, k)
    found: dict[str, list[float]] = {name: [] for name in runs}
    texts: dict[str, list[str]] = {name: [] for name in runs}
    with progress_bar(progress) as bar:
        task = bar.add_task("two-document questions", total=len(questions) * len(runs), info="")
        for name, run in runs.items():
            bar.update(task, info=name)
            for q in questions:
                hits = run(q["question"])
                got = {h.chunk.doc_id for h in hits} & set(q["docs"])
                found[name].append(len(got) / 2)
                if generator is not None:
                    texts[name].append(answer_from(generator, q["question"], hits, max_new_tokens).text
                                       if hits else "")
                bar.update(task, advance=1)
    n = max(1, len(questions))
    rows = [{"retrieval": name, "questions": len(questions), f"both@{k}": round(sum(f == 1.0 for f in fs) / n, 4),
             f"recall@{k}": round(sum(fs) / n, 4)} for name, fs in found.items()]
    if generator is not None:
        scored = score_answers(texts, [q["answer"] for q in questions], VECTOR)
        for row, s in zip(rows, scored):
            row.update({key: v for key, v in s.items() if key not in ("configuration", "questions")})
    return {"rows": rows, "answers": texts if generator is not None else {}}
