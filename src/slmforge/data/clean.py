"""Cleaning: unicode normalisation, invisible characters, whitespace, enormous
lines, and boilerplate lines repeated across the documents of a source."""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Callable
from typing import Any

from slmforge.config import CleanConfig
from slmforge.data.sources import Document

# Control and format characters except tab and newline (zero-width spaces, BOMs,
# bidi marks, stray escape codes). They are invisible, break tokenisation and
# are a favourite of copy-pasted web text.
_INVISIBLE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\u200b-\u200f\u202a-\u202e\u2060-\u2064\ufeff]")
_TRAILING_WS = re.compile(r"[ \t\u00a0]+$", re.MULTILINE)
_MANY_BLANK = re.compile(r"\n{3,}")
# Prose kinds whose repeated lines are boilerplate; code repeats lines legitimately.
PROSE_KINDS = {"txt", "md", "rst", "html", "pdf", "jsonl", "parquet", "csv"}


def clean_text(text: str, cfg: CleanConfig) -> tuple[str, int]:
    """Normalise one document.

    Returns:
        The cleaned text and the number of lines removed for being longer than
        ``cfg.max_line_chars``.
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if cfg.unicode_form != "none":
        text = unicodedata.normalize(cfg.unicode_form, text)
    text = _INVISIBLE.sub("", text)
    text = _TRAILING_WS.sub("", text)
    long_lines = 0
    if len(text) > cfg.max_line_chars:  # cheap pre-check: no line can be too long otherwise
        kept = []
        for line in text.split("\n"):
            if len(line) > cfg.max_line_chars:
                long_lines += 1
            else:
                kept.append(line)
        text = "\n".join(kept)
    text = _MANY_BLANK.sub("\n\n", text).strip("\n")
    return text, long_lines


def boilerplate_lines(
    docs: list[Document], min_docs: int = 3, min_share: float = 0.2
) -> dict[tuple[str, str], set[str]]:
    """Lines that repeat across many prose documents of the same source and format.

    A line (stripped, at least 12 characters) is boilerplate for a group (source,
    kind) when it occurs in at least ``min_docs`` of the group's documents and in
    at least ``min_share`` of them: navigation, cookie notices, licence footers.

    Returns:
        (source, kind) -> set of boilerplate lines.
    """
    per_group: dict[tuple[str, str], Counter[str]] = {}
    totals: Counter[tuple[str, str]] = Counter()
    for doc in docs:
        if doc.kind not in PROSE_KINDS:
            continue
        group = (doc.source, doc.kind)
        totals[group] += 1
        lines = {line.strip() for line in doc.text.split("\n") if len(line.strip()) >= 12}
        per_group.setdefault(group, Counter()).update(lines)
    out: dict[tuple[str, str], set[str]] = {}
    for group, counts in per_group.items():
        need = max(min_docs, min_share * totals[group])
        found = {line for line, n in counts.items() if n >= need}
        if found:
            out[group] = found
    return out


def strip_lines(text: str, lines: set[Any], key: Callable[[str], object] | None = None) -> tuple[str, int]:
    """Remove the given lines from a text; returns the text and how many were removed.

    ``key`` maps a stripped line to what ``lines`` holds (the data stage passes hashes, ``spill.line_hash``)."""
    kept, removed = [], 0
    for line in text.split("\n"):
        stripped = line.strip()
        if (key(stripped) if key else stripped) in lines:
            removed += 1
        else:
            kept.append(line)
    return _MANY_BLANK.sub("\n\n", "\n".join(kept)).strip("\n"), removed
