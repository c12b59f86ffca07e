"""``slmforge rag eval``: how well retrieval finds the passage a question was made from.

Questions come from the corpus itself, through the data stage's template synthesis
(``slmforge.data.synth.template_pairs``: questions about what a document names or defines, answered by
the document's own sentences). A retrieved chunk is relevant when it comes from the question's document
and holds most of the answer's words (``relevant``). For each chunker x retrieval mode: recall@k (the
answer's passage is among the first k), MRR (1 / rank of the first relevant chunk) and nDCG@k (binary
relevance; the ideal ranking puts every relevant chunk of the document first).
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slmforge.rag.chunkers import Chunk
from slmforge.rag.index import ChunkSettings, Index
from slmforge.rag.retrieve import retrieve

_WORD = re.compile(r"\w+")


@dataclass
class Question:
    question: str
    answer: str
    doc_id: str


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def relevant(chunk: Chunk, q: Question, share: float = 0.5) -> bool:
    """The chunk is from the question's document and holds at least ``share`` of the answer's first 30 words."""
    if chunk.doc_id != q.doc_id:
        return False
    want = set(_words(q.answer)[:30])
    return bool(want) and len(want & set(_words(chunk.text))) >= share * len(want)


def recall_at_k(flags: Sequence[bool], k: int) -> float:
    return 1.0 if any(flags[:k]) else 0.0


def reciprocal_rank(flags: Sequence[bool]) -> float:
    return next((1.0 / (i + 1) for i, f in enumerate(flags) if f), 0.0)


def ndcg_at_k(flags: Sequence[bool], k: int, n_relevant: int) -> float:
    """Binary-relevance nDCG@k; ``n_relevant`` relevant items exist in the whole index."""
    dcg = sum(1.0 / math.log2(i + 2) for i, f in enumerate(flags[:k]) if f)
    ideal = sum(1.0 / math.log2(i + 2) for i in range(min(k, n_relevant)))
    return dcg / ideal if ideal else 0.0


def make_questions(documents: Sequence[Any], n: int = 200, seed: int = 0) -> list[Question]:
    """Up to ``n`` questions from the documents (one per document, documents drawn by ``seed``)."""
    from slmforge.data.synth import template_pairs

    docs = list(documents)
    random.Random(seed).shuffle(docs)
    out: list[Question] = []
    for d in docs:
        pairs = [p for p in template_pairs(d, 2) if len(_words(p.answer)) >= 5]
        if pairs:
            out.append(Question(pairs[0].question, pairs[0].answer, d.id))
            if len(out) == n:
                break
    return out


@dataclass
class Row:
    chunker: str
    mode: str
    chunks: int
    scores: dict[str, float] = field(default_factory=dict)
    per_question: list[dict[str, float]] = field(default_factory=list)


def score_index(index: Index, questions: Sequence[Question], mode: str, k: int = 10) -> tuple[dict[str, float], list[dict[str, float]]]:
    """Mean recall@1/5/k, MRR and nDCG@k of ``mode`` over the questions, and each question's scores."""
    per = []
    for q in questions:
        hits = retrieve(index, q.question, mode, k)
        flags = [relevant(h.chunk, q) for h in hits]
        doc_chunks = index.chunks(index.filtered_ids({"doc_id": q.doc_id}))
        n_rel = max(1, sum(relevant(c, q) for c in doc_chunks.values()))
        per.append({"recall@1": recall_at_k(flags, 1), "recall@5": recall_at_k(flags, 5),
                    f"recall@{k}": recall_at_k(flags, k), "mrr": reciprocal_rank(flags),
                    f"ndcg@{k}": ndcg_at_k(flags, k, n_rel)})
    means = {m: round(sum(p[m] for p in per) / len(per), 4) for m in per[0]} if per else {}
    return means, per


def compare(documents: Sequence[Any], questions: Sequence[Question], folder: Path, embedder: Any,
            chunkers: Sequence[str], modes: Sequence[str], settings: ChunkSettings, store: str = "lancedb",
            k: int = 10, progress: bool = True) -> list[Row]:
    """One index per chunker under ``folder`` (incremental: a re-run re-embeds nothing), every mode on each."""
    rows = []
    for chunker in chunkers:
        s = ChunkSettings(chunker, settings.size, settings.overlap, settings.percentile)
        index = Index.open(folder / f"index-{chunker}", embedder, store)
        index.update(documents, s, progress=progress)
        for mode in modes:
            means, per = score_index(index, questions, mode, k)
            rows.append(Row(chunker, mode, index.count(), means, per))
        index.close()
    return rows


def paired(rows: Sequence[Row], metrics: Sequence[str]) -> list[dict[str, Any]]:
    """Every two retrieval modes of one chunker compared on the same questions, per metric: the later mode of
    ``rows`` (e.g. hybrid) against the earlier (bm25), by ``slmforge.evaluate.stats.compare`` as ``eval compare``
    does (paired bootstrap interval; McNemar's test for right/wrong scores such as recall@k, a permutation
    test for graded ones such as MRR). Whether a gap of a few questions is real is what a user asks next."""
    from slmforge.evaluate.stats import compare as paired_test

    out = []
    for chunker in dict.fromkeys(r.chunker for r in rows):
        mine = [r for r in rows if r.chunker == chunker and r.per_question]
        for i, base in enumerate(mine):
            for cand in mine[i + 1:]:
                tests = {m: paired_test([p[m] for p in base.per_question], [p[m] for p in cand.per_question])
                         for m in metrics}
                out.append({"chunker": chunker, "baseline": base.mode, "candidate": cand.mode,
                            **{m: {k: v for k, v in t.items() if k not in ("mean_a", "mean_b")}
                               for m, t in tests.items()}})
    return out


def plot(rows: Sequence[Row], path: Path, metrics: Sequence[str]) -> Path:
    """Grouped bars, one panel per metric: each chunker, one bar per retrieval mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chunkers = list(dict.fromkeys(r.chunker for r in rows))
    modes = list(dict.fromkeys(r.mode for r in rows))
    fig, axes = plt.subplots(1, len(metrics), figsize=(2.2 + 2.2 * len(chunkers) * len(metrics) / 2, 3.8),
                             squeeze=False)
    width = 0.8 / len(modes)
    for ax, metric in zip(axes[0], metrics):
        for j, mode in enumerate(modes):
            values = [next((r.scores.get(metric, 0.0) for r in rows if r.chunker == c and r.mode == mode), 0.0)
                      for c in chunkers]
            ax.bar([i + j * width for i in range(len(chunkers))], values, width, label=mode)
        ax.set_xticks([i + width * (len(modes) - 1) / 2 for i in range(len(chunkers))], chunkers)
        ax.set_title(metric)
        ax.set_ylim(0, 1)
    axes[0][0].legend(title="retrieval", loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=len(modes))
    fig.suptitle("Retrieval quality by chunker and mode")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
