"""Document quality filters: Gopher/C4-style heuristics on length, symbols,
words, repetition and language.

``quality_reason`` returns the name of the first check a document fails, or
None. The names go into data reports, so they are stable: "too_short",
"too_long", "symbol_ratio", "alpha_words", "repeated_lines", "repeated_ngrams",
"language". Checks run in that order (cheapest first); any threshold set to
None in ``FilterConfig`` turns its check off.

Language detection is a stopword count, not a model: good enough to tell a
German page from an English one in an English corpus, and free. It needs a few
dozen words to be reliable, so documents of fewer than five words skip it.
"""

from __future__ import annotations

import re
from collections import Counter
from types import MappingProxyType
from typing import TYPE_CHECKING

from slmforge.errors import ConfigError

if TYPE_CHECKING:
    from slmforge.config import FilterConfig

# About 60-80 of the most frequent function words per language. Single letters
# other than "a" are left out: in code and maths (x in y, n bytes, for i in ...)
# they are variables, and they made English docstrings look French or Spanish.
_STOPWORDS_TEXT = {
    "en": """the of and to in is that it for as with was on be by this are or an from at
        not but which have has had you they we he she his her its their were been will
        would can if all there one so what when who more no into than then these also a
        do does only other such should may must how each any some our your them my me
        him about after before because between both those where while very""",
    "de": """der die das und ist nicht ein eine einer eines einem einen zu den dem des mit
        sich auf für von im auch als wird werden wurde sind bei oder aus nach wie aber noch
        nur kann hat haben ich sie wir er du dass wenn durch über um mehr diese dieser
        dieses sein zum zur vor schon sehr man doch hier alle bis keine unter ihre ihr
        uns gibt können muss zwischen""",
    "fr": """le la les de des du un une et est en que qui dans pour pas sur au aux avec ce
        ces cette il elle ils elles nous vous je tu on ne se sont par plus mais ou où son
        sa ses leur leurs été être avoir fait comme tout tous aussi très bien peut sans
        entre lui même deux était ont qu à""",
    "es": """el la los las de del en que un una unos es por con para no se su sus al lo
        como más pero le ya este esta esto ese esa eso son entre cuando muy sin sobre
        también me hasta hay donde quien desde todo nos durante todos uno les ni contra
        otros ellos yo otro otra él tanto estos mucho nada cual ella estar estas algo fue
        ha han era está están puede""",
    "it": """il lo la gli le di del della dei delle degli dello è un una uno in che non
        per con da dal dalla su sul sulla al alla ai come ma anche più si sono questo
        questa questi quello quella essere ha hanno era tra fra ci ne se suo sua loro
        mi ti nel nella molto tutto tutti dove quando perché cosa già""",
    "pt": """a os as de do da dos das é um uma uns umas em no na nos nas que para por
        com não se ao aos à às mais mas como seu sua seus suas ele ela eles elas foi são
        ser está também pelo pela pelos pelas isso isto este esta esse essa muito já
        quando onde entre sem sobre até tem há ou nós você lhe só eu""",
    "nl": """de het een en van in is dat op te zijn met voor niet die aan er maar om ook
        als bij of dan nog uit worden wordt door naar was werd heeft hebben kan ze zij
        hij wij ik je dit deze al geen meer zo wat wel hun haar zich tot over onder
        moet kunnen hier daar waar omdat""",
}
STOPWORDS = MappingProxyType({lang: frozenset(words.split()) for lang, words in _STOPWORDS_TEXT.items()})
LANGUAGES = tuple(STOPWORDS)  # ("en", "de", "fr", "es", "it", "pt", "nl")



def _index_stopwords() -> dict[str, tuple[int, ...]]:
    index: dict[str, tuple[int, ...]] = {}
    for i, lang in enumerate(LANGUAGES):
        for word in STOPWORDS[lang]:
            index[word] = (*index.get(word, ()), i)
    return index


# word -> indices into LANGUAGES of the languages it is a stopword of: one dict
# lookup per word instead of one per word and language. Never mutated.
_LANGUAGES_OF_WORD = _index_stopwords()

_LETTER_RUN = re.compile(r"[^\W\d_]+")  # words for language detection (d'un -> d, un)
_HAS_LETTER = re.compile(r"[^\W\d_]")
_SYMBOL = re.compile(r"[^\w\s]|_")  # neither letter, digit nor whitespace
_WHITESPACE = re.compile(r"\s")

# Below these sizes a ratio says little about quality, so the check is skipped.
_MIN_LINES_FOR_REPEAT = 3
_MIN_NGRAMS_FOR_REPEAT = 10  # needs at least max(2n, n + 9) words
# Short technical text ("Raise GeneratorExit inside coroutine.") has too few
# stopwords for a fair verdict: on stdlib docstrings a 5-word minimum dropped
# 250 English documents as "not English", 20 words drops 14.
_MIN_WORDS_FOR_LANGUAGE = 20


def detect_language(text: str) -> tuple[str | None, float]:
    """Guess the language of a text from its stopwords.

    Args:
        text: Any text; words are runs of letters, compared lowercased.

    Returns:
        The language (one of ``LANGUAGES``) with the largest share of its
        stopwords among the words, and that share. Ties go to the language
        listed first. ``(None, 0.0)`` when the text has no words or none of
        them is a stopword of any language.
    """
    words = _LETTER_RUN.findall(text.lower())
    if not words:
        return None, 0.0
    hits = [0] * len(LANGUAGES)
    get = _LANGUAGES_OF_WORD.get
    for word in words:
        for index in get(word, ()):
            hits[index] += 1
    best = max(range(len(LANGUAGES)), key=hits.__getitem__)  # first of equals wins
    if hits[best] == 0:
        return None, 0.0
    return LANGUAGES[best], hits[best] / len(words)


def _symbol_ratio(text: str) -> float:
    non_space = len(text) - len(_WHITESPACE.findall(text))
    return len(_SYMBOL.findall(text)) / non_space if non_space else 0.0


def _repeated_line_ratio(text: str) -> float | None:
    lines = [stripped for line in text.splitlines() if (stripped := line.strip())]
    if len(lines) < _MIN_LINES_FOR_REPEAT:
        return None
    return (len(lines) - len(set(lines))) / len(lines)


def _repeated_ngram_ratio(words: list[str], n: int) -> float | None:
    total = len(words) - n + 1
    if total < _MIN_NGRAMS_FOR_REPEAT or len(words) < 2 * n:
        return None
    lowered = [word.lower() for word in words]
    ngrams = Counter(zip(*(lowered[i:] for i in range(n))))
    # Every occurrence after the first counts: total - distinct.
    return (total - len(ngrams)) / total


def quality_reason(text: str, cfg: FilterConfig, code: bool = False) -> str | None:
    """Name the first quality check a document fails.

    Args:
        text: One cleaned document.
        cfg: The thresholds; any that is None turns its check off.
            ``min_chars`` counts characters after stripping surrounding
            whitespace, ``max_chars`` the raw length.
        code: The document is source code: skip "symbol_ratio", "alpha_words",
            "repeated_lines" and "language", which code fails legitimately
            (``return``, ``else:`` and ``)`` repeat in every module), and keep
            the length and repeated n-gram checks.

    Returns:
        None if the document passes, else one of "too_short", "too_long",
        "symbol_ratio", "alpha_words", "repeated_lines", "repeated_ngrams",
        "language".

    Raises:
        ConfigError: ``cfg.languages`` names a language outside ``LANGUAGES``.
    """
    if cfg.min_chars is not None and len(text.strip()) < cfg.min_chars:
        return "too_short"
    if cfg.max_chars is not None and len(text) > cfg.max_chars:
        return "too_long"
    if not code and cfg.max_symbol_ratio is not None and _symbol_ratio(text) > cfg.max_symbol_ratio:
        return "symbol_ratio"
    words = text.split()
    if not code and cfg.min_alpha_word_ratio is not None:
        has_letter = _HAS_LETTER.search
        alpha = sum(1 for word in words if has_letter(word))
        if (alpha / len(words) if words else 0.0) < cfg.min_alpha_word_ratio:
            return "alpha_words"
    if not code and cfg.max_repeated_line_ratio is not None:
        ratio = _repeated_line_ratio(text)
        if ratio is not None and ratio > cfg.max_repeated_line_ratio:
            return "repeated_lines"
    if cfg.max_repeated_ngram_ratio is not None:
        ratio = _repeated_ngram_ratio(words, cfg.repeated_ngram_size)
        if ratio is not None and ratio > cfg.max_repeated_ngram_ratio:
            return "repeated_ngrams"
    if not code and cfg.languages is not None:
        unknown = set(cfg.languages).difference(LANGUAGES)
        if unknown:
            raise ConfigError(
                f"data.filters.languages has {sorted(unknown)}, which the stopword detector does not know; "
                f"choose from {list(LANGUAGES)} or set it to null to keep every language."
            )
        if len(words) >= _MIN_WORDS_FOR_LANGUAGE:
            language, score = detect_language(text)
            if language not in cfg.languages or score < cfg.min_language_score:
                return "language"
    return None
