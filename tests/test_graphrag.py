"""Graph RAG: the fallback extractor, entity resolution, multi-hop retrieval across documents, the
per-chunk extraction cache, communities, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_cli import slm
from test_rag import Scripted, doc

from slmforge.errors import RagError
from slmforge.graphrag import (
    build_graph,
    entity_key,
    graph_retrieve,
    load_graph,
    model_entities,
    model_extract,
    rule_entities,
)
from slmforge.rag import ChunkSettings, HashingEmbedder, Index

DOCS = {
    "a": "The `Frobnicator` service stores its state in `ledger.db`.",
    "b": "Backups of `ledger.db` are copied nightly to the Vault Cluster.",
    "c": "Unrelated text about `teapots` and Earl Grey tea.",
}


@pytest.fixture
def index(tmp_path: Path) -> Index:
    ix = Index.open(tmp_path / "ix", HashingEmbedder(128), "faiss")
    ix.update([doc(k, v) for k, v in DOCS.items()], ChunkSettings("sentence", 50, 0), progress=False)
    return ix


def test_entities_resolve_across_case_ticks_calls_and_plurals():
    assert {entity_key(n) for n in ("Widgets", "`widget`", "widget()", "WIDGET")} == {"widget"}
    assert entity_key("json.dumps()") == "json.dumps" and entity_key("class") == "class"
    assert rule_entities("# Reading Files\n\nCall json.dumps() on it. The Python Software Foundation.") == [
        "Reading Files", "json.dumps", "dumps", "Python Software Foundation"]


def test_a_model_that_returns_nothing_still_gives_a_graph(tmp_path: Path, index):
    assert model_entities(Scripted("I cannot help with that."), "text") == []
    assert model_entities(Scripted('Sure: ["Frobnicator", "x"]'), "text") == ["Frobnicator"]
    graph = build_graph(index, tmp_path / "g", Scripted("nothing useful"), progress=False)
    assert {"frobnicator", "ledger.db", "vault cluster", "teapot"} <= set(graph.graph.nodes)


class Extractor:
    """A model that names an entity and a typed relation for each chunk it reads, and writes summaries."""

    def chat(self, messages, params):
        from slmforge.generate import Completion

        text = messages[-1]["content"]
        if "In two sentences" in text:
            return [Completion("This group is about the Frobnicator's storage and its backups.", 12, "stop")]
        if "Frobnicator" in text:
            reply = {"entities": ["Frobnicator"], "relations": [
                {"source": "Frobnicator", "relation": "stores state in", "target": "ledger.db"}]}
        elif "Vault" in text:
            reply = {"entities": ["Vault Cluster"], "relations": [
                {"source": "ledger.db", "relation": "is backed up to", "target": "Vault Cluster"}]}
        else:
            reply = {"entities": [], "relations": []}
        return [Completion(json.dumps(reply), 20, "stop")]


def test_typed_relations_label_edges_and_the_model_writes_summaries(tmp_path: Path, index):
    assert model_extract(Extractor(), "The Frobnicator ...")[1] == [("Frobnicator", "stores state in", "ledger.db")]
    graph = build_graph(index, tmp_path / "g", Extractor(), progress=False)
    edge = graph.graph["frobnicator"]["ledger.db"]
    assert edge["relations"] == ["frobnicator stores state in ledger.db"]
    assert graph.graph["ledger.db"]["vault cluster"]["relations"] == ["ledger.db is backed up to vault cluster"]
    biggest = graph.communities[0]
    assert biggest["summary_by"] == "model" and "backups" in biggest["summary"]
    assert "frobnicator stores state in ledger.db" in biggest["relations"]
    again = load_graph(tmp_path / "g")  # the labels survive saving
    assert again.graph["frobnicator"]["ledger.db"]["relations"] == edge["relations"]


def test_constrained_extraction_on_a_tiny_torch_model_always_parses(tmp_path: Path, one_torch_thread):
    """A random model knows no entities, but decoded under the extraction schema its replies always parse."""
    from slmforge.generate import SamplingParams, TorchGenerator

    from conftest import TINY, build_peaky_model, build_tiny_tokenizer

    gen = TorchGenerator.from_pretrained(build_peaky_model(build_tiny_tokenizer(tmp_path, 400), tmp_path / "m",
                                                           TINY), device="cpu")
    free = gen.chat([{"role": "user", "content": "List the entities."}], SamplingParams(max_new_tokens=20))[0].text
    with pytest.raises(json.JSONDecodeError):
        json.loads(free)
    import jsonschema

    from slmforge.graphrag import _PROMPT, EXTRACTION_SCHEMA

    for text in DOCS.values():
        reply = gen.chat([{"role": "user", "content": _PROMPT + text}], SamplingParams(max_new_tokens=160),
                         json_schema=EXTRACTION_SCHEMA)[0].text
        value = json.loads(reply)
        jsonschema.validate(value, EXTRACTION_SCHEMA)
        entities, _ = model_extract(gen, text)  # the same reply, through the extractor
        assert entities == [e.strip() for e in value["entities"] if len(e.strip()) >= 3]


def test_multihop_finds_both_documents_of_a_two_step_answer(tmp_path: Path, index):
    graph = build_graph(index, tmp_path / "g", progress=False)
    hits = graph_retrieve(graph, index, "Where do backups of the Frobnicator state go? The Vault Cluster?", "multihop")
    assert {h["source"] for h in hits} == {"docs/a.md", "docs/b.md"}
    assert all(h["why"] == ["vault cluster", "ledger.db", "frobnicator"] for h in hits)  # the path between them
    local = graph_retrieve(graph, index, "What is the Frobnicator?", "local")
    assert local[0]["source"] == "docs/a.md" and all(h["source"] != "docs/c.md" for h in local)
    hybrid = graph_retrieve(graph, index, "What is the Frobnicator?", "hybrid", k=3)
    assert hybrid[0]["source"] == "docs/a.md"
    summaries = graph_retrieve(graph, index, "teapots and tea", "global", k=1)
    assert "teapot" in summaries[0]["why"]


def test_rebuilding_extracts_only_new_chunks_and_reloads(tmp_path: Path, index):
    first = build_graph(index, tmp_path / "g", progress=False)
    assert first.extracted == 3
    index.update([doc(k, v) for k, v in {**DOCS, "d": "The Frobnicator logs to `audit.log`."}.items()],
                 ChunkSettings("sentence", 50, 0), progress=False)
    second = build_graph(index, tmp_path / "g", progress=False)
    assert second.extracted == 1 and "audit.log" in second.graph.nodes
    again = load_graph(tmp_path / "g")
    assert set(again.graph.nodes) == set(second.graph.nodes) and again.communities == second.communities
    with pytest.raises(RagError, match="No knowledge graph"):
        load_graph(tmp_path / "none")
    with pytest.raises(RagError, match="Unknown graph mode"):
        graph_retrieve(again, index, "x", "fuzzy")


def test_cli_build_and_query(tmp_path: Path):
    (tmp_path / "docs").mkdir()
    for k, v in DOCS.items():
        (tmp_path / "docs" / f"{k}.md").write_text(v + "\n")
    (tmp_path / "slmforge.yaml").write_text("project: {name: g}\ndata: {sources: [docs], filters: {min_chars: 1, languages: []}}\n"
                                            "rag: {embedder: hashing-128}\n")
    slm("rag", "index", cwd=tmp_path)
    built = slm("graph", "build", cwd=tmp_path).stdout
    assert "entities" in built and "communities" in built
    rows = json.loads(slm("graph", "query", "Where are ledger.db backups copied?", "--mode", "local",
                          cwd=tmp_path).stdout)
    assert rows and any(r["source"].endswith("b.md") for r in rows)


def test_multihop_questions_need_two_documents_and_graph_retrieval_finds_both(tmp_path: Path, index):
    from slmforge.graphrag import compare_multihop, multihop_questions

    graph = build_graph(index, tmp_path / "g", progress=False)
    qs = multihop_questions(graph, index, 10)
    assert qs and all(len(set(q["docs"])) == 2 and q["bridge"] == "ledger.db" for q in qs)
    rows = {r["retrieval"]: r for r in compare_multihop(graph, index, qs, k=2)}
    assert rows["graph (multihop)"]["both@2"] == 1.0
    assert set(rows) == {"vector (hybrid)", "graph (multihop)", "graph + vector (hybrid)"}


class MapReduce:
    """Map replies: helpful for the storage community, not for the tea one; the reduce step sees the notes."""

    def __init__(self) -> None:
        self.reduce_prompt = None

    def chat(self, messages, params):
        from slmforge.generate import Completion

        text = messages[-1]["content"]
        if text.startswith("Notes from summaries"):
            self.reduce_prompt = text
            return [Completion("The Frobnicator keeps its state in ledger.db, backed up to the Vault.", 12, "stop")]
        helpful = "ledger" in text.split("Question:")[0].lower()
        reply = {"points": "ledger.db holds the state" if helpful else "", "score": 80 if helpful else 0}
        return [Completion(json.dumps(reply), 10, "stop")]


def test_global_answer_maps_over_communities_and_reduces(tmp_path: Path, index):
    from slmforge.graphrag import global_answer
    from slmforge.rag import NOT_IN_DOCUMENTS

    graph = build_graph(index, tmp_path / "g", progress=False)
    model = MapReduce()
    result = global_answer(graph, index, "Where does the Frobnicator keep its state?", model, k=4)
    assert result["answer"].startswith("The Frobnicator keeps its state in ledger.db")
    assert result["partials"] and all(p["score"] == 80 for p in result["partials"])
    assert "(80) ledger.db holds the state" in model.reduce_prompt and len(result["communities"]) >= 2
    nothing = global_answer(graph, index, "Who painted the Mona Lisa?", Scripted('{"points": "", "score": 0}'))
    assert nothing["answer"] == NOT_IN_DOCUMENTS and nothing["partials"] == []
