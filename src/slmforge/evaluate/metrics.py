"""Metrics: pure functions from predictions and references to numbers.

    from slmforge.evaluate.metrics import token_f1, bleu, pass_at_k, extract_answer
    token_f1("the cat sat on the mat", "a cat on a mat")     # 0.857 (SQuAD token F1)
    bleu(["the cat sat on the mat"], [["the cat sat on the mat"]])   # 100.0
    pass_at_k(n=10, c=3, k=1)                                 # 0.3
    extract_answer("... so she has #### 1,234", "last_number")      # "1234"

Scales follow the tools they come from: ``bleu`` and ``chrf`` are sacrebleu's 0-100,
everything else is 0-1. ``classification_metrics``, ``entity_spans`` and ``entity_f1``
live in the core module ``slmforge.label_metrics`` (training reports them too, and train/
sits below evaluate/) and are re-exported here. sacrebleu and rouge_score are imported
inside the functions that need them.

``SUITE_METRICS`` at the end is the table of names a suite may list under ``metrics:``:
the suite check and the runner both read it (``score_items``).
"""

from __future__ import annotations

import json
import re
import string
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from slmforge.label_metrics import classification_metrics, entity_f1, entity_spans

__all__ = [
    "normalize_answer",
    "exact_match",
    "token_f1",
    "bleu",
    "chrf",
    "rouge",
    "classification_metrics",
    "entity_spans",
    "entity_f1",
    "pass_at_k",
    "pass_at_k_mean",
    "multiple_choice_accuracy",
    "extract_answer",
    "EXTRACTION_METHODS",
    "SuiteMetric",
    "SUITE_METRICS",
    "suite_metrics",
    "score_items",
]


# --------------------------------------------------------------------------- short answers (SQuAD)

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(s: str) -> str:
    """SQuAD's answer normalization: lowercase, drop punctuation and the articles
    a/an/the, collapse whitespace. ``"The  Cat, sat!"`` -> ``"cat sat"``."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", s).split())


def _references(refs: str | Sequence[str]) -> list[str]:
    out = [refs] if isinstance(refs, str) else list(refs)
    if not out:
        raise ValueError("no reference answers given; pass a string or a non-empty list of strings")
    return out


def exact_match(pred: str, refs: str | Sequence[str]) -> float:
    """1.0 if the normalized prediction equals a normalized reference, else 0.0.

    Args:
        pred: The predicted answer.
        refs: One reference answer, or several (the best one counts).

    Raises:
        ValueError: ``refs`` is an empty list.
    """
    p = normalize_answer(pred)
    return max(float(p == normalize_answer(r)) for r in _references(refs))


def _f1_one(pred_tokens: list[str], ref_tokens: list[str]) -> float:
    if not pred_tokens or not ref_tokens:
        return float(pred_tokens == ref_tokens)  # both empty: a correct "no answer"
    same = sum((Counter(pred_tokens) & Counter(ref_tokens)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(ref_tokens)
    return 2 * precision * recall / (precision + recall)


def token_f1(pred: str, refs: str | Sequence[str]) -> float:
    """SQuAD token F1: overlap of the normalized tokens (as multisets) of prediction and reference.

    Both empty after normalization gives 1.0; one empty gives 0.0.

    Args:
        pred: The predicted answer.
        refs: One reference answer, or several (the best F1 counts).

    Raises:
        ValueError: ``refs`` is an empty list.
    """
    p = normalize_answer(pred).split()
    return max(_f1_one(p, normalize_answer(r).split()) for r in _references(refs))


# --------------------------------------------------------------------------- generation (sacrebleu, rouge)


def _reference_streams(preds: Sequence[str], refs: Sequence[str | Sequence[str]]) -> list[list[str | None]]:
    """Per-prediction reference lists -> sacrebleu's reference streams (one list per
    reference slot, ``None`` where a prediction has fewer references than the most)."""
    if len(preds) != len(refs):
        raise ValueError(f"{len(preds)} predictions but {len(refs)} reference entries; they must pair up")
    per_item = [_references(r) for r in refs]
    width = max(len(r) for r in per_item)
    return [[r[i] if i < len(r) else None for r in per_item] for i in range(width)]


def bleu(preds: Sequence[str], refs: Sequence[str | Sequence[str]]) -> float:
    """Corpus BLEU (sacrebleu defaults: 13a tokenization, exponential smoothing), 0-100.

    Args:
        preds: One hypothesis per item.
        refs: For each item, its reference string or a list of references (may vary in number).

    Returns:
        The corpus score; 0.0 for no items.

    Raises:
        ValueError: ``preds`` and ``refs`` differ in length, or an item has no reference.
    """
    if not preds and not refs:
        return 0.0
    from sacrebleu.metrics import BLEU

    streams = _reference_streams(preds, refs)
    return float(BLEU().corpus_score(list(preds), streams).score)


def chrf(preds: Sequence[str], refs: Sequence[str | Sequence[str]]) -> float:
    """Corpus chrF (sacrebleu defaults: character 6-grams, beta 2), 0-100.

    Args and Raises as for ``bleu``.
    """
    if not preds and not refs:
        return 0.0
    from sacrebleu.metrics import CHRF

    streams = _reference_streams(preds, refs)
    return float(CHRF().corpus_score(list(preds), streams).score)


def rouge(preds: Sequence[str], refs: Sequence[str | Sequence[str]]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F-measures (rouge_score, Porter stemming), 0-1.

    With several references an item scores against the one with the best F-measure
    (rouge_score's ``score_multi``), per ROUGE type.

    Args:
        preds: One prediction per item.
        refs: For each item, its reference string or a list of references.

    Returns:
        ``rouge1``, ``rouge2``, ``rougeL``: means over items (0.0 each for no items).

    Raises:
        ValueError: ``preds`` and ``refs`` differ in length, or an item has no reference.
    """
    if len(preds) != len(refs):
        raise ValueError(f"{len(preds)} predictions but {len(refs)} reference entries; they must pair up")
    types = ("rouge1", "rouge2", "rougeL")
    if not preds:
        return dict.fromkeys(types, 0.0)
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(list(types), use_stemmer=True)
    totals = dict.fromkeys(types, 0.0)
    for pred, ref in zip(preds, refs):
        scores = scorer.score_multi(_references(ref), pred)
        for t in types:
            totals[t] += scores[t].fmeasure
    return {t: totals[t] / len(preds) for t in types}


# --------------------------------------------------------------------------- code (pass@k)


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k estimate from ``n`` samples of which ``c`` passed: 1 - C(n-c, k) / C(n, k).

    Computed as the product 1 - prod_{i=n-c+1}^{n} (1 - k/i) (Chen et al. 2021, the Codex
    paper), which never forms the huge binomials.

    Args:
        n: Samples drawn for the problem.
        c: How many of them passed.
        k: The k of pass@k; at most ``n`` (fewer samples cannot estimate it).

    Raises:
        ValueError: Not 0 <= c <= n, or not 1 <= k <= n.
    """
    if not 0 <= c <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n; got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"pass@{k} needs 1 <= k <= n samples per problem; got n={n}")
    if n - c < k:
        return 1.0  # every k-subset holds a passing sample
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def pass_at_k_mean(results: Sequence[tuple[int, int]], k: int) -> float:
    """Mean ``pass_at_k`` over problems, each given as ``(n, c)``; 0.0 for no problems.

    Raises:
        ValueError: As ``pass_at_k``, for any problem.
    """
    if not results:
        return 0.0
    return sum(pass_at_k(n, c, k) for n, c in results) / len(results)


# --------------------------------------------------------------------------- multiple choice


def multiple_choice_accuracy(
    loglikelihoods: Sequence[Sequence[float]],
    gold: Sequence[int],
    lengths: Sequence[Sequence[int]] | None = None,
) -> dict[str, float]:
    """Accuracy of picking the choice the model finds most likely (lm-evaluation-harness style).

    Ties go to the first choice.

    Args:
        loglikelihoods: Per item, the log-likelihood of each choice's continuation.
        gold: Per item, the index of the right choice.
        lengths: Per item, each choice's length (e.g. UTF-8 bytes of the continuation).
            When given, ``acc_norm`` picks by log-likelihood per unit of length, which
            stops long answers losing just for being long.

    Returns:
        ``acc`` and ``examples``, plus ``acc_norm`` when ``lengths`` is given; 0.0 for no items.

    Raises:
        ValueError: Lengths of the arguments do not pair up, an item has no choices, a gold
            index is out of range, or a length is not positive.
    """
    if len(loglikelihoods) != len(gold):
        raise ValueError(f"{len(loglikelihoods)} items of log-likelihoods but {len(gold)} gold answers")
    if lengths is not None and len(lengths) != len(gold):
        raise ValueError(f"{len(lengths)} items of lengths but {len(gold)} gold answers")
    hits = hits_norm = 0
    for i, (ll, g) in enumerate(zip(loglikelihoods, gold)):
        if not ll:
            raise ValueError(f"item {i} has no choices")
        if not 0 <= g < len(ll):
            raise ValueError(f"item {i}: gold index {g} is not one of its {len(ll)} choices")
        hits += int(np.argmax(ll)) == g
        if lengths is not None:
            size = lengths[i]
            if len(size) != len(ll) or any(x <= 0 for x in size):
                raise ValueError(f"item {i}: needs one positive length per choice ({len(ll)}), got {list(size)}")
            hits_norm += int(np.argmax(np.asarray(ll, dtype=float) / np.asarray(size, dtype=float))) == g
    n = len(gold)
    out = {"acc": hits / n if n else 0.0, "examples": n}
    if lengths is not None:
        out["acc_norm"] = hits_norm / n if n else 0.0
    return out


# --------------------------------------------------------------------------- answer extraction

# A number: optional sign (not the hyphen of "3-5"), thousands groups or plain digits, decimals.
_NUMBER = re.compile(r"(?:(?<![\w.])-)?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?")
_FENCE = re.compile(r"```[^\n`]*\n(.*?)```", re.DOTALL)  # ```lang\n ... ```
_INLINE_FENCE = re.compile(r"```(.*?)```", re.DOTALL)  # ```code``` on one line


def _extract_regex(text: str, pattern: str | None) -> str | None:
    if not pattern:
        raise ValueError('extract_answer(method="regex") needs arg: the pattern to search for')
    try:
        m = re.search(pattern, text)
    except re.error as exc:
        raise ValueError(f"extract_answer: {pattern!r} is not a valid regular expression: {exc}") from None
    if m is None:
        return None
    if m.re.groups and m.group(1) is not None:
        return m.group(1).strip()
    return m.group(0).strip()


def _extract_last_number(text: str, _: str | None) -> str | None:
    numbers = _NUMBER.findall(text)
    return numbers[-1].replace(",", "") if numbers else None


def _extract_json_field(text: str, field: str | None) -> str | None:
    if not field:
        raise ValueError('extract_answer(method="json_field") needs arg: the field name')
    decoder = json.JSONDecoder()
    for m in re.finditer(r"\{", text):
        try:
            obj, _ = decoder.raw_decode(text, m.start())
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):  # the first object that parses; a later one is not consulted
            value = obj.get(field)
            if value is None:
                return None
            return value if isinstance(value, str) else json.dumps(value)
    return None


def _extract_code_block(text: str, _: str | None) -> str | None:
    m = _FENCE.search(text) or _INLINE_FENCE.search(text)
    if m:
        return m.group(1).rstrip("\n")
    start = text.find("```")
    if start >= 0:  # an opening fence never closed (generation stopped): the rest of the text
        body = text[start + 3 :]
        return body.split("\n", 1)[1] if "\n" in body else body
    return text


def _extract_first_line(text: str, _: str | None) -> str | None:
    return next((line.strip() for line in text.splitlines() if line.strip()), None)


def _extract_none(text: str, _: str | None) -> str | None:
    return text


EXTRACTION_METHODS: dict[str, Callable[[str, str | None], str | None]] = {
    "regex": _extract_regex,
    "last_number": _extract_last_number,
    "json_field": _extract_json_field,
    "code_block": _extract_code_block,
    "first_line": _extract_first_line,
    "none": _extract_none,
}


def extract_answer(text: str, method: str, arg: str | None = None) -> str | None:
    """Pull the answer out of a model's output.

    Methods:
        ``regex``: ``arg`` is a pattern; its first group (or the whole match if it has no group).
        ``last_number``: the last integer or decimal, thousands commas removed
        (GSM8K's ``"#### 1,234"`` -> ``"1234"``).
        ``json_field``: ``arg`` is a field of the first JSON object in the text; a non-string
        value comes back as JSON (``42``, ``true``, ``[1, 2]``).
        ``code_block``: the body of the first fenced ``` block (to the end of the text if
        the fence never closes), else the whole text.
        ``first_line``: the first non-blank line, stripped.
        ``none``: the text unchanged.

    Returns:
        The answer, or ``None`` when the method finds none (no match, no number, no object
        or field, no non-blank line).

    Raises:
        ValueError: Unknown method, ``regex``/``json_field`` without ``arg``, or a bad pattern.
    """
    try:
        extract = EXTRACTION_METHODS[method]
    except KeyError:
        raise ValueError(f"unknown extraction method {method!r}; choose one of {sorted(EXTRACTION_METHODS)}") from None
    return extract(text, arg)


# --------------------------------------------------------------------------- suite metrics (the table)


@dataclass(frozen=True)
class SuiteMetric:
    """A name a suite may list under ``metrics:``, and how the runner scores it.

    One table, ``SUITE_METRICS``, answers both "may this suite name it" (the suite check) and
    "how is it scored" (the runner), so the two cannot drift apart. ``item`` scores one
    answer against its target (the runner averages each key over items, and paired A/B
    comparisons use the per-item values); ``corpus`` scores all answers at once and replaces
    those averages (BLEU and chrF are corpus statistics, macro F1 has no per-item value).
    """

    task: str  # the suites it applies to: "generate" or "multiple_choice" (code suites score pass@k)
    item: Callable[[str, str], dict[str, float]] | None = None  # (answer, target) -> scores of that item
    # (answers, targets, labels) -> aggregate scores; labels: every choice of a multiple_choice suite, in order
    corpus: Callable[[Sequence[str], Sequence[str], Sequence[str]], dict[str, float]] | None = None
    primary: str | None = None  # the item score paired comparisons use when this metric comes first (None: the name)


def _bleu_item(answer: str, target: str) -> dict[str, float]:
    return {"bleu": bleu([answer], [target])}


def _bleu_corpus(answers: Sequence[str], targets: Sequence[str], _labels: Sequence[str]) -> dict[str, float]:
    return {"bleu": bleu(answers, targets)}  # corpus-level, as sacrebleu means it


def _chrf_item(answer: str, target: str) -> dict[str, float]:
    return {"chrf": chrf([answer], [target])}


def _chrf_corpus(answers: Sequence[str], targets: Sequence[str], _labels: Sequence[str]) -> dict[str, float]:
    return {"chrf": chrf(answers, targets)}


def code_exact(pred: str, target: str) -> float:
    """1.0 when the predicted line equals the target line, surrounding whitespace aside (code is compared as
    written: case and punctuation matter, unlike ``exact_match``)."""
    return float(pred.strip() == target.strip())


def edit_similarity(pred: str, target: str) -> float:
    """1 - normalised Levenshtein distance between the stripped lines (CodeXGLUE's and RepoBench's
    next-line edit similarity, on a 0-1 scale)."""
    from rapidfuzz.distance import Levenshtein

    return float(Levenshtein.normalized_similarity(pred.strip(), target.strip()))


def _macro_f1_corpus(answers: Sequence[str], targets: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    return {"macro_f1": classification_metrics(targets, answers, labels)["f1"]}


# Metric name (a suite's ``metrics:``) -> how it is scored. Order: the order suite errors list them in.
SUITE_METRICS: dict[str, SuiteMetric] = {
    "exact_match": SuiteMetric(task="generate", item=lambda a, t: {"exact_match": exact_match(a, t)}),
    "token_f1": SuiteMetric(task="generate", item=lambda a, t: {"token_f1": token_f1(a, t)}),
    "bleu": SuiteMetric(task="generate", item=_bleu_item, corpus=_bleu_corpus),
    "chrf": SuiteMetric(task="generate", item=_chrf_item, corpus=_chrf_corpus),
    "rouge": SuiteMetric(task="generate", item=lambda a, t: rouge([a], [t]), primary="rougeL"),
    "code_exact": SuiteMetric(task="generate", item=lambda a, t: {"code_exact": code_exact(a, t)}),
    "edit_sim": SuiteMetric(task="generate", item=lambda a, t: {"edit_sim": edit_similarity(a, t)}),
    "accuracy": SuiteMetric(task="multiple_choice", item=lambda a, t: {"accuracy": float(a == t)}),
    "macro_f1": SuiteMetric(task="multiple_choice", corpus=_macro_f1_corpus),
}


def suite_metrics(task: str) -> tuple[str, ...]:
    """The metric names a suite of ``task`` may list, in table order (none for ``code``: pass@k)."""
    return tuple(name for name, m in SUITE_METRICS.items() if m.task == task)


def score_items(
    names: Sequence[str], answers: Sequence[str], targets: Sequence[str], labels: Sequence[str] = ()
) -> tuple[list[dict[str, float]], dict[str, float], str]:
    """Score a suite's answers with the named metrics of ``SUITE_METRICS``.

    Args:
        names: Metric names, in the suite's order (the first with item scores gives the primary).
        answers: The extracted answer of each item.
        targets: Each item's target.
        labels: multiple_choice: every choice, in order (the label set of macro F1).

    Returns:
        (per-item scores, aggregates, primary): aggregates are the means of the item scores,
        then each metric's corpus scores over them.

    Raises:
        KeyError: A name that is not in the table (suites are checked against it when loaded).
        ValueError: ``answers`` and ``targets`` differ in length, or there are none.
    """
    if len(answers) != len(targets) or not answers:
        raise ValueError(f"{len(answers)} answers and {len(targets)} targets; need one per item and at least one")
    metrics = [SUITE_METRICS[n] for n in names]
    rows: list[dict[str, float]] = []
    for answer, target in zip(answers, targets):
        scores: dict[str, float] = {}
        for m in metrics:
            if m.item is not None:
                scores.update(m.item(answer, target))
        rows.append(scores)
    agg = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}
    for m in metrics:
        if m.corpus is not None:
            agg.update(m.corpus(answers, targets, labels))
    primary = next((m.primary or n for n, m in zip(names, metrics) if m.item is not None), names[0])
    return rows, agg, primary
