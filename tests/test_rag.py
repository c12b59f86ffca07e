"""RAG: chunk boundaries, incremental and atomic indexing, retrieval modes, MMR, filters, cited answers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from slmforge.data.sources import Document
from slmforge.errors import ConfigError, RagError
from slmforge.rag import NOT_IN_DOCUMENTS, ChunkSettings, HashingEmbedder, Index, answer, chunk_text, retrieve
from slmforge.rag.answer import parse_citations
from slmforge.rag.evaluate import Row, ndcg_at_k, paired, recall_at_k, reciprocal_rank
from slmforge.rag.retrieve import mmr, rrf

MD = textwrap.dedent("""\
    # Reading files

    Use open() to read a file. The with statement closes it.

    ```python
    with open("a.txt") as f:
        data = f.read()
        more = f.read()
    ```

    ## Modes

    Mode r reads text. Mode rb reads bytes.
    Mode w writes.
    """)


def doc(i: int | str, text: str, path: str | None = None, kind: str = "md") -> Document:
    return Document(str(i), text, "src", kind, path=path or f"docs/{i}.md", title=f"T{i}")


class CountingEmbedder(HashingEmbedder):
    def __init__(self, dimensions: int = 64) -> None:
        super().__init__(dimensions)
        self.embedded: list[str] = []

    def embed(self, texts):
        self.embedded += texts
        return super().embed(texts)


class TableEmbedder(HashingEmbedder):
    """Given vectors for given texts (the rest hashed): retrieval cases built by hand."""

    def __init__(self, table: dict[str, list[float]]) -> None:
        super().__init__(4)
        self.table = {k: np.asarray(v, np.float32) / np.linalg.norm(v) for k, v in table.items()}

    def embed(self, texts):
        rest = super().embed(texts)
        return np.stack([self.table.get(t, rest[i]) for i, t in enumerate(texts)])


# --------------------------------------------------------------------------- chunkers

def test_fixed_windows_share_the_overlap():
    text = "a b c d e f g h i j"
    spans = chunk_text(text, "fixed", size=4, overlap=1)
    assert [text[a:b] for a, b in spans] == ["a b c d", "d e f g", "g h i j"]


def test_recursive_keeps_code_whole_and_starts_sections_at_headings():
    spans = chunk_text(MD, "recursive", size=12, overlap=2)
    chunks = [MD[a:b] for a, b in spans]
    code = next(c for c in chunks if "```python" in c)
    assert code.startswith("```python") and code.rstrip().endswith("```")  # 20 tokens > 12, still whole
    assert any(c.startswith("## Modes") for c in chunks)
    assert chunks[0].startswith("# Reading files")
    assert not any("## Modes" in c and not c.startswith("## Modes") for c in chunks)


def test_sentence_chunks_never_cut_a_sentence():
    text = "One two three. Four five six seven! Eight nine? Ten."
    chunks = [text[a:b] for a, b in chunk_text(text, "sentence", size=6, overlap=0)]
    assert chunks == ["One two three.", "Four five six seven!", "Eight nine? Ten."]


def test_semantic_splits_where_the_topic_changes():
    text = "Cats purr. Cats nap. Cats hunt mice. Rockets fly. Rockets burn fuel. Rockets orbit."
    topic = {"Cats": [1.0, 0.0], "Rockets": [0.0, 1.0]}

    def embed(sents):
        return np.asarray([topic[s.split()[0]] for s in sents], np.float32)

    chunks = [text[a:b] for a, b in chunk_text(text, "semantic", size=100, overlap=0, embed=embed, percentile=30)]
    assert chunks == ["Cats purr. Cats nap. Cats hunt mice.", "Rockets fly. Rockets burn fuel. Rockets orbit."]
    with pytest.raises(ConfigError, match="semantic chunker needs an embedder"):
        chunk_text(text, "semantic")


def test_semantic_chunks_of_many_documents_come_from_one_embedding_call():
    from slmforge.rag.chunkers import batched_sentence_embed

    rng = np.random.default_rng(0)
    words = ["cats", "purr", "rockets", "fly", "fuel", "mice", "orbit", "nap"]
    texts = [" ".join(f"{' '.join(rng.choice(words, 4))}." for _ in range(int(rng.integers(1, 9)))) for _ in range(30)]
    calls = []

    def embed(sents):
        calls.append(len(sents))
        return np.asarray([[s.count("cats") + 0.1, s.count("rockets") + 0.1, len(s) / 50] for s in sents], np.float32)

    alone = [chunk_text(t, "semantic", size=20, overlap=0, embed=embed, percentile=40) for t in texts]
    per_document = len(calls)
    calls.clear()
    lookup = batched_sentence_embed(texts, embed)
    together = [chunk_text(t, "semantic", size=20, overlap=0, embed=lookup, percentile=40) for t in texts]
    assert together == alone and per_document > 1 and len(calls) == 1


@pytest.mark.parametrize("chunker", ["fixed", "recursive", "sentence"])
def test_every_span_is_the_chunk_text(chunker: str):
    spans = chunk_text(MD * 3, chunker, size=10, overlap=3)
    assert spans and all((MD * 3)[a:b].strip() == (MD * 3)[a:b] != "" for a, b in spans)


def test_bad_chunking_settings_are_named():
    with pytest.raises(ConfigError, match="Unknown chunker 'lines'"):
        chunk_text("x", "lines")
    with pytest.raises(ConfigError, match="overlap_tokens \\(8\\) must be smaller"):
        chunk_text("x", "fixed", size=8, overlap=8)


# --------------------------------------------------------------------------- index

def test_add_update_delete_leave_exactly_the_right_chunks(tmp_path: Path):
    emb = CountingEmbedder()
    index = Index.open(tmp_path, emb, "lancedb")
    s = ChunkSettings("sentence", size=4, overlap=0)  # one sentence per chunk
    docs = [doc(1, "Alpha one. Alpha two."), doc(2, "Beta one. Beta two."), doc(3, "Gamma one.")]
    first = index.update(docs, s, progress=False)
    assert (first.added, first.chunks, first.embedded) == (3, 5, 5)
    emb.embedded.clear()
    again = index.update(docs, s, progress=False)
    assert (again.unchanged, again.embedded, emb.embedded) == (3, 0, [])  # unchanged corpus: nothing embedded
    changed = [doc(1, "Alpha one. Alpha three."), doc(2, "Beta one. Beta two."), doc(4, "Delta one.")]
    st = index.update(changed, s, progress=False)
    assert (st.added, st.changed, st.unchanged, st.deleted) == (1, 1, 1, 1)
    assert sorted(emb.embedded) == ["Alpha three.", "Delta one."]  # "Alpha one." kept its vector
    texts = {c.text for c in index.chunks(index.filtered_ids({})).values()}
    assert texts == {"Alpha one.", "Alpha three.", "Beta one.", "Beta two.", "Delta one."}
    assert index.store.ids() == set(index.filtered_ids({}))
    assert index.documents() == 3


def test_another_embedder_or_store_is_refused(tmp_path: Path):
    Index.open(tmp_path, HashingEmbedder(32), "faiss").update([doc(1, "Some text here.")], progress=False)
    with pytest.raises(RagError, match="built with the embedder.*hashing-32.*cannot be searched with.*hashing-16"):
        Index.open(tmp_path, HashingEmbedder(16), "faiss")
    with pytest.raises(RagError, match="keeps its vectors in faiss.*slmforge rag migrate --to chroma"):
        Index.open(tmp_path, HashingEmbedder(32), "chroma")


def test_migrating_keeps_every_answer(tmp_path: Path):
    emb = HashingEmbedder(32)
    index = Index.open(tmp_path, emb, "lancedb")
    index.update([doc(i, f"Topic {w} explained. More about {w}.") for i, w in enumerate("abcdefgh")], progress=False)
    def ranked(ix):
        hits = retrieve(ix, "Topic c explained", "dense", 4)
        return hits[0].chunk.text, [round(h.dense, 4) for h in hits]

    before = ranked(index)
    index.migrate("qdrant")
    index.close()
    moved = Index.open(tmp_path, emb, "qdrant")
    assert ranked(moved) == before and before[0].startswith("Topic c explained.")
    assert moved.store.count() == moved.count() == 8
    assert not (tmp_path / "lancedb").exists()


_KILLED = """
import sys, time
from pathlib import Path
from slmforge.data.sources import Document
from slmforge.rag import HashingEmbedder, Index
from slmforge.rag.stores import LanceStore

folder, when = Path(sys.argv[1]), sys.argv[2]
marker = folder.parent / "marker"
class Slow(HashingEmbedder):
    def embed(self, texts):
        if when == "embedding":
            marker.touch(); time.sleep(60)
        return super().embed(texts)
add = LanceStore.add
def add_then_hang(self, ids, vectors):
    add(self, ids, vectors)
    if when == "store":
        marker.touch(); time.sleep(60)
LanceStore.add = add_then_hang
index = Index.open(folder, Slow(64), "lancedb")
index.update([Document(f"new{i}", f"Fresh text number {i}.", "s", "md", path=f"n{i}.md") for i in range(50)])
"""


@pytest.mark.parametrize("when", ["embedding", "store"])
def test_kill_9_while_indexing_leaves_the_previous_index(tmp_path: Path, when: str):
    folder = tmp_path / "index"
    old = [doc(i, f"Old document {i} about apples.") for i in range(3)]
    index = Index.open(folder, HashingEmbedder(64), "lancedb")
    index.update(old, progress=False)
    before = [h.id for h in retrieve(index, "apples", "hybrid", 3)]
    index.close()
    proc = subprocess.Popen([sys.executable, "-c", _KILLED, str(folder), when], env={**os.environ})
    deadline = time.monotonic() + 120
    while not (tmp_path / "marker").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the indexing process never got there"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    again = Index.open(folder, HashingEmbedder(64), "lancedb")
    assert again.documents() == 3 and again.count() == 3
    assert [h.id for h in retrieve(again, "apples", "hybrid", 3)] == before
    assert all(h.chunk.doc_id in {"0", "1", "2"} for h in retrieve(again, "Fresh text number", "dense", 5))
    again.update(old, progress=False)  # the next run removes what the killed one left in the store
    assert again.store.ids() == set(again.filtered_ids({}))


# --------------------------------------------------------------------------- retrieval

def test_hybrid_beats_dense_and_bm25_alone(tmp_path: Path):
    query = "alpha beta"
    texts = {"R": "alpha beta gamma delta epsilon", "D": "unrelated words only here",
             "B": "alpha alpha beta beta", "X": "zeta eta theta", "Y": "iota kappa lambda"}
    emb = TableEmbedder({query: [1, 0, 0, 0], texts["D"]: [0.95, 0.3, 0, 0], texts["R"]: [0.8, 0.6, 0, 0],
                         texts["X"]: [0.3, 0, 1, 0], texts["Y"]: [0.2, 0, 0, 1], texts["B"]: [-0.5, 0, 0, 1]})
    index = Index.open(tmp_path, emb, "faiss")
    index.update([doc(k, v) for k, v in texts.items()], ChunkSettings("sentence", 50, 0), progress=False)
    top = {m: retrieve(index, query, m, 1)[0].chunk.doc_id for m in ("dense", "bm25", "hybrid")}
    assert top == {"dense": "D", "bm25": "B", "hybrid": "R"}


def test_mmr_drops_near_duplicates(tmp_path: Path):
    index = Index.open(tmp_path, HashingEmbedder(256), "lancedb")
    dup = "The open function reads a file and returns a file object"
    docs = [doc(1, dup + "."), doc(2, dup + " today."), doc(3, dup + " now."),
            doc(4, "A file object is closed by the with statement after reading.")]
    index.update(docs, ChunkSettings("sentence", 50, 0), progress=False)
    plain = [h.chunk.doc_id for h in retrieve(index, "open function reads a file", "dense", 2)]
    diverse = [h.chunk.doc_id for h in retrieve(index, "open function reads a file", "dense", 2, mmr_lambda=0.5)]
    assert set(plain) <= {"1", "2", "3"} and "4" in diverse
    assert mmr(np.eye(3)[0], np.eye(3), 2, 1.0) == [0, 1] or mmr(np.eye(3)[0], np.eye(3), 2, 1.0)[0] == 0


def test_filters_apply_to_every_mode(tmp_path: Path):
    index = Index.open(tmp_path, HashingEmbedder(64), "chroma")
    index.update([doc(1, "Lists hold items.", "guide/lists.md"), doc(2, "Lists are mutable.", "ref/lists.md"),
                  doc(3, "Lists sort.", "ref/sort.txt", kind="txt")], progress=False)
    for mode in ("dense", "bm25", "hybrid"):
        assert {h.chunk.source for h in retrieve(index, "lists", mode, 5, where={"source": "ref/*"})} == {
            "ref/lists.md", "ref/sort.txt"}
        assert [h.chunk.doc_id for h in retrieve(index, "lists", mode, 5, where={"kind": "txt"})] == ["3"]
    with pytest.raises(RagError, match="Unknown filter field 'author'"):
        retrieve(index, "lists", "dense", 2, where={"author": "me"})


def test_rrf_and_ranking_metrics_by_hand():
    fused = dict(rrf([["a", "b"], ["b", "c"]], k=60))
    assert fused["b"] == pytest.approx(1 / 62 + 1 / 61) and fused["a"] == pytest.approx(1 / 61)
    flags = [False, True, False, True]
    assert recall_at_k(flags, 1) == 0 and recall_at_k(flags, 2) == 1
    assert reciprocal_rank(flags) == 0.5
    assert ndcg_at_k(flags, 4, 2) == pytest.approx((1 / np.log2(3) + 1 / np.log2(5)) / (1 + 1 / np.log2(3)))


def test_paired_compares_each_chunkers_modes_on_the_same_questions():
    # 20 questions: hybrid finds 6 that bm25 misses and misses none bm25 finds -> McNemar's exact p = 2 / 2**6
    bm25 = [{"recall@10": float(i < 4), "mrr": 0.5 * (i < 4)} for i in range(20)]
    hybrid = [{"recall@10": float(i < 10), "mrr": 0.5 * (i < 10)} for i in range(20)]
    dense = [{"recall@10": float(i >= 10), "mrr": 1.0 * (i >= 10)} for i in range(20)]
    rows = [Row("recursive", m, 9, {}, per) for m, per in (("dense", dense), ("bm25", bm25), ("hybrid", hybrid))]
    rows.append(Row("fixed", "bm25", 7, {}, bm25))  # one mode alone: nothing to pair
    tests = paired(rows, ["recall@10", "mrr"])
    assert [(t["chunker"], t["candidate"], t["baseline"]) for t in tests] == [
        ("recursive", "bm25", "dense"), ("recursive", "hybrid", "dense"), ("recursive", "hybrid", "bm25")]
    r10 = tests[2]["recall@10"]
    assert r10["diff"] == pytest.approx(0.3) and r10["test"] == "mcnemar" and r10["n"] == 20
    assert r10["p_value"] == pytest.approx(2 / 2**6) and r10["verdict"] == "better" and r10["ci_low"] > 0
    assert tests[2]["mrr"]["test"] == "permutation" and tests[2]["mrr"]["diff"] == pytest.approx(0.15)
    assert tests[1]["recall@10"]["diff"] == 0 and tests[1]["recall@10"]["verdict"] == "no significant difference"


# --------------------------------------------------------------------------- answers

class Scripted:
    """A Generator that answers with a fixed text and records the prompt it was given."""

    def __init__(self, reply: str) -> None:
        self.reply, self.messages = reply, None

    def chat(self, messages, params):
        from slmforge.generate import Completion

        self.messages = messages
        return [Completion(self.reply, 5, "stop")]


def test_citations_point_at_the_real_spans(tmp_path: Path):
    index = Index.open(tmp_path, HashingEmbedder(256), "lancedb")
    text = "# Files\n\nUse open() to read a file.\n\n# Lists\n\nUse append() to add an item to a list."
    index.update([doc("guide", text, "guide.md")], ChunkSettings("recursive", 12, 2), progress=False)
    gen = Scripted("Call append() on the list [1]. See also [7].")
    reply = answer(index, gen, "How do I add an item to a list with append?", k=2, min_score=0.1)
    assert reply.grounded and reply.cited == [1] and len(reply.sources) == 2  # [7] is not a source: dropped
    cited = reply.citations()[0]
    assert index.document_text("guide")[cited.start:cited.end] == cited.text == "# Lists\n\nUse append() to add an item to a list."
    assert "[1] (guide.md) # Lists" in gen.messages[1]["content"]
    assert reply.render().endswith(f"[{cited.n}] guide.md:{cited.start}-{cited.end}")
    assert parse_citations("see [1, 3] and [3] and [9]", 3) == [1, 3]


def test_nothing_relevant_means_not_in_the_documents(tmp_path: Path):
    index = Index.open(tmp_path, HashingEmbedder(256), "lancedb")
    index.update([doc(1, "Use open() to read a file.")], progress=False)
    gen = Scripted("an invented answer")
    reply = answer(index, gen, "Who won the football world cup in 1998?", min_score=0.25)
    assert (reply.text, reply.grounded, reply.sources, gen.messages) == (NOT_IN_DOCUMENTS, False, [], None)


def test_a_tiny_model_answers_and_reranks_through_the_engine_contract(tmp_path: Path):
    from slmforge.generate import load_generator

    from conftest import TINY, build_peaky_model, build_tiny_tokenizer

    gen = load_generator(build_peaky_model(build_tiny_tokenizer(tmp_path, 400), tmp_path / "m", TINY), device="cpu")
    index = Index.open(tmp_path / "ix", HashingEmbedder(128), "lancedb")
    index.update([doc(i, f"The river {w} flows north. Boats sail on the {w}.") for i, w in enumerate(["x", "y", "z"])],
                 ChunkSettings("sentence", 50, 0), progress=False)
    hits = retrieve(index, "Which river flows north", "hybrid", 3, rerank="generator", generator=gen)
    ll = gen.loglikelihood([(f"Passage: {h.chunk.text}\nQuestion:", " Which river flows north") for h in hits]
                           + [("Question:", " Which river flows north")])
    assert [h.score for h in hits] == pytest.approx(sorted((x - ll[-1] for x in ll[:-1]), reverse=True), abs=1e-4)
    reply = answer(index, gen, "Which river flows north", min_score=0.05, max_new_tokens=8)
    assert reply.grounded and reply.sources and isinstance(reply.text, str)


def test_versus_compares_configurations_on_the_same_questions(tmp_path: Path):
    from slmforge.rag.evaluate import Question
    from slmforge.rag.versus import compare_configurations

    index = Index.open(tmp_path, HashingEmbedder(256), "lancedb")
    index.update([doc(i, f"Module m{i} parses format f{i} quickly.") for i in range(6)], progress=False)
    qs = [Question(f"What does module m{i} parse?", f"Module m{i} parses format f{i} quickly.", str(i))
          for i in range(6)]
    rows = compare_configurations({"alone": (Scripted("no idea"), None),
                                   "rag": (Scripted("Module m parses format quickly"), index)},
                                  qs, "alone", k=2, min_score=0.1, progress=False)
    alone, rag = rows
    assert alone["token_f1"] == 0 and rag["token_f1"] > 0.5 and rag["vs alone"] == "better"
    assert rag["ci"][0] > 0 and rag["questions"] == 6
