"""Synthetic instruction data: documents -> question/answer chat pairs.

Two methods, chosen by name in ``data.synth.method``:
- ``template``: questions from what the document itself names (API names and
  signatures of docstrings, reference topics, headings, "X is a ..." definitions);
  answers are the document's own sentences. Deterministic, offline, instant.
- ``teacher``: ask any OpenAI-compatible endpoint (llama.cpp, vLLM, a hosted API)
  to write pairs grounded in the document.
Pairs are deduplicated by question, and training pairs whose answers overlap
held-out documents are dropped so evaluation stays clean.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from slmforge.config import SynthConfig
from slmforge.data.sources import Document
from slmforge.data.spill import SortedHashes, stable_hash64
from slmforge.endpoints import endpoint_key
from slmforge.errors import DataError


@dataclass
class QAPair:
    question: str
    answer: str
    doc_id: str
    method: str


# --------------------------------------------------------------------------- template

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_MD_HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*$")
_RST_UNDERLINE = re.compile(r"^([=\-~^*#+])\1{2,}\s*$")
_DEFINITION = re.compile(
    r"^(?:An?\s+|The\s+)?(?P<term>[A-Za-z][\w\-]*(?:\s+[\w\-]+){0,3}?)\s+(?:is|are|refers to|means)\s+"
    r"(?:a|an|the|one)\s+[^.]{12,}\."
)
_CODE_LINE = re.compile(r"^(\s{4,}|\t|>>>|\.\.\.\s|\$ |```)")
_MAX_ANSWER = 700


def _pick(doc_id: str, options: list[str]) -> str:
    """A phrasing chosen by the document id: varied across documents, stable across runs."""
    h = int(hashlib.blake2b(doc_id.encode(), digest_size=4).hexdigest(), 16)
    return options[h % len(options)]


def paragraphs(text: str) -> list[str]:
    """Prose paragraphs of a text, wrapped lines joined; code blocks and headings left out."""
    out = []
    for block in re.split(r"\n\s*\n", text):
        lines = [ln for ln in block.split("\n") if ln.strip()]
        if not lines or any(_CODE_LINE.match(ln) for ln in lines):
            continue
        if _MD_HEADING.match(lines[0].strip()) or (len(lines) == 2 and _RST_UNDERLINE.match(lines[1].strip())):
            continue
        joined = " ".join(ln.strip() for ln in lines)
        if len(joined) >= 20:
            out.append(joined)
    return out


def _trim(text: str, limit: int = _MAX_ANSWER) -> str:
    """Cut at the last sentence end before ``limit`` characters."""
    if len(text) <= limit:
        return text
    cut = text[:limit]
    ends = [m.end() for m in re.finditer(r"[.!?](?=\s|$)", cut)]
    return cut[: ends[-1]] if ends and ends[-1] > limit // 3 else cut.rsplit(" ", 1)[0] + " ..."


def sections(text: str) -> list[tuple[str, str]]:
    """(heading, body) pairs from Markdown (#) or reStructuredText (underlined) headings."""
    lines = text.split("\n")
    out: list[tuple[str, list[str]]] = []
    heading, body = "", []
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        md = _MD_HEADING.match(line)
        rst = i + 1 < len(lines) and line and _RST_UNDERLINE.match(lines[i + 1].strip()) and len(line) < 100
        if md or rst:
            if heading:
                out.append((heading, body))
            heading, body = (md.group(2) if md else line), []
            i += 1 if md else 2
            continue
        body.append(lines[i])
        i += 1
    if heading:
        out.append((heading, body))
    return [(h, "\n".join(b)) for h, b in out]


def template_pairs(doc: Document, max_pairs: int) -> list[QAPair]:
    """Question/answer pairs made from what the document names and defines."""
    pairs: list[tuple[str, str]] = []
    name = doc.meta.get("name", "")
    obj = doc.meta.get("object", "")
    if doc.kind == "docstring":
        paras = paragraphs(doc.meta.get("doc", doc.text))
        if paras:
            if obj == "function":
                q = _pick(doc.id, ["What does `{n}` do?", "Explain what `{n}` does.", "What is `{n}` used for?"])
            elif obj == "class":
                q = _pick(doc.id, ["What is the `{n}` class?", "Describe the class `{n}`.", "What is `{n}` for?"])
            else:
                q = _pick(doc.id, ["What is the `{n}` module for?", "Describe the `{n}` module.", "What does `{n}` provide?"])
            pairs.append((q.format(n=name), _trim(paras[0])))
        header = doc.meta.get("header", "")
        if obj == "function" and "(" in header:
            signature = header.split(" ", 1)[1] if header.startswith(("def ", "async def ")) else header
            signature = signature.removeprefix("def ").strip()
            pairs.append((f"What is the signature of `{name}`?", f"`{signature}`"))
        if len(paras) > 1:
            pairs.append((f"Tell me more about `{name}`.", _trim(paras[1])))
    elif doc.kind == "topic":
        paras = paragraphs(doc.text)
        if paras:
            q = _pick(doc.id, ["Explain {n} in Python.", "What does the Python reference say about {n}?"])
            pairs.append((q.format(n=f"'{name}'"), _trim(" ".join(paras[:2]))))
    elif not doc.is_code:
        for heading, body in sections(doc.text):
            paras = paragraphs(body)
            if paras and len(pairs) < max_pairs:
                q = _pick(doc.id + heading, ["What does the documentation say about {h}?", "Explain {h}.", "Tell me about {h}."])
                pairs.append((q.format(h=heading.strip(" :")), _trim(paras[0])))
        for para in paragraphs(doc.text):
            for sentence in _SENTENCE_END.split(para):
                m = _DEFINITION.match(sentence)
                if m and len(pairs) < max_pairs:
                    pairs.append((f"What is {m.group('term')}?", sentence.strip()))
    return [QAPair(q, a, doc.id, "template") for q, a in pairs[:max_pairs] if q.strip() and a.strip()]


# --------------------------------------------------------------------------- teacher

_TEACHER_SYSTEM = (
    "You write training data for a domain assistant. Given a document, write question/answer pairs "
    "that a user of this domain would ask, answered only from the document. Reply with JSON only: "
    '{"pairs": [{"question": "...", "answer": "..."}]}'
)


def _parse_pairs(content: str) -> list[tuple[str, str]]:
    text = content.strip()
    text = re.sub(r"^```(?:json)?\s*|\s*```$", "", text)
    start = min((i for i in (text.find("{"), text.find("[")) if i >= 0), default=-1)
    if start < 0:
        raise ValueError("no JSON in the answer")
    data, _ = json.JSONDecoder().raw_decode(text[start:])
    items = data.get("pairs", []) if isinstance(data, dict) else data
    out = []
    for item in items if isinstance(items, list) else []:
        if isinstance(item, dict):
            q, a = item.get("question"), item.get("answer")
            if isinstance(q, str) and isinstance(a, str) and q.strip() and a.strip():
                out.append((q.strip(), a.strip()))
    if not out:
        raise ValueError("JSON has no question/answer pairs")
    return out


def teacher_pairs(
    docs: list[Document],
    cfg: SynthConfig,
    on_done: Callable[[], None] | None = None,
) -> tuple[list[QAPair], Counter[str]]:
    """Ask the configured OpenAI-compatible teacher for pairs, several requests at once.

    Returns:
        The pairs, and error counts by kind (``http_error``, ``bad_json``, ...).

    Raises:
        DataError: The first requests all fail to connect (wrong URL, server down).
    """
    import httpx

    teacher = cfg.teacher
    if teacher is None:
        raise DataError("data.synth.method is 'teacher' but data.synth.teacher is not set; set base_url and model.")
    # Only the key named for this endpoint, never in clear text to another machine (slmforge.endpoints).
    key = endpoint_key(teacher.base_url, teacher.api_key_env, teacher.allow_insecure_http,
                       where="data.synth.teacher", error=DataError)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    url = teacher.base_url.rstrip("/") + "/chat/completions"
    errors: Counter[str] = Counter()
    pairs: list[QAPair] = []

    def ask(client: httpx.Client, doc: Document) -> list[tuple[str, str]]:
        body = {
            "model": teacher.model,
            "temperature": teacher.temperature,
            "max_tokens": teacher.max_tokens,
            "messages": [
                {"role": "system", "content": _TEACHER_SYSTEM},
                {
                    "role": "user",
                    "content": f"Write up to {cfg.max_pairs_per_document} pairs.\n\nDocument:\n{doc.text[:6000]}",
                },
            ],
        }
        resp = client.post(url, json=body)
        resp.raise_for_status()
        return _parse_pairs(resp.json()["choices"][0]["message"]["content"])

    with httpx.Client(timeout=teacher.timeout_s, headers=headers) as client:
        pool = ThreadPoolExecutor(max_workers=teacher.concurrency)
        futures = {pool.submit(ask, client, d): d for d in docs}
        done = 0
        try:
            for fut in as_completed(futures):
                done += 1
                doc = futures[fut]
                try:
                    got = fut.result()
                    pairs.extend(QAPair(q, a, doc.id, "teacher") for q, a in got[: cfg.max_pairs_per_document])
                except httpx.TransportError as exc:
                    errors["connection"] += 1
                    if errors["connection"] == done and done >= min(3, len(docs)):
                        raise DataError(
                            f"The teacher at {url} cannot be reached ({type(exc).__name__}: {exc}). Start it, fix "
                            "data.synth.teacher.base_url, or use data.synth.method: template."
                        ) from None
                except httpx.HTTPStatusError as exc:
                    errors[f"http_{exc.response.status_code}"] += 1
                except (ValueError, KeyError, IndexError, TypeError):
                    errors["bad_answer"] += 1
                if on_done:
                    on_done()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
    return pairs, errors


# --------------------------------------------------------------------------- cleaning pairs


_WORD = re.compile(r"\w+")
_MIX = np.uint64(0x9E3779B97F4A7C15)  # odd: multiplying by it is a bijection on 64-bit integers


def ngram_hashes(text: str, n: int = 8) -> np.ndarray:
    """The distinct word ``n``-grams of ``text`` (lower-cased ``\\w+`` words) as sorted 64-bit hashes, the same
    in every process: each word hashed once with ``spill.stable_hash64``, then each position's ``n`` word hashes
    chained in numpy (xor, multiply by an odd constant, xor-shift: every step a bijection, so two n-grams
    collide only as two random 64-bit keys would)."""
    words = _WORD.findall(text.lower())
    m = len(words) - n + 1
    if m <= 0:
        return np.zeros(0, dtype=np.uint64)
    known = {w: stable_hash64(w) for w in set(words)}
    w = np.fromiter((known[x] for x in words), dtype=np.uint64, count=len(words))
    h = np.zeros(m, dtype=np.uint64)
    for k in range(n):
        h ^= w[k : k + m]
        h *= _MIX  # wraps modulo 2^64, as intended
        h ^= h >> np.uint64(29)
    return np.unique(h)


def heldout_ngrams(texts: Iterable[str], path: Path) -> SortedHashes:
    """The word 8-grams of the held-out (validation and test) documents, as a sorted set of hashes in ``path``
    (memory-mapped; ``spill.SortedHashes``), for ``filter_pairs``."""
    held = SortedHashes(path)
    for t in texts:
        held.add(ngram_hashes(t))
    return held.freeze()


def filter_pairs(
    pairs: Iterable[QAPair], heldout: SortedHashes | None, max_overlap: float, dropped: Counter[str]
) -> Iterator[QAPair]:
    """The pairs without repeated questions and without those whose answer overlaps the held-out documents,
    yielded as they are checked (nothing is held but a 64-bit hash per kept question).

    Args:
        pairs: Candidate pairs (from training documents).
        heldout: ``heldout_ngrams`` of the validation and test documents; None checks questions only.
        max_overlap: Largest allowed share of an answer's distinct word 8-grams found in held-out text.
        dropped: Counts of dropped pairs by reason (``duplicate_question``, ``heldout_overlap``), updated as
            the pairs are read.
    """
    seen: set[int] = set()
    for p in pairs:
        key = stable_hash64(" ".join(p.question.lower().split()))
        if key in seen:
            dropped["duplicate_question"] += 1
            continue
        if heldout is not None and len(heldout):
            grams = ngram_hashes(p.answer)
            if grams.size and heldout.count_in(grams) / grams.size > max_overlap:
                dropped["heldout_overlap"] += 1
                continue
        seen.add(key)
        yield p


def to_chat(pair: QAPair, index: int, system_prompt: str | None) -> dict:
    """The chat JSONL record of a pair."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages += [{"role": "user", "content": pair.question}, {"role": "assistant", "content": pair.answer}]
    return {"id": f"{pair.doc_id}#qa{index}", "messages": messages, "source_id": pair.doc_id, "method": pair.method}
