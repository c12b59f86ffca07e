"""Answers from the documents: retrieve, give the model numbered sources, return its answer with the
sources it cited (document, path and character span), or say plainly that the documents do not
contain the answer.

"Not in the documents" is decided before any generation: when no retrieved chunk's cosine similarity
to the question reaches ``min_score`` (``rag.min_score``), the model is not asked at all, so a small
model cannot invent an answer from unrelated sources. 0.25 suits all-MiniLM-L6-v2, whose unrelated
English sentences score about 0.0-0.15 and paraphrases 0.5 and above; another embedder may need
another threshold (``slmforge rag query --json`` prints every source's score).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

from slmforge.rag.index import Index
from slmforge.rag.retrieve import Hit, retrieve

NOT_IN_DOCUMENTS = "Not in the documents: nothing retrieved from the index is relevant to this question."
SYSTEM = ("Answer the question using only the numbered sources. After each claim, cite its source as [n]. "
          "If the sources do not contain the answer, reply exactly: Not in the documents.")
_CITE = re.compile(r"\[(\d+(?:\s*,\s*\d+)*)\]")


@dataclass
class Source:
    n: int
    doc_id: str
    path: str
    start: int
    end: int
    text: str
    score: float


@dataclass
class Answer:
    question: str
    text: str
    grounded: bool  # False: nothing relevant was retrieved, the text is NOT_IN_DOCUMENTS
    sources: list[Source] = field(default_factory=list)  # every source the model was given
    cited: list[int] = field(default_factory=list)  # the source numbers its answer cites, in order

    def citations(self) -> list[Source]:
        return [s for s in self.sources if s.n in self.cited]

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "citations": [asdict(s) for s in self.citations()]}

    def render(self) -> str:
        """The answer followed by its cited sources, one per line (all sources when it cites none)."""
        if not self.grounded:
            return self.text
        listed = self.citations() or self.sources
        return self.text.strip() + "\n\n" + "\n".join(
            f"[{s.n}] {s.path}:{s.start}-{s.end}" for s in listed)


def build_prompt(question: str, hits: list[Hit]) -> str:
    blocks = [f"[{i}] ({h.chunk.source}) {h.chunk.text}" for i, h in enumerate(hits, start=1)]
    return "Sources:\n" + "\n\n".join(blocks) + f"\n\nQuestion: {question}"


def parse_citations(text: str, n_sources: int) -> list[int]:
    """Source numbers cited as [n] or [n, m], in order of first appearance, keeping only real sources."""
    out: list[int] = []
    for m in _CITE.finditer(text):
        for part in m.group(1).split(","):
            n = int(part)
            if 1 <= n <= n_sources and n not in out:
                out.append(n)
    return out


def answer(index: Index, generator: Any, question: str, mode: str = "hybrid", k: int = 5,
           where: dict[str, Any] | None = None, mmr_lambda: float | None = None, rerank: str = "none",
           reranker: Any = None, min_score: float = 0.25, max_new_tokens: int = 200) -> Answer:
    """Answer ``question`` from ``index`` with ``generator`` (any slmforge engine: torch, ONNX, llama.cpp,
    an OpenAI-compatible endpoint), greedy."""
    hits = retrieve(index, question, mode, k, where, mmr_lambda, rerank, reranker, generator)
    relevant = [h for h in hits if h.dense >= min_score]
    if not relevant:
        return Answer(question, NOT_IN_DOCUMENTS, False)
    return answer_from(generator, question, relevant, max_new_tokens)


def answer_from(generator: Any, question: str, hits: list[Hit], max_new_tokens: int = 200) -> Answer:
    """The generator's cited answer from these sources (found by any retrieval: the index's, a graph's),
    greedy; no relevance threshold is applied here."""
    from slmforge.generate import SamplingParams

    sources = [Source(i, h.chunk.doc_id, h.chunk.source, h.chunk.start, h.chunk.end, h.chunk.text, round(h.dense, 4))
               for i, h in enumerate(hits, start=1)]
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": build_prompt(question, hits)}]
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, repetition_penalty=1.1)
    text = generator.chat(messages, params)[0].text.strip()
    return Answer(question, text, True, sources, parse_citations(text, len(sources)))
