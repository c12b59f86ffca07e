"""Cleaning: unicode normalisation, invisible characters, whitespace, enormous
lines, and boilerplate lines repeated across the documents of a source."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable
from typing import Any

from slmforge.config import CleanConfig

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


def strip_lines(text: str, lines: set[Any], key: Callable[[str], object]) -> tuple[str, int]:
    """Remove the given lines from a text; returns the text and how many were removed.

    ``key`` maps a stripped line to what ``lines`` holds (the data stage passes hashes, ``spill.line_hash``)."""
    kept, removed = [], 0
    for line in text.split("\n"):
        if key(line.strip()) in lines:
            removed += 1
        else:
            kept.append(line)
    return _MANY_BLANK.sub("\n\n", "\n".join(kept)).strip("\n"), removed
