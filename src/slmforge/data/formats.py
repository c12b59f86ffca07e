"""Encoder-style (BERT) training records: classification labels and NER tags.

NER tags come from records that already carry ``tokens``/``tags``, or from a
gazetteer (label -> terms) matched over the text: weak supervision that turns
domain documents into a token-classification set with no annotation work.
"""

from __future__ import annotations

import builtins
import re
import sys
from collections.abc import Iterator
from pathlib import Path

from slmforge.config import DataConfig
from slmforge.data.sources import Document

# Words, dotted names (os.path.join), numbers, and single punctuation marks.
_TOKEN = re.compile(r"[^\W\d]\w*(?:\.[^\W\d]\w*)*|\d+(?:[.,]\d+)*|[^\w\s]", re.UNICODE)


def ner_tokens(text: str) -> list[str]:
    return _TOKEN.findall(text)


def classification_label(doc: Document, label_from: str) -> str | None:
    """The label of a document under ``data.classification.label_from``."""
    if label_from == "field":
        return doc.label
    if label_from == "folder":
        return Path(doc.path).parent.name or None if doc.path else None
    return doc.meta.get("object") or doc.kind  # "source"


class Gazetteer:
    """Longest-match tagger over token sequences."""

    def __init__(self, entries: dict[str, list[str]]) -> None:
        self._index: dict[str, list[tuple[tuple[str, ...], str]]] = {}
        for label, terms in entries.items():
            for term in terms:
                toks = tuple(ner_tokens(term))
                if toks:
                    self._index.setdefault(toks[0], []).append((toks, label))
        for options in self._index.values():
            options.sort(key=lambda x: -len(x[0]))

    def tag(self, tokens: list[str]) -> list[str]:
        tags = ["O"] * len(tokens)
        i = 0
        while i < len(tokens):
            for toks, label in self._index.get(tokens[i], ()):
                if tuple(tokens[i : i + len(toks)]) == toks:
                    tags[i] = f"B-{label}"
                    for j in range(i + 1, i + len(toks)):
                        tags[j] = f"I-{label}"
                    i += len(toks) - 1
                    break
            i += 1
        return tags


# Module names that are also everyday English words are tagged only when used as
# a module (dotted, or after import/from), never in running prose.
_AMBIGUOUS_MODULES = {
    "abc", "array", "ast", "base64", "calendar", "cmd", "code", "copy", "dis", "email", "enum", "glob", "html",
    "http", "io", "keyword", "locale", "math", "numbers", "operator", "parser", "platform", "profile", "queue",
    "random", "resource", "secrets", "select", "shelve", "signal", "site", "socket", "stat", "string", "struct",
    "symtable", "test", "this", "time", "token", "trace", "types", "typing", "uuid", "wave", "zipapp",
}


class PythonTagger:
    """Built-in rules for the python-docs domain: MODULE, BUILTIN and EXCEPTION."""

    def __init__(self) -> None:
        self.modules = {m for m in sys.stdlib_module_names if not m.startswith("_")}
        self.exceptions = {
            n for n in dir(builtins) if isinstance(getattr(builtins, n), type) and issubclass(getattr(builtins, n), BaseException)
        }
        self.functions = {n for n in dir(builtins) if not n.startswith("_") and n not in self.exceptions}

    def tag(self, tokens: list[str]) -> list[str]:
        tags = ["O"] * len(tokens)
        for i, tok in enumerate(tokens):
            prev = tokens[i - 1] if i else ""
            nxt = tokens[i + 1] if i + 1 < len(tokens) else ""
            head = tok.split(".", 1)[0]
            if tok in self.exceptions:
                tags[i] = "B-EXCEPTION"
            elif head in self.modules and ("." in tok or prev in ("import", "from") or head not in _AMBIGUOUS_MODULES):
                tags[i] = "B-MODULE"
            elif tok in self.functions and nxt == "(":
                tags[i] = "B-BUILTIN"
        return tags


def ner_examples(doc: Document, cfg: DataConfig, tagger) -> Iterator[dict]:
    """NER records of a document: its own tokens/tags, or gazetteer tags over chunks of
    at most ``ner.max_tokens`` tokens. Chunks without any entity are left out."""
    given = doc.meta.get("ner")
    if given:
        yield {"id": doc.id, "tokens": given["tokens"], "tags": given["tags"]}
        return
    if tagger is None:
        return
    size = cfg.ner.max_tokens
    for line_block in re.split(r"\n\s*\n", doc.text):
        tokens = ner_tokens(line_block)
        for start in range(0, len(tokens), size):
            chunk = tokens[start : start + size]
            tags = tagger.tag(chunk)
            if any(t != "O" for t in tags):
                yield {"id": f"{doc.id}#ner{start}", "tokens": chunk, "tags": tags}


class _Combined:
    def __init__(self, taggers: list) -> None:
        self.taggers = taggers

    def tag(self, tokens: list[str]) -> list[str]:
        out = ["O"] * len(tokens)
        for tagger in self.taggers:  # earlier taggers win where both tag a token
            for i, t in enumerate(tagger.tag(tokens)):
                if out[i] == "O" and t != "O":
                    out[i] = t
        return out


def make_tagger(cfg: DataConfig):
    """The tagger the config asks for, or None when NER labels must come from the records."""
    taggers: list = []
    if cfg.ner.gazetteer:
        taggers.append(Gazetteer(cfg.ner.gazetteer))
    if cfg.ner.builtin_gazetteer == "python":
        taggers.append(PythonTagger())
    if not taggers:
        return None
    return taggers[0] if len(taggers) == 1 else _Combined(taggers)
