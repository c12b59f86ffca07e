"""Quality filters: each reason triggered by a crafted document, normal prose and
real stdlib docstrings pass, thresholds set to None switch checks off."""

from __future__ import annotations

import functools
import json
import os.path
import textwrap

import pytest

from slmforge.config import FilterConfig
from slmforge.data.filters import LANGUAGES, STOPWORDS, detect_language, quality_reason
from slmforge.errors import ConfigError

ENGLISH = (
    "The standard library contains built-in modules that provide access to system "
    "functionality such as file input and output, which would otherwise be "
    "inaccessible to Python programmers. Some of these modules are explicitly "
    "designed to encourage and enhance the portability of programs by abstracting "
    "away platform specifics into neutral interfaces."
)
GERMAN = (
    "Die Standardbibliothek enthält eingebaute Module, die den Zugriff auf die "
    "Funktionen des Systems ermöglichen, wie zum Beispiel das Lesen und Schreiben "
    "von Dateien. Einige dieser Module sind so gestaltet, dass sie die Portabilität "
    "von Programmen fördern, und sie werden auch in der Dokumentation beschrieben."
)
FRENCH = (
    "La bibliothèque standard contient des modules intégrés qui donnent accès aux "
    "fonctions du système, comme la lecture et l'écriture des fichiers. Certains de "
    "ces modules sont conçus pour encourager la portabilité des programmes, et ils "
    "sont décrits dans la documentation avec des exemples."
)
PYTHON_SOURCE = textwrap.dedent(
    '''\
    def _merge(a: dict[str, list[int]], b: dict[str, list[int]]) -> dict[str, list[int]]:
        out = {k: [*v] for k, v in a.items()}
        for k, v in b.items():
            out.setdefault(k, []).extend(x ** 2 for x in v if x % 3)
        return {k: sorted(v)[::-1] for k, v in out.items() if v}


    assert _merge({"a": [1]}, {"a": [2], "b": [4, 5]}) == {"a": [4, 1], "b": [25, 16]}
    '''
)

# reason -> (a document that fails exactly that check under the defaults + overrides, overrides)
CRAFTED = {
    "too_short": ("Too short to keep.", {}),
    "too_long": (ENGLISH, {"max_chars": 100}),
    "symbol_ratio": ("The totals are {{[[<<>>]]}} ### $$$ %%% &&& *** !!! ??? ||| ~~~ ^^^ and more ===.", {}),
    "alpha_words": ("Values: 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 and 26.", {}),
    "repeated_lines": (
        "Subscribe to our newsletter\nRead the article below.\nSubscribe to our newsletter\n"
        "The module documentation is here.\nSubscribe to our newsletter\n",
        {},
    ),
    "repeated_ngrams": ("buy cheap watches online today " * 8 + "and find the best deals in the shop.", {}),
    "language": (GERMAN, {"languages": ["en"]}),
}
# The threshold that switches each check off when set to None.
SWITCH = {
    "too_short": "min_chars",
    "too_long": "max_chars",
    "symbol_ratio": "max_symbol_ratio",
    "alpha_words": "min_alpha_word_ratio",
    "repeated_lines": "max_repeated_line_ratio",
    "repeated_ngrams": "max_repeated_ngram_ratio",
    "language": "languages",
}


@pytest.mark.parametrize("reason", list(CRAFTED))
def test_crafted_document_fails_with_its_reason(reason: str) -> None:
    text, overrides = CRAFTED[reason]
    assert quality_reason(text, FilterConfig(**overrides)) == reason


@pytest.mark.parametrize("reason", list(CRAFTED))
def test_threshold_none_switches_the_check_off(reason: str) -> None:
    text, overrides = CRAFTED[reason]
    assert quality_reason(text, FilterConfig(**{**overrides, SWITCH[reason]: None})) != reason


@pytest.mark.parametrize("reason", list(CRAFTED))
def test_normal_english_paragraph_passes_each_check(reason: str) -> None:
    _, overrides = CRAFTED[reason]
    overrides = {k: v for k, v in overrides.items() if k != "max_chars"}
    assert quality_reason(ENGLISH, FilterConfig(**overrides)) is None


def test_all_checks_off_keeps_anything() -> None:
    cfg = FilterConfig(**{name: None for name in SWITCH.values()})
    for text, _ in CRAFTED.values():
        assert quality_reason(text, cfg) is None
    assert quality_reason("", cfg) is None


@pytest.mark.parametrize(
    "doc",
    [
        json.dumps.__doc__,
        json.loads.__doc__,
        os.path.join.__doc__,
        textwrap.dedent.__doc__,
        functools.lru_cache.__doc__,
    ],
    ids=["json.dumps", "json.loads", "os.path.join", "textwrap.dedent", "functools.lru_cache"],
)
def test_stdlib_docstrings_pass_the_defaults(doc: str) -> None:
    assert quality_reason(doc, FilterConfig()) is None


@pytest.mark.parametrize(("text", "language"), [(ENGLISH, "en"), (GERMAN, "de"), (FRENCH, "fr")])
def test_detect_language(text: str, language: str) -> None:
    detected, score = detect_language(text)
    assert detected == language
    assert 0.2 < score <= 1.0


@pytest.mark.parametrize(
    ("text", "language"),
    [
        ("Die Funktion gibt eine Liste der Elemente zurück, die in der Sequenz sind.", "de"),
        ("La función devuelve una lista de los elementos que están en la secuencia.", "es"),
        ("La funzione restituisce una lista degli elementi che sono nella sequenza.", "it"),
        ("A função retorna uma lista dos elementos que estão na sequência.", "pt"),
        ("De functie geeft een lijst van de elementen die in de reeks zitten.", "nl"),
        ("Return a list of the elements that are in the sequence.", "en"),
        # Variables of code and maths are not French or Spanish stopwords.
        ("Return number of leap years in range [y1, y2). Assume y1 <= y2.", "en"),
    ],
)
def test_detect_language_short_sentences(text: str, language: str) -> None:
    assert detect_language(text)[0] == language


def test_detect_language_score_is_share_of_stopwords() -> None:
    assert detect_language("the cat and the dog") == ("en", 3 / 5)


@pytest.mark.parametrize("text", ["", "   \n", "12 34 56", "!!! ???", "Kubernetes Docker Terraform"])
def test_detect_language_without_evidence(text: str) -> None:
    assert detect_language(text) == (None, 0.0)


@pytest.mark.parametrize("text", [GERMAN, FRENCH])
def test_foreign_text_rejected_for_english_only_and_kept_for_any(text: str) -> None:
    assert quality_reason(text, FilterConfig(languages=["en"])) == "language"
    assert quality_reason(text, FilterConfig(languages=None)) is None
    assert quality_reason(text, FilterConfig(languages=["en", "de", "fr"])) is None


def test_low_language_score_is_rejected() -> None:
    text = (
        "Kubernetes Docker Terraform Ansible Prometheus Grafana and Jenkins pipelines everywhere "
        "Helm Istio Envoy Consul Vault Nomad Packer Vagrant Podman Buildah"
    )
    assert detect_language(text) == ("en", 1 / 20)
    assert quality_reason(text, FilterConfig(min_language_score=0.05)) is None
    assert quality_reason(text, FilterConfig(min_language_score=0.2)) == "language"


def test_language_check_skipped_below_twenty_words() -> None:
    short = "Das ist sehr gut und wir sind froh, dass es so ist, aber der Tag war lang."  # 17 words
    longer = short + " Morgen gehen wir in die Stadt."  # 23 words
    assert quality_reason(short, FilterConfig(min_chars=None, languages=["en"])) is None
    assert quality_reason(longer, FilterConfig(min_chars=None, languages=["en"])) == "language"


def test_unknown_language_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="ja"):
        quality_reason(ENGLISH, FilterConfig(languages=["en", "ja"]))


def test_code_skips_symbol_alpha_and_language_checks() -> None:
    assert quality_reason(PYTHON_SOURCE, FilterConfig()) is not None
    assert quality_reason(PYTHON_SOURCE, FilterConfig(), code=True) is None


def test_code_skips_repeated_lines() -> None:
    # `return`, `else:` and `)` repeat in every module; that is not low quality in code.
    code = "def f(x):\n    if x:\n        return 1\n    else:\n        return 2\n" * 3
    assert quality_reason(code, FilterConfig(max_repeated_ngram_ratio=None)) == "repeated_lines"
    assert quality_reason(code, FilterConfig(max_repeated_ngram_ratio=None), code=True) is None


@pytest.mark.parametrize(
    ("text", "overrides", "reason"),
    [
        (PYTHON_SOURCE, {"max_chars": 100}, "too_long"),
        ("x = 1", {}, "too_short"),
        ("x = f(x) + g(x) " * 20, {}, "repeated_ngrams"),
    ],
)
def test_code_keeps_length_and_ngram_checks(text: str, overrides: dict, reason: str) -> None:
    assert quality_reason(text, FilterConfig(**overrides), code=True) == reason


def test_repeated_lines_needs_three_lines() -> None:
    cfg = FilterConfig(min_chars=None)
    assert quality_reason("Subscribe to our newsletter today\nSubscribe to our newsletter today", cfg) is None


def test_repeated_lines_ratio_is_share_of_later_duplicates() -> None:
    # 5 non-empty lines, 2 of which repeat an earlier one: ratio 0.4.
    text = "alpha line one\n\nbeta line two\nalpha line one\ngamma line three\n  alpha line one  \n"
    base = {"min_chars": None, "languages": None}
    assert quality_reason(text, FilterConfig(**base, max_repeated_line_ratio=0.39)) == "repeated_lines"
    assert quality_reason(text, FilterConfig(**base, max_repeated_line_ratio=0.4)) is None


def test_repeated_ngrams_needs_ten_ngrams() -> None:
    cfg = FilterConfig(min_chars=None, languages=None)
    # 10 words = 8 trigrams: too few to judge, even though most of them repeat.
    assert quality_reason("spam eggs ham spam eggs ham spam eggs ham spam", cfg) is None
    # 12 words = 10 trigrams, 3 distinct: 7 repeats.
    assert quality_reason("spam eggs ham " * 4, cfg) == "repeated_ngrams"


def test_repeated_ngrams_are_case_insensitive() -> None:
    text = "Buy Cheap Watches today. buy cheap watches TODAY. BUY CHEAP WATCHES today. and more"
    cfg = FilterConfig(languages=None, repeated_ngram_size=3)
    assert quality_reason(text, cfg) == "repeated_ngrams"


def test_min_chars_ignores_surrounding_whitespace() -> None:
    cfg = FilterConfig(min_chars=10, languages=None)
    assert quality_reason("   short   " + " " * 40, cfg) == "too_short"


def test_stopword_lists_cover_every_language() -> None:
    assert LANGUAGES == ("en", "de", "fr", "es", "it", "pt", "nl")
    for language in LANGUAGES:
        assert 40 <= len(STOPWORDS[language]) <= 90
        assert all(word == word.lower() for word in STOPWORDS[language])
