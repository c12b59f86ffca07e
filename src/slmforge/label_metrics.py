"""Classification and tagging metrics: accuracy, macro precision/recall/F1 with a confusion
matrix, and entity-level F1 over IOB2 tags (conlleval/seqeval-style).

A core module (pure functions, no slmforge imports) because two layers report them:
training an encoder head (train/) and evaluating a suite (evaluate/, whose
``slmforge.evaluate.metrics`` re-exports all three). Written here rather than taken from
scikit-learn or seqeval, which are not dependencies; tests compare them with hand counts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["classification_metrics", "entity_spans", "entity_f1"]


def _prf(tp: int, n_pred: int, n_gold: int) -> tuple[float, float, float]:
    """Precision, recall, F1; 0 where a denominator is 0 (scikit-learn's zero_division=0)."""
    p = tp / n_pred if n_pred else 0.0
    r = tp / n_gold if n_gold else 0.0
    f = 2 * p * r / (p + r) if p + r else 0.0
    return p, r, f


def classification_metrics(gold: Sequence[str], pred: Sequence[str], labels: Sequence[str]) -> dict[str, Any]:
    """Accuracy, macro precision/recall/F1, per-class scores and the confusion matrix.

    Macro averages run over the labels that occur in ``gold`` or ``pred`` (as scikit-learn
    does without ``labels=``), so a class absent from a small test split does not count as 0.
    Macro F1 is the mean of the per-class F1s, not the F1 of macro P and R.

    Args:
        gold: The true label of each example.
        pred: The predicted label of each example.
        labels: Every label, in the order of the confusion matrix's rows and columns.

    Returns:
        ``accuracy``, ``precision``, ``recall``, ``f1``, ``examples``, ``per_class``
        (label -> precision, recall, f1, support) and ``confusion`` (rows: gold, columns: pred).

    Raises:
        ValueError: ``gold`` and ``pred`` differ in length, or hold a label not in ``labels``.
    """
    if len(gold) != len(pred):
        raise ValueError(f"gold has {len(gold)} labels and pred {len(pred)}; they must pair up")
    index = {label: i for i, label in enumerate(labels)}
    unknown = sorted({x for x in [*gold, *pred] if x not in index})
    if unknown:
        raise ValueError(f"labels not in the label list: {unknown}")
    confusion = [[0] * len(labels) for _ in labels]
    for g, q in zip(gold, pred):
        confusion[index[g]][index[q]] += 1
    per_class: dict[str, dict[str, float]] = {}
    for i, label in enumerate(labels):
        n_gold = sum(confusion[i])
        n_pred = sum(row[i] for row in confusion)
        if not n_gold and not n_pred:
            continue
        p, r, f = _prf(confusion[i][i], n_pred, n_gold)
        per_class[label] = {"precision": p, "recall": r, "f1": f, "support": n_gold}
    present = list(per_class.values())

    def mean(key: str) -> float:
        return sum(c[key] for c in present) / len(present) if present else 0.0

    correct = sum(confusion[i][i] for i in range(len(labels)))
    return {
        "accuracy": correct / len(gold) if gold else 0.0,
        "precision": mean("precision"),
        "recall": mean("recall"),
        "f1": mean("f1"),
        "examples": len(gold),
        "per_class": per_class,
        "confusion": confusion,
    }


def entity_spans(tags: Sequence[str]) -> list[tuple[str, int, int]]:
    """The entities of one IOB2 tag sequence, as ``(type, start, end)`` with ``end`` exclusive.

    An entity is a maximal run ``B-X I-X ...``. Like conlleval and seqeval's default mode, an
    ``I-X`` that does not continue an ``X`` entity (after ``O``, or after another type) starts
    one; a tag without a ``B-``/``I-`` prefix counts as ``O``.
    """
    spans = []
    start, kind = 0, None
    for i, tag in enumerate([*tags, "O"]):  # the sentinel closes a trailing entity
        prefix, _, label = tag.partition("-")
        continues = prefix == "I" and label == kind
        if kind is not None and not continues:
            spans.append((kind, start, i))
            kind = None
        if prefix in ("B", "I") and label and not continues:
            start, kind = i, label
    return spans


def entity_f1(gold_tags: Sequence[Sequence[str]], pred_tags: Sequence[Sequence[str]]) -> dict[str, Any]:
    """Entity-level precision/recall/F1 (micro over entities, and per type) plus token accuracy.

    A predicted entity counts only if its type, start and end all match a gold entity
    (``entity_spans`` defines the entities).

    Args:
        gold_tags: One IOB2 tag sequence per sentence.
        pred_tags: The predicted tags, same shape.

    Returns:
        ``precision``, ``recall``, ``f1``, ``token_accuracy``, ``entities`` (gold count),
        ``predicted_entities``, and ``per_type`` (type -> precision, recall, f1, support).

    Raises:
        ValueError: A sentence's gold and predicted sequences differ in length.
    """
    if len(gold_tags) != len(pred_tags):
        raise ValueError(f"{len(gold_tags)} gold sentences but {len(pred_tags)} predicted")
    gold: set[tuple[int, str, int, int]] = set()
    pred: set[tuple[int, str, int, int]] = set()
    tokens = correct = 0
    for n, (g, q) in enumerate(zip(gold_tags, pred_tags)):
        if len(g) != len(q):
            raise ValueError(f"sentence {n}: {len(g)} gold tags but {len(q)} predicted")
        gold.update((n, *span) for span in entity_spans(g))
        pred.update((n, *span) for span in entity_spans(q))
        tokens += len(g)
        correct += sum(a == b for a, b in zip(g, q))
    hit = gold & pred
    per_type = {}
    for kind in sorted({e[1] for e in gold | pred}):
        n_gold = sum(e[1] == kind for e in gold)
        p, r, f = _prf(sum(e[1] == kind for e in hit), sum(e[1] == kind for e in pred), n_gold)
        per_type[kind] = {"precision": p, "recall": r, "f1": f, "support": n_gold}
    p, r, f = _prf(len(hit), len(pred), len(gold))
    return {
        "precision": p,
        "recall": r,
        "f1": f,
        "token_accuracy": correct / tokens if tokens else 0.0,
        "entities": len(gold),
        "predicted_entities": len(pred),
        "per_type": per_type,
    }
