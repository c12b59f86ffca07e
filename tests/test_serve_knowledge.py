"""Grounded chat in the server, through the official openai client: the `knowledge` extension field, a model
served with a knowledge base (unmodified clients), citations in text and structured, "not in the documents"."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest

from slmforge.data.sources import Document
from slmforge.errors import ConfigError
from slmforge.generate import Completion, TorchGenerator
from slmforge.rag import NOT_IN_DOCUMENTS, ChunkSettings, HashingEmbedder, Index
from slmforge.serve import create_app
from slmforge.serve._models import ServedModel

from conftest import TINY, LiveServer, build_peaky_model, build_tiny_tokenizer

GUIDE = "# Files\n\nUse open() to read a file.\n\n# Lists\n\nUse append() to add an item to a list."


class Scripted:
    """An engine without our batching that answers with a fixed text and keeps what it was asked."""

    def __init__(self) -> None:
        self.asked: list = []

    def chat(self, messages, params):
        self.asked.append(messages)
        return [Completion("Call append() on the list [1].", 7, "stop")]

    def complete(self, prompt, params):
        return [Completion("done", 1, "stop")]

    def complete_batch(self, prompts, params):
        return [self.complete(p, params) for p in prompts]


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    yield


@pytest.fixture(scope="module")
def index(tmp_path_factory) -> Index:
    ix = Index.open(tmp_path_factory.mktemp("kb"), HashingEmbedder(256), "lancedb")
    ix.update([Document("guide", GUIDE, "docs", "md", path="docs/guide.md", title="Guide")],
              ChunkSettings("recursive", 12, 2), progress=False)
    return ix


@pytest.fixture(scope="module")
def scripted() -> Scripted:
    return Scripted()


@pytest.fixture(scope="module")
def client(tmp_path_factory, index, scripted):
    workdir = tmp_path_factory.mktemp("tiny")
    gen = TorchGenerator.from_pretrained(build_peaky_model(build_tiny_tokenizer(workdir, 400), workdir / "m", TINY),
                                         device="cpu")
    from slmforge.graphrag import build_graph
    from slmforge.serve._knowledge import KnowledgeBase

    bot = ServedModel("docs-bot", "generate", generator=scripted, engine="Scripted", knowledge="docs")
    graph = build_graph(index, index.folder / "graph", progress=False)
    app = create_app({"tiny": gen, "scripted": scripted, "docs-bot": bot},
                     knowledge={"docs": index, "docs-graph": KnowledgeBase(index, graph=graph)})
    with LiveServer(app) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


def _ask(client, model: str, question: str, **extra):
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                          max_tokens=16, **extra)


def test_the_knowledge_field_grounds_and_cites(client, scripted):
    r = _ask(client, "scripted", "How do I add an item to a list with append?",
             extra_body={"knowledge": {"base": "docs", "k": 2, "min_score": 0.1}})
    message = r.choices[0].message
    assert message.content.startswith("Call append() on the list [1].\n\nSources:\n[1] docs/guide.md:")
    cited = message.model_extra["citations"]
    assert [c["n"] for c in cited] == [1] and cited[0]["path"] == "docs/guide.md"
    assert GUIDE[cited[0]["start"]:cited[0]["end"]] == cited[0]["text"] == "# Lists\n\nUse append() to add an item to a list."
    assert r.model_extra["citations"] == cited
    prompt = scripted.asked[-1]
    assert prompt[0]["role"] == "system" and "numbered sources" in prompt[0]["content"]
    assert prompt[-1]["content"].startswith("Sources:\n[1] (docs/guide.md) # Lists")


def test_a_model_served_with_knowledge_grounds_unmodified_clients(client):
    r = _ask(client, "docs-bot", "How do I add an item to a list with append?")
    assert r.model_extra["citations"] and "Sources:" in r.choices[0].message.content
    assert next(m for m in client.models.list().data if m.id == "docs-bot").model_extra["knowledge"] == "docs"


def test_nothing_relevant_is_not_in_the_documents_without_asking_the_model(client, scripted):
    before = len(scripted.asked)
    r = _ask(client, "docs-bot", "Who won the football world cup in 1998?")
    assert r.choices[0].message.content == NOT_IN_DOCUMENTS and r.model_extra["citations"] == []
    assert len(scripted.asked) == before and r.usage.completion_tokens == 0


def test_the_batching_engine_answers_grounded_and_streams(client):
    extra = {"extra_body": {"knowledge": {"base": "docs", "min_score": 0.05}}, "temperature": 0}
    r = _ask(client, "tiny", "How do I read a file with open?", **extra)
    assert r.model_extra["citations"] and r.choices[0].message.content.count("docs/guide.md:") >= 1
    chunks = list(_ask(client, "tiny", "How do I read a file with open?", stream=True, **extra))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == r.choices[0].message.content  # greedy: the stream is the same finished reply
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 2 and pieces[-1].startswith("\n\nSources:")  # sent as generated, the sources last
    cited = [c.model_extra["citations"] for c in chunks if (c.model_extra or {}).get("citations")]
    assert cited == [r.model_extra["citations"]]


def test_bad_knowledge_requests_are_400s(client):
    with pytest.raises(openai.BadRequestError, match="Unknown knowledge base 'wiki'.*docs"):
        _ask(client, "scripted", "x", extra_body={"knowledge": {"base": "wiki"}})
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
    with pytest.raises(openai.BadRequestError, match="cannot also use tools"):
        _ask(client, "tiny", "x", tools=[tool], extra_body={"knowledge": {"base": "docs"}})
    with pytest.raises(openai.BadRequestError, match="Unknown filter field 'author'"):
        _ask(client, "scripted", "append", extra_body={"knowledge": {"base": "docs", "where": {"author": "me"}}})
    with pytest.raises(openai.BadRequestError, match="knowledge.k"):
        _ask(client, "scripted", "x", extra_body={"knowledge": {"base": "docs", "k": 0}})


def test_a_model_naming_a_missing_knowledge_base_fails_at_start(index, scripted):
    bot = ServedModel("bot", "generate", generator=scripted, engine="Scripted", knowledge="nope")
    with pytest.raises(ConfigError, match="knowledge base nope.*docs"):
        create_app({"bot": bot}, knowledge={"docs": index})


def test_serve_knowledge_opens_indexes_with_the_project_embedder(tmp_path: Path, index):
    from slmforge.config import ProjectConfig
    from slmforge.errors import RagError
    from slmforge.serve import open_knowledge

    cfg = ProjectConfig().rooted_at(tmp_path)
    cfg.rag.embedder = "hashing-256"
    from slmforge.graphrag import build_graph

    build_graph(index, index.folder / "graph", progress=False)
    kb = open_knowledge(cfg, {"docs": str(index.folder)})["docs"]
    assert kb.index.count() == index.count() and kb.mode == cfg.rag.mode
    assert kb.graph is not None and "append" in kb.graph.graph.nodes  # `slmforge graph build` output is served
    cfg.rag.embedder = "hashing-64"
    with pytest.raises(RagError, match="built with the embedder"):
        open_knowledge(cfg, {"docs": str(index.folder)})
    with pytest.raises(RagError, match="no index at"):
        open_knowledge(cfg, {"empty": str(tmp_path / "none")})


def test_graph_mode_answers_from_the_entity_graph(client, scripted):
    r = _ask(client, "scripted", "What does append() do?",
             extra_body={"knowledge": {"base": "docs-graph", "mode": "graph", "k": 1, "min_score": 0.0}})
    cited = r.model_extra["citations"]
    assert [c["text"] for c in cited] == ["# Lists\n\nUse append() to add an item to a list."]
    with pytest.raises(openai.BadRequestError, match="has no graph.*slmforge graph build"):
        _ask(client, "scripted", "x", extra_body={"knowledge": {"base": "docs", "mode": "graph"}})
