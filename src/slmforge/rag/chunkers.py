"""Chunkers by name: a document's text -> ``Chunk``s, each with its character span in that text.

- ``fixed``: windows of ``size`` tokens, neighbours sharing ``overlap`` tokens.
- ``recursive``: by structure: a markdown heading starts a chunk, a fenced code block is never cut,
  paragraphs are packed up to ``size`` tokens; a paragraph larger than that falls back to sentences,
  a sentence larger than that to fixed windows.
- ``sentence``: whole sentences packed up to ``size`` tokens.
- ``semantic``: sentences, split where the embedding similarity of neighbouring sentences drops below
  the ``percentile``-th percentile of the document's neighbour similarities (and at ``size`` tokens).

"Tokens" are the embedder's own (``token_spans``), so a chunk fits the embedder's window. Spans always
satisfy ``text[chunk.start:chunk.end] == chunk.text``. Written here rather than taken from LangChain or
LlamaIndex splitters: those return strings without reliable offsets (citations need the span) and would
pull a framework into the core for ~150 lines.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from slmforge.errors import ConfigError

TokenSpans = Callable[[str], list[tuple[int, int]]]
Embed = Callable[[list[str]], np.ndarray]

CHUNKERS = ("fixed", "recursive", "sentence", "semantic")

_WORD = re.compile(r"\w+|[^\w\s]")
_SENTENCE = re.compile(r"[^.!?\n]+(?:[.!?]+[\"')\]]*|\n|$)")
_HEADING = re.compile(r"^#{1,6}\s", re.M)
_FENCE = re.compile(r"^```[^\n]*\n.*?^```[^\n]*$", re.M | re.S)


@dataclass
class Chunk:
    """A piece of a document: its text, where it is, and what identifies it."""

    doc_id: str
    text: str
    start: int
    end: int
    source: str = ""  # the file path (or built-in source) of the document
    title: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def hash(self) -> str:
        """The content hash: a chunk with the same text reuses its embedding."""
        return hashlib.sha256(self.text.encode("utf-8", "surrogatepass")).hexdigest()[:32]

    @property
    def id(self) -> str:
        """Stable across runs: the document, the span and the content."""
        return hashlib.sha256(f"{self.doc_id}\x00{self.start}\x00{self.end}\x00{self.hash}".encode(
            "utf-8", "surrogatepass")).hexdigest()[:32]


def word_spans(text: str) -> list[tuple[int, int]]:
    """Words and punctuation marks: the token spans of embedders without a tokenizer of their own."""
    return [m.span() for m in _WORD.finditer(text)]


def _trim(text: str, start: int, end: int) -> tuple[int, int]:
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


def _windows(text: str, start: int, end: int, spans: TokenSpans, size: int, overlap: int) -> list[tuple[int, int]]:
    """Spans of ``size``-token windows over text[start:end], stepping ``size - overlap`` tokens."""
    toks = [(a + start, b + start) for a, b in spans(text[start:end])]
    if not toks:
        return []
    step = max(1, size - overlap)
    out = []
    for i in range(0, len(toks), step):
        window = toks[i : i + size]
        out.append((window[0][0], window[-1][1]))
        if i + size >= len(toks):
            break
    return out


def _sentences(text: str, start: int = 0, end: int | None = None) -> list[tuple[int, int]]:
    end = len(text) if end is None else end
    out = []
    for m in _SENTENCE.finditer(text, start, end):
        a, b = _trim(text, *m.span())
        if a < b:
            out.append((a, b))
    return out


def _pack(units: list[tuple[int, int]], counts: list[int], size: int) -> list[tuple[int, int]]:
    """Consecutive units joined while their token count stays within ``size``."""
    out: list[tuple[int, int]] = []
    cur: tuple[int, int] | None = None
    n = 0
    for (a, b), c in zip(units, counts):
        if cur is not None and n + c <= size:
            cur, n = (cur[0], b), n + c
        else:
            if cur is not None:
                out.append(cur)
            cur, n = (a, b), c
    if cur is not None:
        out.append(cur)
    return out


def _blocks(text: str) -> list[tuple[int, int, bool]]:
    """(start, end, starts a section) of fenced code blocks and paragraphs, in order."""
    fences = [m.span() for m in _FENCE.finditer(text)]
    out: list[tuple[int, int, bool]] = []
    pos = 0
    for fa, fb in [*fences, (len(text), len(text))]:
        for m in re.finditer(r"(?:[^\n]|\n(?![ \t]*\n))+", text[pos:fa]):
            a, b = _trim(text, pos + m.start(), pos + m.end())
            if a < b:
                out.append((a, b, bool(_HEADING.match(text, a))))
        if fa < fb:
            out.append((fa, fb, False))
        pos = fb
    return out


def _recursive(text: str, spans: TokenSpans, size: int, overlap: int) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    section: list[tuple[int, int]] = []
    counts: list[int] = []

    def flush() -> None:
        out.extend(_pack(section, counts, size))
        section.clear()
        counts.clear()

    pending: int | None = None  # where a heading line waits for the block it titles
    for a, b, heading in _blocks(text):
        if heading:
            flush()
            if "\n" not in text[a:b]:  # a heading alone never makes a chunk: it goes with what follows
                pending = a
                continue
        head, pending = (a if pending is None else pending), None
        n = len(spans(text[head:b]))
        code = text.startswith("```", a)
        if n <= size or code:  # a code block is kept whole, however long
            section.append((head, b))
            counts.append(n)
            continue
        first = True
        for sa, sb in _sentences(text, a, b):  # a paragraph too long: its sentences, then windows
            m = len(spans(text[sa:sb]))
            parts = [(sa, sb)] if m <= size else _windows(text, sa, sb, spans, size, overlap)
            for pa, pb in parts:
                section.append((head if first else pa, pb))  # the heading, if any, opens the first piece
                counts.append(min(m, size))
                first = False
    if pending is not None:  # a document ending with a heading
        section.append((pending, len(text.rstrip())))
        counts.append(len(spans(text[pending:])))
    flush()
    return out


def _semantic(text: str, spans: TokenSpans, embed: Embed | None, size: int, percentile: float) -> list[tuple[int, int]]:
    if embed is None:
        raise ConfigError("The semantic chunker needs an embedder to compare neighbouring sentences.")
    sents = _sentences(text)
    if len(sents) < 3:
        return _pack(sents, [len(spans(text[a:b])) for a, b in sents], size)
    vecs = embed([text[a:b] for a, b in sents])
    vecs = vecs / np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)
    sims = np.sum(vecs[:-1] * vecs[1:], axis=1)
    cut = float(np.percentile(sims, percentile))
    out: list[tuple[int, int]] = []
    cur_a, cur_b = sents[0]
    n = len(spans(text[cur_a:cur_b]))
    for i in range(1, len(sents)):
        a, b = sents[i]
        m = len(spans(text[a:b]))
        if sims[i - 1] < cut or n + m > size:
            out.append((cur_a, cur_b))
            cur_a, n = a, 0
        cur_b, n = b, n + m
    out.append((cur_a, cur_b))
    return out


def batched_sentence_embed(texts: list[str], embed: Embed) -> Embed:
    """An ``embed`` for the semantic chunker over ``texts`` whose sentences were all embedded in one call.

    The chunker embeds one document's sentences at a time, a few short sentences per call, which kept the
    embedder far below its batched speed (a run over the python-docs corpus was stopped unfinished); this
    way chunking that corpus takes ~3 minutes (docs/BENCHMARKS.md). Sentences it is later
    asked for that were not prefetched are embedded then.
    """
    sentences = list(dict.fromkeys(t[a:b] for t in texts if len(spans := _sentences(t)) >= 3 for a, b in spans))
    table: dict[str, np.ndarray] = dict(zip(sentences, embed(sentences), strict=True)) if sentences else {}

    def lookup(items: list[str]) -> np.ndarray:
        missing = [s for s in dict.fromkeys(items) if s not in table]
        if missing:
            table.update(zip(missing, embed(missing), strict=True))
        return np.stack([table[s] for s in items])

    return lookup


def chunk_text(
    text: str,
    chunker: str = "recursive",
    size: int = 200,
    overlap: int = 40,
    spans: TokenSpans = word_spans,
    embed: Embed | None = None,
    percentile: float = 25.0,
) -> list[tuple[int, int]]:
    """The (start, end) character spans of the chunks of ``text``.

    Raises:
        ConfigError: An unknown chunker, an overlap not smaller than the size, or semantic without ``embed``.
    """
    if chunker not in CHUNKERS:
        raise ConfigError(f"Unknown chunker {chunker!r} (rag.chunker); choose one of {', '.join(CHUNKERS)}.")
    if overlap >= size:
        raise ConfigError(f"rag.overlap_tokens ({overlap}) must be smaller than rag.chunk_tokens ({size}).")
    if chunker == "fixed":
        return _windows(text, 0, len(text), spans, size, overlap)
    if chunker == "sentence":
        sents = _sentences(text)
        return _pack(sents, [len(spans(text[a:b])) for a, b in sents], size)
    if chunker == "semantic":
        return _semantic(text, spans, embed, size, percentile)
    return _recursive(text, spans, size, overlap)


def chunk_document(doc: Any, chunker: str = "recursive", size: int = 200, overlap: int = 40,
                   spans: TokenSpans = word_spans, embed: Embed | None = None,
                   percentile: float = 25.0) -> list[Chunk]:
    """``chunk_text`` over a data-stage ``Document``, as ``Chunk``s carrying its id, path and title."""
    source = doc.path or doc.source
    return [Chunk(doc.id, doc.text[a:b], a, b, source, doc.title, {"kind": doc.kind})
            for a, b in chunk_text(doc.text, chunker, size, overlap, spans, embed, percentile)]
