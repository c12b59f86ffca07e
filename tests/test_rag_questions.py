"""Teacher-written question sets: paraphrased questions for `rag eval`, two-document questions for
`graph eval`; the filters, the cache, the answer scoring, and both commands against a stub
OpenAI-compatible teacher on 127.0.0.1."""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
from test_cli import slm

from slmforge.data.sources import Document
from slmforge.graphrag import build_graph
from slmforge.graphrag.evaluate import compare_linked
from slmforge.rag import ChunkSettings, HashingEmbedder, Index
from slmforge.rag.questions import identifier_in, linked_pairs, linked_questions, malformed, paraphrased_questions

TEXTS = {
    "shop.Basket": "class shop.Basket\n\nThe items a customer has chosen in the web store, with their quantities "
                   "and prices, kept until the order is paid.",
    "shop.checkout": "def shop.checkout(basket)\n\nCharge the customer for a shop.Basket and empty it afterwards, "
                     "sending a receipt by email.",
    "mail.RetryPolicy": "class mail.RetryPolicy\n\nDecides how long to wait before sending a failed email message "
                        "again, doubling the delay each time.",
    "geo.distance_km": "def geo.distance_km(a, b)\n\nReturn the great circle distance between two points on the "
                       "globe in kilometres.",
}
# What the teacher writes for each document (keyed by its title): one good paraphrase, one that names the
# identifier, one that points at a text the user never saw, one that is not a question.
PARAPHRASES = {
    "shop.Basket": " Where are the products a shopper picked kept before paying?",
    "shop.checkout": " How does shop.checkout charge the customer?",
    "mail.RetryPolicy": " What does this class do for me?",
    "geo.distance_km": " Compute how far apart two cities are.",
}
LINKED = " What does checkout charge for, and what does it hold?\nAnswer: The items a customer has chosen."


def docs() -> list[Document]:
    return [Document(t, text, "src", "docstring", title=t) for t, text in TEXTS.items()]


class Teacher:
    """A completion model that continues the few-shot prompts with the canned replies above."""

    def __init__(self) -> None:
        self.calls = 0

    def reply(self, prompt: str) -> str:
        self.calls += 1
        if "Entry 1:" in prompt.rsplit("\n\n", 1)[-1]:
            return LINKED
        last = prompt.rsplit("Entry: ", 1)[-1]
        return next(v for t, v in PARAPHRASES.items() if TEXTS[t].split("\n")[0] in last)

    def complete(self, prompt, params):
        from slmforge.generate import Completion

        return [Completion(self.reply(prompt), 5, "stop")]

    def chat(self, messages, params):  # the answerer: repeats the first source's text
        from slmforge.generate import Completion

        m = re.search(r"\[1\] \([^)]*\) (.+)", messages[-1]["content"])
        return [Completion(m.group(1) if m else "no idea", 5, "stop")]


class Refusing(Teacher):
    def reply(self, prompt: str) -> str:
        raise AssertionError("the cache should have answered")


@pytest.mark.parametrize("question,title,named", [
    ("How do I read a JSON document with json.loads?", "json.loads", True),
    ("What does JSONDecoder.raw_decode return?", "json.decoder.JSONDecoder.raw_decode", True),
    ("When should I call raw_decode?", "json.decoder.JSONDecoder.raw_decode", True),  # code-like part
    ("What does `decode` do with bytes?", "json.JSONDecoder.decode", True),  # written as code
    ("How can I decode a JSON string into Python objects?", "json.JSONDecoder.decode", False),  # a plain word
    ("How do I remove an element from a set?", "_collections_abc.MutableSet.remove", False),
])
def test_identifier_in_a_question(question: str, title: str, named: bool):
    assert identifier_in(question, title) is named


@pytest.mark.parametrize("question,why", [
    ("How can I decode a JSON string into objects?", None),
    ("Decode a JSON string into objects.", "not_a_question"),
    ("Why?", "too_short"),
    ("Is this code correct for my program?", "vague"),
    ("Is this a good mock for testing?", "vague"),  # points at "this": two things of its own are not enough
    ("Which of these is NOT a markup language?", "vague"),
    ("Can I use this to connect to a remote server?", None),
    ("Is a mock object good for testing?", None),  # the same two things, no "this": kept
    ("What is it? And why would I use it here?", "several_questions"),
])
def test_malformed_questions(question: str, why: str | None):
    assert malformed(question) == why


def test_paraphrased_questions_drop_and_count_and_are_cached(tmp_path: Path):
    cache = tmp_path / "q.jsonl"
    made = paraphrased_questions(docs(), Teacher(), "stub", n=10, cache=cache, progress=False)
    assert [q.question for q in made.questions] == ["Where are the products a shopper picked kept before paying?"]
    assert made.questions[0].doc_id == "shop.Basket" and made.questions[0].answer.startswith("The items a customer")
    assert made.report() == {"kept": 1, "asked": 4, "generated": 4, "dropped": {
        "names_identifier": 1, "vague": 1, "not_a_question": 1}}
    again = paraphrased_questions(docs(), Refusing(), "stub", n=10, cache=cache, progress=False)
    assert [vars(q) for q in again.questions] == [vars(q) for q in made.questions] and again.generated == 0
    assert len(cache.read_text().splitlines()) == 4


def test_linked_pairs_are_the_corpus_cross_references():
    pairs = linked_pairs(docs())
    assert [(a.title, b.title) for a, b in pairs] == [("shop.checkout", "shop.Basket")]  # checkout names the Basket
    made = linked_questions(docs(), Teacher(), "stub", progress=False)
    assert made.questions == [{"question": "What does checkout charge for, and what does it hold?",
                               "answer": "The items a customer has chosen.", "docs": ["shop.checkout", "shop.Basket"],
                               "link": "shop.Basket"}]


def test_compare_linked_finds_documents_and_scores_answers(tmp_path: Path):
    index = Index.open(tmp_path / "ix", HashingEmbedder(128), "faiss")
    index.update(docs(), ChunkSettings("sentence", 60, 0), progress=False)
    graph = build_graph(index, tmp_path / "g", progress=False)
    qs = [{"question": "What does shop.checkout charge, and what is a shop.Basket?",
           "answer": "The items a customer has chosen.", "docs": ["shop.checkout", "shop.Basket"]}] * 3
    result = compare_linked(graph, index, qs, Teacher(), k=3, progress=False)
    rows = {r["retrieval"]: r for r in result["rows"]}
    assert set(rows) == {"vector (hybrid)", "graph (multihop)", "graph + vector (hybrid)"}
    # multihop keeps the chunks along the path (here the one that names both); fused, both documents come
    assert rows["graph (multihop)"]["recall@3"] == 0.5 and rows["graph + vector (hybrid)"]["both@3"] == 1.0
    assert all(0.0 <= r["token_f1"] <= 1.0 for r in rows.values())
    assert "diff" not in rows["vector (hybrid)"] and "p_value" in rows["graph (multihop)"]
    assert len(result["answers"]["graph (multihop)"]) == 3
    documents_only = compare_linked(graph, index, qs, None, k=3, progress=False)
    assert "token_f1" not in documents_only["rows"][0] and documents_only["answers"] == {}


class _Handler(BaseHTTPRequestHandler):
    teacher = Teacher()

    def do_POST(self):  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path.endswith("/completions") and "prompt" in body:
            choice = {"index": 0, "text": self.teacher.reply(body["prompt"]), "finish_reason": "stop"}
        else:
            text = self.teacher.chat(body["messages"], None)[0].text
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
        data = json.dumps({"id": "x", "object": "text_completion", "model": body.get("model", "stub"),
                           "choices": [choice], "usage": {"prompt_tokens": 1, "completion_tokens": 1,
                                                          "total_tokens": 2}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_rag_eval_and_graph_eval_with_a_teacher_endpoint(tmp_path: Path):
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": v, "title": t}) + "\n" for t, v in TEXTS.items()))
    (tmp_path / "slmforge.yaml").write_text(
        "project: {name: qtest}\ndata: {sources: [docs.jsonl]}\nrag: {embedder: hashing-128, store: faiss}\n")
    server = HTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}/v1#stub"
    try:
        slm("rag", "index", cwd=tmp_path)
        run = slm("rag", "eval", "--chunkers", "sentence", "--modes", "bm25,hybrid", "--teacher", url, cwd=tmp_path)
        assert "1 questions from 4 documents (hashing-128; paraphrased by" in run.stdout and '"names_identifier": 1' in run.stderr
        results = json.loads((tmp_path / "runs" / "rag" / "eval" / "results.json").read_text())
        assert results["teacher"]["kept"] == 1 and [r["mode"] for r in results["rows"]] == ["bm25", "hybrid"]
        calls = _Handler.teacher.calls
        slm("rag", "eval", "--chunkers", "sentence", "--modes", "bm25", "--teacher", url, cwd=tmp_path)
        assert _Handler.teacher.calls == calls  # cached: the teacher is not asked again
        slm("graph", "build", cwd=tmp_path)
        run = slm("graph", "eval", "--teacher", url, "--model", url, "-k", "3", cwd=tmp_path)
        assert "1 two-document questions" in run.stdout and "token F1" in run.stdout
        linked = json.loads((tmp_path / "runs" / "rag" / "graph" / "linked.json").read_text())
        assert linked["teacher"]["kept"] == 1 and linked["questions"][0]["link"] == "shop.Basket"
        assert [r["retrieval"] for r in linked["rows"]][0] == "vector (hybrid)" and "p_value" in linked["rows"][1]
    finally:
        server.shutdown()
