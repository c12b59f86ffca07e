"""`slmforge rag index|query|info|migrate|eval`, run as a user runs them; one run on the offline MiniLM."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from test_cli import slm

DOCS = {
    "files.md": """\
        # Reading files

        Use the built-in open() function to read a file. The with statement closes the file at the end.

        ## Modes

        Mode r opens a file for reading text. Mode rb reads bytes. Mode w truncates and writes.
        """,
    "lists.md": """\
        # Lists

        A list is a mutable sequence. Use append() to add one item to the end, and extend() to add many.

        # Sorting

        The sorted() function returns a new sorted list; list.sort() sorts in place and returns None.
        """,
    "notes/dicts.txt": "A dict maps keys to values. Use get() to read a key with a default value.\n",
}


@pytest.fixture
def project(tmp_path: Path) -> Path:
    for name, text in DOCS.items():
        (tmp_path / "docs" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "docs" / name).write_text(textwrap.dedent(text))
    (tmp_path / "slmforge.yaml").write_text(
        "project: {name: ragtest}\ndata: {sources: [docs]}\nrag: {embedder: hashing-128, store: faiss, top_k: 3}\n")
    return tmp_path


def test_index_query_info_migrate(project: Path):
    first = slm("rag", "index", cwd=project).stdout
    assert "3 added" in first and "0 unchanged" in first
    again = slm("rag", "index", cwd=project).stdout
    assert "3 unchanged" in again and "0 chunks embedded" in again
    hits = json.loads(slm("rag", "query", "which function returns a new sorted list", "--retrieve-only", "--json",
                          cwd=project).stdout)
    assert hits[0]["source"].endswith("lists.md") and "sorted()" in hits[0]["text"]
    text = (project / "docs" / "lists.md").read_text()
    assert text[hits[0]["start"]:hits[0]["end"]] == hits[0]["text"]
    only = json.loads(slm("rag", "query", "read a key", "--retrieve-only", "--json", "--where", "kind=txt",
                          cwd=project).stdout)
    assert [h["source"].rsplit("/", 1)[-1] for h in only] == ["dicts.txt"]
    info = json.loads(slm("rag", "info", cwd=project).stdout)
    assert (info["documents"], info["store"], info["embedder"]["name"]) == (3, "faiss", "hashing-128")
    assert info["chunks"] == info["store_vectors"] > 3
    refused = slm("rag", "query", "x", "--retrieve-only", "--set", "rag.store=lancedb", cwd=project, ok=False)
    assert refused.returncode == 1 and "slmforge rag migrate --to lancedb" in refused.stderr
    assert "from faiss to lancedb" in slm("rag", "migrate", "--to", "lancedb", cwd=project).stdout
    moved = json.loads(slm("rag", "query", "which function returns a new sorted list", "--retrieve-only", "--json", "--set",
                           "rag.store=lancedb", cwd=project).stdout)
    assert [h["id"] for h in moved] == [h["id"] for h in hits]
    (project / "docs" / "notes" / "dicts.txt").unlink()
    assert "1 deleted" in slm("rag", "index", "--set", "rag.store=lancedb", cwd=project).stdout


def test_query_without_an_index_says_how_to_make_one(project: Path):
    proc = slm("rag", "query", "anything", cwd=project, ok=False)
    assert proc.returncode == 1 and "No knowledge index" in proc.stderr and "slmforge rag index" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_eval_compares_chunkers_and_modes(project: Path):
    for i in range(12):
        (project / "docs" / f"topic{i}.md").write_text(
            f"# Topic {i}\n\nWidget{i} is a component that renders panel{i} quickly. It caches frame{i} data.\n")
    out = slm("rag", "eval", "--chunkers", "fixed,recursive", "--modes", "dense,bm25,hybrid", "--questions", "10",
              cwd=project).stdout
    assert "10 questions from 15 documents" in out and "hybrid" in out
    results = json.loads((project / "runs" / "rag" / "eval" / "results.json").read_text())
    assert {"recall@1", "recall@5", "recall@10", "mrr", "ndcg@10"} <= set(results["rows"][0])
    assert [(r["chunker"], r["mode"]) for r in results["rows"]] == [
        (c, m) for c in ("fixed", "recursive") for m in ("dense", "bm25", "hybrid")]
    assert len(results["questions"]) == 10 and all(0 <= r["mrr"] <= r["recall@10"] <= 1 for r in results["rows"])
    bm25 = next(r for r in results["rows"] if r["mode"] == "bm25" and r["chunker"] == "recursive")
    assert bm25["recall@10"] >= 0.8  # the questions name what the documents define
    assert (project / "runs" / "rag" / "eval" / "retrieval.png").stat().st_size > 5000
    assert "Paired over the same 10 questions" in out and "hybrid - bm25" in out
    assert [(t["chunker"], t["candidate"], t["baseline"]) for t in results["paired"]] == [
        (c, b, a) for c in ("fixed", "recursive") for a, b in (("dense", "bm25"), ("dense", "hybrid"), ("bm25", "hybrid"))]
    assert all(0 <= t["recall@10"]["p_value"] <= 1 and "verdict" in t["mrr"] for t in results["paired"])


def test_the_offline_minilm_finds_a_paraphrase(project: Path):
    (project / "slmforge.yaml").write_text("project: {name: ragtest}\ndata: {sources: [docs]}\n")
    slm("rag", "index", cwd=project)
    hits = json.loads(slm("rag", "query", "How can I put something at the end of a list?", "--retrieve-only",
                          "--json", "--set", "rag.mode=dense", cwd=project).stdout)
    assert "append()" in hits[0]["text"] and hits[0]["dense"] > 0.4
    info = json.loads(slm("rag", "info", cwd=project).stdout)
    assert info["embedder"]["dimensions"] == 384 and info["store"] == "lancedb"
