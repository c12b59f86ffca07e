"""Grounded chat: a request naming a knowledge base (``{"knowledge": {"base": "docs"}}``, or any request to a
model served with ``knowledge:``) is answered from that ``slmforge rag`` index.

The last user message is the question. Retrieval runs first; when nothing relevant is found the reply is
``rag.NOT_IN_DOCUMENTS`` and the model is not called. Otherwise the model gets the rag system prompt and
the numbered sources in place of the question, and the reply carries its citations twice: as text
(a "Sources:" list after the answer, for clients that show only ``content``) and structured
(``message.citations`` and the top-level ``citations``: document, path, character span, text, score).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from slmforge.serve.protocol import ApiError, ChatRequest


@dataclass
class KnowledgeBase:
    """An opened index and the retrieval settings its requests default to (the project's ``rag``)."""

    index: Any  # slmforge.rag.Index
    mode: str = "hybrid"
    k: int = 5
    min_score: float = 0.25
    mmr: float | None = None
    graph: Any = None  # slmforge.graphrag.Graph, when the index has one (`slmforge graph build`)


@dataclass
class Grounding:
    messages: list[dict[str, Any]]  # what the model is given instead of the client's messages
    sources: list[Any]  # slmforge.rag.answer.Source, numbered from 1


def ground(bases: dict[str, KnowledgeBase], name: str, body: ChatRequest, raw: list[dict[str, Any]]) -> Grounding:
    """Retrieve for the last user message and rewrite the conversation around the sources.

    Raises:
        ApiError: 400 for an unknown knowledge base, a conversation without a user message, or a bad filter.
    """
    from slmforge.errors import RagError
    from slmforge.rag.answer import SYSTEM, Source, build_prompt
    from slmforge.rag.retrieve import retrieve

    if name not in bases:
        raise ApiError(400, f"Unknown knowledge base {name!r}; this server has: {', '.join(sorted(bases)) or '(none)'}"
                       " (serve.knowledge, or --knowledge NAME=FOLDER).", "invalid_request_error", "knowledge")
    kb, opts = bases[name], body.knowledge
    last = next((i for i in range(len(raw) - 1, -1, -1) if raw[i]["role"] == "user"), None)
    if last is None or not isinstance(raw[last]["content"], str) or not raw[last]["content"].strip():
        raise ApiError(400, "A grounded chat needs a user message with the question as text.",
                       "invalid_request_error", "messages")
    question = raw[last]["content"]
    mode, k = (opts and opts.mode) or kb.mode, (opts and opts.k) or kb.k
    try:
        hits = (_graph_hits(kb, name, question, k) if mode == "graph"
                else retrieve(kb.index, question, mode, k, opts.where if opts else None, kb.mmr))
    except RagError as exc:
        raise ApiError(400, str(exc), "invalid_request_error", "knowledge") from None
    floor = opts.min_score if opts and opts.min_score is not None else kb.min_score
    relevant = [h for h in hits if h.dense >= floor]
    sources = [Source(i, h.chunk.doc_id, h.chunk.source, h.chunk.start, h.chunk.end, h.chunk.text, round(h.dense, 4))
               for i, h in enumerate(relevant, start=1)]
    system = [m for m in raw[:last] if m["role"] == "system"]
    theirs = "\n\n".join(m["content"] for m in system if isinstance(m["content"], str))
    history = [m for m in raw[:last] if m["role"] != "system"]
    messages = [{"role": "system", "content": SYSTEM + (f"\n\n{theirs}" if theirs else "")}, *history,
                {"role": "user", "content": build_prompt(question, relevant)}]
    return Grounding(messages, sources)


def _graph_hits(kb: KnowledgeBase, name: str, question: str, k: int) -> list[Any]:
    """Graph RAG fused with vector retrieval (``graphrag.graph_retrieve``, hybrid), as ``Hit``s carrying
    their cosine to the question (for ``min_score``)."""
    from slmforge.graphrag import graph_retrieve
    from slmforge.rag.retrieve import Hit

    if kb.graph is None:
        raise ApiError(400, f"The knowledge base {name!r} has no graph; build one with `slmforge graph build`.",
                       "invalid_request_error", "knowledge")
    rows = graph_retrieve(kb.graph, kb.index, question, "hybrid", k)
    chunks = kb.index.chunks([r["id"] for r in rows])
    ids = [r["id"] for r in rows if r["id"] in chunks]
    if not ids:
        return []
    dense = kb.index.vectors(ids) @ kb.index.embedder.embed([question])[0]
    return [Hit(i, chunks[i], float(d), float(d)) for i, d in zip(ids, dense)]


def not_in_documents_choice() -> dict[str, Any]:
    from slmforge.rag.answer import NOT_IN_DOCUMENTS

    return {"index": 0, "message": {"role": "assistant", "content": NOT_IN_DOCUMENTS, "citations": []},
            "logprobs": None, "finish_reason": "stop"}


def _listed(text: str, sources: list[Any]) -> tuple[str, list[Any]]:
    """The sources footer of a reply and the sources it lists: those the text cites, else all of them (a
    model that cites nothing still answered from these)."""
    from slmforge.rag.answer import parse_citations

    cited = [s for s in sources if s.n in parse_citations(text, len(sources))]
    listed = cited or sources
    return "\n\nSources:\n" + "\n".join(f"[{s.n}] {s.path}:{s.start}-{s.end}" for s in listed), listed


def cite(reply: dict[str, Any], sources: list[Any]) -> dict[str, Any]:
    """Add the citations of each choice to a finished chat reply (text and structured)."""
    for choice in reply["choices"]:
        message = choice["message"]
        text = (message.get("content") or "").rstrip()
        footer, listed = _listed(text, sources)
        message["content"] = text + footer
        message["citations"] = [asdict(s) for s in listed]
    reply["citations"] = reply["choices"][0]["message"]["citations"] if reply["choices"] else []
    return reply


async def cited_events(events: Any, sources: list[Any]) -> Any:
    """A grounded reply streamed as it is generated: the batching engine's chunks pass through, and before
    the finishing chunk come the sources footer (as content) and a chunk whose ``citations`` field lists
    them, as ``cite`` adds them to a whole reply."""
    import json

    from slmforge.serve._streaming import event

    said: list[str] = []
    async for ev in events:
        payload = json.loads(ev[6:]) if ev.startswith("data: {") else None
        choices = (payload or {}).get("choices") or []
        if choices and choices[0].get("finish_reason") is not None:
            footer, listed = _listed("".join(said).rstrip(), sources)
            head = {k: v for k, v in payload.items() if k != "choices"}
            yield event({**head, "choices": [{"index": 0, "delta": {"content": footer}, "logprobs": None,
                                              "finish_reason": None}], "citations": [asdict(s) for s in listed]})
        elif choices:
            said.append((choices[0].get("delta") or {}).get("content") or "")
        yield ev
