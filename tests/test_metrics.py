"""Metrics and paired statistics against values computed by hand (tables of tiny inputs)."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest

from slmforge import label_metrics
from slmforge.evaluate import metrics as metrics_module
from slmforge.evaluate.metrics import (
    bleu,
    chrf,
    classification_metrics,
    entity_f1,
    entity_spans,
    exact_match,
    extract_answer,
    multiple_choice_accuracy,
    normalize_answer,
    pass_at_k,
    pass_at_k_mean,
    rouge,
    token_f1,
)
from slmforge.evaluate.stats import compare, mcnemar, paired_bootstrap_ci, paired_permutation_test

# --------------------------------------------------------------------------- layering


def test_label_metrics_are_one_core_implementation():
    """train/ (encoder heads) and evaluate/ report the same scores: one implementation in the core
    module, imported from nothing above it (tests/test_layers.py checks the whole tree)."""
    tree = ast.parse(Path(label_metrics.__file__).read_text(encoding="utf-8"))
    imported = [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
    imported += [node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    assert not [name for name in imported if name.split(".")[0] == "slmforge"]
    for name in ("classification_metrics", "entity_spans", "entity_f1"):
        assert getattr(metrics_module, name) is getattr(label_metrics, name)


# --------------------------------------------------------------------------- SQuAD EM / F1


@pytest.mark.parametrize(
    "text, normalized",
    [
        ("The  Cat, sat!", "cat sat"),
        ("an apple a day", "apple day"),
        ("Theater", "theater"),  # an article only as a whole word
        ("  ", ""),
    ],
)
def test_normalize_answer(text, normalized):
    assert normalize_answer(text) == normalized


@pytest.mark.parametrize(
    "pred, refs, em, f1",
    [
        ("the Eiffel Tower", "Eiffel Tower.", 1.0, 1.0),
        # pred tokens cat sat on mat, ref cat on mat: P 3/4, R 1, F1 6/7
        ("the cat sat on the mat", "a cat on a mat", 0.0, 6 / 7),
        ("cat cat", "cat", 0.0, 2 / 3),  # tokens are a multiset: P 1/2, R 1
        ("dog", "cat", 0.0, 0.0),
        ("", "", 1.0, 1.0),  # both empty: a correct "no answer"
        ("the", "a", 1.0, 1.0),  # both empty after normalization
        ("cat", "", 0.0, 0.0),
        ("Paris", ["London", "paris"], 1.0, 1.0),  # several references: the best counts
        ("big red car", ["red", "big red bus"], 0.0, 2 / 3),  # F1s 1/2 and 2/3
    ],
)
def test_exact_match_and_token_f1(pred, refs, em, f1):
    assert exact_match(pred, refs) == em
    assert token_f1(pred, refs) == pytest.approx(f1)


def test_empty_reference_list_is_an_error():
    with pytest.raises(ValueError, match="no reference"):
        exact_match("a", [])
    with pytest.raises(ValueError, match="no reference"):
        token_f1("a", [])


# --------------------------------------------------------------------------- BLEU / chrF / ROUGE

SENTENCE = "the quick brown fox jumps over the lazy dog"


@pytest.mark.parametrize(
    "preds, refs, expected",
    [
        ([SENTENCE], [SENTENCE], 100.0),
        ([SENTENCE], [[SENTENCE]], 100.0),
        (["alpha beta gamma delta"], ["one two three four"], 0.0),
        # n-gram precisions 5/6, 3/5, 2/4, 1/3; equal lengths, so no brevity penalty
        (["the cat sat on the mat"], ["the cat sat on a mat"], 100 * (1 / 12) ** 0.25),
        # a varying number of references per item; each item matches one of its own
        ([SENTENCE, "a b c d e"], [["something else entirely here", SENTENCE], "a b c d e"], 100.0),
        ([], [], 0.0),
    ],
    ids=["identical", "identical-list", "disjoint", "by-hand", "multi-reference", "empty"],
)
def test_bleu(preds, refs, expected):
    assert bleu(preds, refs) == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize(
    "preds, refs, expected",
    [
        ([SENTENCE], [SENTENCE], 100.0),
        (["abc"], ["xyz"], 0.0),
        (["abc", SENTENCE], [["xyz", "abc"], [SENTENCE]], 100.0),
    ],
)
def test_chrf(preds, refs, expected):
    assert chrf(preds, refs) == pytest.approx(expected, abs=1e-6)


def test_generation_metrics_need_paired_inputs():
    for metric in (bleu, chrf, rouge):
        with pytest.raises(ValueError, match="pair up"):
            metric(["a", "b"], ["a"])


@pytest.mark.parametrize(
    "preds, refs, expected",
    [
        # unigrams: 2 shared of 3 predicted, 4 reference: F = 4/7. bigrams: "the cat" of 2 and 3: F = 2/5.
        # longest common subsequence "the cat": as unigrams, 4/7.
        (["the cat sat"], ["the cat ran away"], {"rouge1": 4 / 7, "rouge2": 2 / 5, "rougeL": 4 / 7}),
        (["the cat sat", SENTENCE], ["the cat ran away", SENTENCE],
         {"rouge1": (1 + 4 / 7) / 2, "rouge2": (1 + 2 / 5) / 2, "rougeL": (1 + 4 / 7) / 2}),
        (["cats running"], ["cat run"], {"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0}),  # Porter stemming
        (["the cat sat"], [["dog", "the cat sat"]], {"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0}),
        ([], [], {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}),
    ],
    ids=["by-hand", "mean", "stemmed", "multi-reference", "empty"],
)
def test_rouge(preds, refs, expected):
    assert rouge(preds, refs) == pytest.approx(expected)


# --------------------------------------------------------------------------- classification and NER
# (tests/test_encoder.py holds the full tables; these pin the functions to their new home)


def test_classification_metrics_by_hand():
    # a: P 1, R 1/2, F 2/3; b: P 2/3, R 1, F 4/5
    m = classification_metrics(list("aabb"), list("abbb"), ["a", "b"])
    assert (m["accuracy"], m["precision"], m["recall"], m["f1"]) == pytest.approx((0.75, 5 / 6, 0.75, (2 / 3 + 0.8) / 2))
    assert m["confusion"] == [[1, 1], [0, 2]]


@pytest.mark.parametrize(
    "gold, pred, p, r, f",
    [
        ([["B-PER", "I-PER", "O", "B-LOC"]], [["B-PER", "I-PER", "O", "B-LOC"]], 1.0, 1.0, 1.0),
        ([["B-PER", "I-PER", "O"]], [["B-PER", "O", "O"]], 0.0, 0.0, 0.0),  # partial span: no credit
        ([["B-PER", "O", "B-LOC", "I-LOC"]], [["B-PER", "O", "O", "O"]], 1.0, 0.5, 2 / 3),
    ],
)
def test_entity_f1_by_hand(gold, pred, p, r, f):
    m = entity_f1(gold, pred)
    assert (m["precision"], m["recall"], m["f1"]) == pytest.approx((p, r, f))


def test_entity_spans_by_hand():
    assert entity_spans(["B-PER", "I-PER", "O", "B-LOC"]) == [("PER", 0, 2), ("LOC", 3, 4)]
    assert entity_spans(["O", "I-LOC", "B-LOC"]) == [("LOC", 1, 2), ("LOC", 2, 3)]


# --------------------------------------------------------------------------- pass@k


def test_pass_at_k_matches_the_closed_form():
    for n in range(1, 31):
        for c in range(n + 1):
            for k in range(1, n + 1):
                expected = 1 - math.comb(n - c, k) / math.comb(n, k)  # comb is 0 when k > n - c
                assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12), (n, c, k)


@pytest.mark.parametrize(
    "n, c, k, expected",
    [
        (5, 3, 3, 1.0),  # n - c < k: every 3 of 5 holds a pass
        (10, 0, 5, 0.0),
        (10, 10, 10, 1.0),
        (1, 1, 1, 1.0),
        (10, 3, 1, 0.3),  # pass@1 is c / n
        (200, 1, 100, 0.5),  # 1 - C(199, 100) / C(200, 100) = 1 - 100/200; the binomials have 59 digits
        (2000, 7, 1000, 1 - math.comb(1993, 1000) / math.comb(2000, 1000)),
    ],
)
def test_pass_at_k_edges(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("n, c, k", [(5, 6, 1), (5, -1, 1), (5, 2, 0), (5, 2, 6)])
def test_pass_at_k_rejects_impossible_counts(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


def test_pass_at_k_mean():
    assert pass_at_k_mean([(10, 3), (10, 0)], 1) == pytest.approx(0.15)
    assert pass_at_k_mean([(5, 3), (4, 0)], 3) == pytest.approx(0.5)
    assert pass_at_k_mean([], 1) == 0.0


# --------------------------------------------------------------------------- multiple choice


def test_multiple_choice_accuracy():
    ll = [[-1.0, -2.0], [-5.0, -3.0], [-4.0, -6.0, -9.0]]
    gold = [0, 1, 1]
    # raw argmax: 0, 1, 0 -> 2/3. per length: [-1, -2], [-5, -3], [-2, -1, -3] -> 0, 1, 1 -> 3/3
    assert multiple_choice_accuracy(ll, gold) == pytest.approx({"acc": 2 / 3, "examples": 3})
    m = multiple_choice_accuracy(ll, gold, lengths=[[1, 1], [1, 1], [2, 6, 3]])
    assert (m["acc"], m["acc_norm"]) == pytest.approx((2 / 3, 1.0))
    assert multiple_choice_accuracy([[-1.0, -1.0]], [1])["acc"] == 0.0  # a tie goes to the first choice
    assert multiple_choice_accuracy([], [], lengths=[]) == {"acc": 0.0, "examples": 0, "acc_norm": 0.0}


@pytest.mark.parametrize(
    "ll, gold, lengths, message",
    [
        ([[-1.0]], [0, 1], None, "gold answers"),
        ([[-1.0, -2.0]], [2], None, "gold index"),
        ([[]], [0], None, "no choices"),
        ([[-1.0, -2.0]], [0], [[1]], "one positive length"),
        ([[-1.0, -2.0]], [0], [[1, 0]], "one positive length"),
    ],
)
def test_multiple_choice_bad_input(ll, gold, lengths, message):
    with pytest.raises(ValueError, match=message):
        multiple_choice_accuracy(ll, gold, lengths)


# --------------------------------------------------------------------------- answer extraction

FENCED = "Here you go:\n```python\ndef f():\n    return 1\n```\nand another:\n```\nx = 2\n```"


@pytest.mark.parametrize(
    "text, method, arg, expected",
    [
        ("The answer is 42.", "regex", r"answer is (\d+)", "42"),
        ("ANSWER: B", "regex", r"[A-D]$", "B"),  # no group: the whole match
        ("nothing to see", "regex", r"answer: (\w)", None),
        ("so 600 + 634 = 1234\n#### 1,234", "last_number", None, "1234"),
        ("3 apples, then 12.5 kg, net -7", "last_number", None, "-7"),
        ("it costs $1,234,567.89.", "last_number", None, "1234567.89"),
        ("pages 3-5", "last_number", None, "5"),  # a hyphen between numbers is no minus sign
        ("the list 1,2,3", "last_number", None, "3"),  # not thousands groups
        ("no digits here", "last_number", None, None),
        ('Sure! {"answer": "Paris", "confidence": 0.9} ok', "json_field", "answer", "Paris"),
        ('{"answer": 42}', "json_field", "answer", "42"),
        ('{not json} then {"answer": true} and {"answer": 1}', "json_field", "answer", "true"),
        ('{"other": 1}', "json_field", "answer", None),
        ('{"answer": null}', "json_field", "answer", None),
        ("no object", "json_field", "answer", None),
        (FENCED, "code_block", None, "def f():\n    return 1"),
        ("```x = 1```", "code_block", None, "x = 1"),
        ("```python\nprint(1)", "code_block", None, "print(1)"),  # never closed: the rest
        ("just code", "code_block", None, "just code"),
        ("\n  first \nsecond", "first_line", None, "first"),
        ("   \n\t\n", "first_line", None, None),
        (" raw \n", "none", None, " raw \n"),
    ],
)
def test_extract_answer(text, method, arg, expected):
    assert extract_answer(text, method, arg) == expected


@pytest.mark.parametrize(
    "method, arg, message",
    [("guess", None, "unknown extraction method"), ("regex", None, "needs arg"),
     ("json_field", None, "needs arg"), ("regex", "(", "not a valid regular expression")],
)
def test_extract_answer_bad_method_or_arg(method, arg, message):
    with pytest.raises(ValueError, match=message):
        extract_answer("text", method, arg)


# --------------------------------------------------------------------------- McNemar


def _pairs(b01: int, b10: int, both: int = 3, neither: int = 2) -> tuple[list[bool], list[bool]]:
    """Outcomes with the given discordant counts (b01: a wrong, b right)."""
    a = [False] * b01 + [True] * b10 + [True] * both + [False] * neither
    b = [True] * b01 + [False] * b10 + [True] * both + [False] * neither
    return a, b


@pytest.mark.parametrize(
    "b01, b10, statistic, p_value, method",
    [
        (5, 1, 1.0, 2 * (1 + 6) / 2**6, "exact"),  # 2 * P(X <= 1), X ~ Bin(6, 1/2) = 14/64
        (0, 3, 0.0, 2 / 2**3, "exact"),
        (2, 2, 2.0, 1.0, "exact"),  # 2 * 11/16 > 1: capped
        (0, 0, 0.0, 1.0, "exact"),
        (12, 12, 12.0, 1.0, "exact"),  # 24 discordant: still exact
        # (|30 - 10| - 1)^2 / 40 = 9.025; chi-square(1) tail = 2 (1 - Phi(3.00416)) = 0.00266312
        # (the table value; scipy.stats.chi2.sf(9.025, 1) agrees)
        (30, 10, 9.025, 0.00266312, "chi2"),
        (20, 20, 0.0, 1.0, "chi2"),  # the continuity correction never goes below 0
    ],
)
def test_mcnemar_by_hand(b01, b10, statistic, p_value, method):
    r = mcnemar(*_pairs(b01, b10))
    assert (r["b01"], r["b10"], r["method"]) == (b01, b10, method)
    assert r["statistic"] == pytest.approx(statistic)
    assert r["p_value"] == pytest.approx(p_value, rel=1e-4)


def test_mcnemar_bad_input():
    with pytest.raises(ValueError, match="0/1"):
        mcnemar([0, 1], [0, 0.5])
    with pytest.raises(ValueError, match="one score per item"):
        mcnemar([True], [True, False])
    with pytest.raises(ValueError, match="no items"):
        mcnemar([], [])


# --------------------------------------------------------------------------- permutation and bootstrap


@pytest.mark.parametrize(
    "a, b, p_value",
    [
        ([0, 0, 0], [1, 1, 1], 2 / 8),  # only all-plus and all-minus reach |mean| = 1
        ([0] * 5, [1] * 5, 2 / 32),
        ([0, 0], [2, 1], 2 / 4),  # sums 3, 1, -1, -3
        ([0, 0, 0, 0], [0, 0, 1, 1], 8 / 16),  # the zeros flip freely: 4 x (2, 0, 0, -2)
        ([1, 0], [0, 1], 1.0),
        ([0.3, 0.7], [0.3, 0.7], 1.0),
    ],
)
def test_permutation_exact_by_hand(a, b, p_value):
    assert paired_permutation_test(a, b) == pytest.approx(p_value)


def test_permutation_sampled_is_seeded():
    a, b = [0.0] * 20, [1.0] * 20  # exact p = 2 / 2**20; sampled: (1 + hits) / (1 + resamples)
    assert paired_permutation_test(a, b, n_resamples=2000) <= 2 / 2001
    noisy_a = [0.1 * (i % 7) for i in range(40)]
    noisy_b = [x + (0.05 if i % 3 else -0.05) for i, x in enumerate(noisy_a)]
    p = paired_permutation_test(noisy_a, noisy_b, n_resamples=2000, seed=3)
    assert p == paired_permutation_test(noisy_a, noisy_b, n_resamples=2000, seed=3)
    assert 0 < p <= 1


def test_bootstrap_is_reproducible_and_sane():
    a = [0.1 * (i % 10) for i in range(50)]
    b = [x + 0.2 + 0.05 * ((i * 7) % 5 - 2) for i, x in enumerate(a)]
    first = paired_bootstrap_ci(a, b, n_resamples=2000, seed=7)
    assert first == paired_bootstrap_ci(a, b, n_resamples=2000, seed=7)
    assert first != paired_bootstrap_ci(a, b, n_resamples=2000, seed=8)
    diff, low, high = first
    assert diff == pytest.approx(0.2)
    assert low < diff < high
    assert paired_bootstrap_ci([0, 1, 2], [1, 2, 3], n_resamples=100) == pytest.approx((1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="confidence"):
        paired_bootstrap_ci(a, b, confidence=95)


# --------------------------------------------------------------------------- compare

HALF = [True] * 100 + [False] * 100  # 50% of 200
# 80%: keeps 90 of a's hits, adds 70 more; b01 = 70, b10 = 10
EIGHTY = [True] * 90 + [False] * 10 + [True] * 70 + [False] * 30


def test_compare_a_large_difference_is_better():
    r = compare(HALF, EIGHTY)
    assert r["test"] == "mcnemar" and r["n"] == 200
    assert (r["mean_a"], r["mean_b"], r["diff"]) == pytest.approx((0.5, 0.8, 0.3))
    assert r["p_value"] < 0.01
    assert 0 < r["ci_low"] < 0.3 < r["ci_high"]
    assert r["verdict"] == "better"
    assert compare(EIGHTY, HALF)["verdict"] == "worse"


def test_compare_graded_scores_use_the_permutation_test():
    a = [0.01 * ((i * 37) % 100) for i in range(200)]
    b = [x + 0.1 for x in a]
    r = compare(a, b)
    assert r["test"] == "permutation"
    assert r["diff"] == pytest.approx(0.1)
    assert r["p_value"] < 0.01 and r["verdict"] == "better"


@pytest.mark.parametrize("scores", [HALF, [0.01 * ((i * 37) % 100) for i in range(200)]], ids=["binary", "graded"])
def test_compare_identical_sets(scores):
    r = compare(scores, list(scores))
    assert r["p_value"] == 1.0 and r["diff"] == 0.0
    assert (r["ci_low"], r["ci_high"]) == (0.0, 0.0)
    assert r["verdict"] == "no significant difference"


def test_compare_small_difference_is_not_significant():
    a = [True] * 10 + [False] * 10
    b = [True] * 11 + [False] * 9  # one item flipped
    r = compare(a, b)
    assert r["p_value"] == 1.0 and r["verdict"] == "no significant difference"


def test_compare_binary_flag():
    with pytest.raises(ValueError, match="0/1"):
        compare([0.5, 1.0], [1.0, 1.0], binary=True)
    assert compare([0, 1, 1], [1, 1, 1], binary=False)["test"] == "permutation"
