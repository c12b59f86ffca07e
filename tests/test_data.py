"""The data stage end to end on a folder mixing every format with bad input."""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from slmforge.artifacts import read_manifest, verify_artifact
from slmforge.config import ProjectConfig
from slmforge.data import run_data_stage
from slmforge.errors import DataError

PII_PATTERNS = [
    r"jane\.doe",
    r"555-0132",
    r"4111 1111 1111 1111",
    r"192\.168\.10\.24",
    r"AKIAIOSFODNN7EXAMPLE",
    r"s3cr3t-V4lue",
]


def _cfg(tmp_path: Path, sources: list[str], **data) -> ProjectConfig:
    cfg = ProjectConfig().rooted_at(tmp_path)
    cfg.data.sources = sources
    cfg.data.split.val = 0.2
    cfg.data.split.test = 0.1
    for key, value in data.items():
        setattr(cfg.data, key, value)
    return cfg


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture
def mixed_result(tmp_path, mixed_corpus):
    root, expected = mixed_corpus
    cfg = _cfg(tmp_path, [str(root)], formats=["text", "chat", "classification", "ner"])
    cfg.data.ner.gazetteer = {"PLANT": ["tomatoes", "lettuce", "pumpkins"], "PLACE": ["valley", "coast"]}
    return run_data_stage(cfg, progress=False), expected, cfg


@pytest.mark.integration
def test_mixed_folder_counts(mixed_result):
    result, expected, _ = mixed_result
    s = result.stats
    assert s["documents_in"] == expected["documents_in"]
    assert s["dropped"].get("duplicate") == expected["duplicate"]
    assert s["dropped"].get("near_duplicate") == expected["near_duplicate"]
    assert s["cleaning"]["long_lines_removed"] == expected["long_lines_removed"]
    skipped = s["inputs_skipped"]
    assert skipped["empty file"] == expected["skipped_empty"]
    assert skipped["binary file"] == expected["skipped_binary"]
    assert skipped["undecodable bytes"] == expected["skipped_undecodable"]
    assert skipped["unreadable PDF"] == expected["skipped_pdf"]
    assert skipped["unsupported file type"] == expected["skipped_unsupported"]
    assert skipped["malformed JSONL line"] == expected["skipped_jsonl"]
    assert s["documents_out"] == s["documents_in"] - sum(s["dropped"].values())
    # Every skipped input is listed by name with its reason.
    rows = _read(result.path / "skipped.jsonl")
    assert {Path(r["where"].split(":")[0]).name for r in rows} >= {"empty.md", "binary.txt", "latin.txt", "broken.pdf"}
    # The PDF and HTML text made it through; the footer/nav boilerplate and scripts did not.
    texts = "\n".join(r["text"] for split in ("train", "val", "test") for r in _read(result.split_file("text", split)))
    assert "strawberries suffered from the late frost" in texts
    assert "lighthouse keeper" in texts
    assert "Example Gardening Club" not in texts
    assert "var x = 1" not in texts
    assert "x" * 1000 not in texts
    assert "A final normal line here." in texts


@pytest.mark.integration
def test_no_pii_in_any_output(mixed_result):
    result, _, _ = mixed_result
    s = result.stats
    assert s["pii"]["email"] >= 1 and s["pii"]["phone"] >= 1 and s["pii"]["credit_card"] >= 1
    assert s["pii"]["ip_address"] >= 1 and s["pii"]["secret"] >= 2
    for f in result.path.rglob("*.jsonl"):
        body = f.read_text(encoding="utf-8")
        for pattern in PII_PATTERNS:
            assert not re.search(pattern, body), f"{pattern} leaked into {f.name}"
    everything = "".join(f.read_text(encoding="utf-8") for f in result.path.rglob("*.jsonl"))
    assert "<EMAIL>" in everything and "<CREDIT_CARD>" in everything


@pytest.mark.integration
def test_manifest_valid_and_outputs_complete(mixed_result):
    result, _, _ = mixed_result
    m = read_manifest(result.path, "dataset")
    assert verify_artifact(result.path) == []
    assert m.metrics["documents_out"] == result.stats["documents_out"]
    assert m.parents and m.parents[0]["kind"] == "source"
    for fmt in ("text", "chat", "classification", "ner"):
        for split in ("train", "val", "test"):
            assert f"{fmt}/{split}.jsonl" in m.files
    for name in ("stats.json", "report.md", "lengths.png", "skipped.jsonl", "dropped.jsonl"):
        assert name in m.files
    assert (result.path / "lengths.png").read_bytes()[:4] == b"\x89PNG"
    report = (result.path / "report.md").read_text()
    assert "near_duplicate" in report and "PII" in report
    # Splits partition the documents.
    ids = [r["id"] for split in ("train", "val", "test") for r in _read(result.split_file("text", split))]
    assert len(ids) == len(set(ids)) == result.stats["documents_out"]
    assert result.stats["splits"]["val"]["documents"] >= 1 and result.stats["splits"]["test"]["documents"] >= 1


@pytest.mark.integration
def test_bert_style_outputs(mixed_result):
    result, _, _ = mixed_result
    rows = [r for split in ("train", "val", "test") for r in _read(result.split_file("classification", split))]
    labels = {r["label"] for r in rows}
    assert {"nature", "music", "food", "travel"} <= labels  # only records with a label field
    assert json.loads((result.path / "classification" / "labels.json").read_text()) == sorted(labels)
    ner = [r for split in ("train", "val", "test") for r in _read(result.split_file("ner", split))]
    assert all(len(r["tokens"]) == len(r["tags"]) for r in ner)
    given = [r for r in ner if "Alice" in r["tokens"]]
    assert given and given[0]["tags"][0] == "B-PER"  # records that bring their own tags keep them
    tagged = {t for r in ner for tok, t in zip(r["tokens"], r["tags"]) if tok in ("Tomatoes", "tomatoes", "lettuce")}
    assert tagged == {"B-PLANT"} or "B-PLANT" in tagged
    label_list = json.loads((result.path / "ner" / "labels.json").read_text())
    assert label_list[0] == "O" and "B-PLANT" in label_list and "I-PLANT" in label_list


@pytest.mark.integration
def test_chat_pairs_from_headings_and_definitions(mixed_result):
    result, _, _ = mixed_result
    rows = [r for split in ("train", "val", "test") for r in _read(result.split_file("chat", split))]
    assert rows
    for r in rows:
        roles = [m["role"] for m in r["messages"]]
        assert roles == ["user", "assistant"]
        assert r["messages"][1]["content"].strip()
    questions = [r["messages"][0]["content"] for r in rows]
    assert any("Watering" in q for q in questions)
    assert len(set(questions)) == len(questions)


def test_python_docs_source(tmp_path):
    cfg = _cfg(tmp_path, ["python-docs"], formats=["text", "chat", "classification", "ner"])
    cfg.data.python_docs.max_modules = 6
    cfg.data.classification.label_from = "source"
    cfg.data.ner.builtin_gazetteer = "python"
    result = run_data_stage(cfg, progress=False)
    s = result.stats
    assert s["documents_out"] > 50
    chat = _read(result.split_file("chat", "train"))
    assert any(q["messages"][0]["content"].startswith(("What does `", "Explain what `", "What is `")) for q in chat)
    labels = json.loads((result.path / "classification" / "labels.json").read_text())
    assert "topic" in labels and "function" in labels
    ner = [r for split in ("train", "val", "test") for r in _read(result.split_file("ner", split))]
    assert any("B-EXCEPTION" in r["tags"] or "B-MODULE" in r["tags"] for r in ner)


def test_missing_source_is_a_clear_error(tmp_path):
    cfg = _cfg(tmp_path, ["no/such/folder"])
    with pytest.raises(DataError, match="no/such/folder"):
        run_data_stage(cfg, progress=False)
    cfg = _cfg(tmp_path, [])
    with pytest.raises(DataError, match="No data sources"):
        run_data_stage(cfg, progress=False)


def test_only_bad_input_raises_and_keeps_previous_output(tmp_path, mixed_corpus):
    root, _ = mixed_corpus
    good = run_data_stage(_cfg(tmp_path, [str(root)]), progress=False)
    before = (good.path / "manifest.json").read_text()
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "empty.txt").write_text("")
    (bad / "bin.txt").write_bytes(b"\x00\x01\x02" * 100)
    with pytest.raises(DataError, match="No documents left"):
        run_data_stage(_cfg(tmp_path, [str(bad)]), out=good.path, progress=False)
    assert (good.path / "manifest.json").read_text() == before  # finished work survives
    assert verify_artifact(good.path) == []
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


class _Teacher(BaseHTTPRequestHandler):
    """A scripted OpenAI-compatible teacher on loopback."""

    calls = 0

    def do_POST(self):  # noqa: N802 (http.server's naming)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).calls += 1
        doc = body["messages"][-1]["content"]
        first_word = " ".join(doc.split("Document:\n", 1)[1].split()[:5])
        if "bread" in doc.lower():
            content = "I cannot answer in JSON, sorry."
        else:
            content = "```json\n" + json.dumps(
                {"pairs": [{"question": f"What is the text starting with {first_word} about?", "answer": "A story."}]}
            ) + "\n```"
        payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


def test_teacher_endpoint(tmp_path):
    from conftest import PROSE

    src = tmp_path / "src"
    src.mkdir()
    for i, p in enumerate(PROSE):
        (src / f"{i}.txt").write_text(p)
    server = HTTPServer(("127.0.0.1", 0), _Teacher)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        cfg = _cfg(tmp_path, [str(src)], formats=["chat"])
        cfg.data.synth.method = "teacher"
        cfg.data.synth.system_prompt = "You are a helpful gardening assistant."
        cfg.data.synth.teacher = {"base_url": f"http://127.0.0.1:{server.server_port}/v1", "model": "teacher"}
        result = run_data_stage(cfg, progress=False)
    finally:
        server.shutdown()
    info = result.stats["formats"]["chat"]
    assert _Teacher.calls == len(PROSE)
    assert info["teacher_errors"] == {"bad_answer": 1}
    rows = [r for split in ("train", "val", "test") for r in _read(result.split_file("chat", split))]
    assert len(rows) == len(PROSE) - 1
    assert all(r["messages"][0] == {"role": "system", "content": "You are a helpful gardening assistant."} for r in rows)
    assert all(r["method"] == "teacher" for r in rows)


def test_unreachable_teacher_is_a_clear_error(tmp_path):
    from conftest import PROSE

    src = tmp_path / "src"
    src.mkdir()
    for i, p in enumerate(PROSE[:4]):
        (src / f"{i}.txt").write_text(p)
    cfg = _cfg(tmp_path, [str(src)], formats=["chat"])
    cfg.data.synth.method = "teacher"
    cfg.data.synth.teacher = {"base_url": "http://127.0.0.1:9/v1", "model": "teacher", "timeout_s": 2}
    with pytest.raises(DataError, match="cannot be reached"):
        run_data_stage(cfg, progress=False)


def test_heldout_overlap_is_removed_from_training_pairs(tmp_path):
    from collections import Counter

    from slmforge.data.synth import QAPair, filter_pairs, heldout_ngrams

    held = "the quick brown fox jumps over the lazy dog near the river bank every single morning"
    pairs = [
        QAPair("Q1?", held, "a", "template"),
        QAPair("Q2?", "an entirely different answer that shares nothing with the held out text at all", "b", "template"),
        QAPair("q2?", "duplicate question with different case", "c", "template"),
    ]
    dropped: Counter[str] = Counter()
    kept = list(filter_pairs(pairs, heldout_ngrams([held], tmp_path / "8grams.bin"), 0.5, dropped))
    assert [p.question for p in kept] == ["Q2?"]
    assert dropped == {"heldout_overlap": 1, "duplicate_question": 1}


def test_split_is_seeded_and_exact():
    from slmforge.data import _split

    a = _split(100, 0.1, 0.05, seed=1)
    assert a == _split(100, 0.1, 0.05, seed=1)
    assert a != _split(100, 0.1, 0.05, seed=2)
    assert (a.count("val"), a.count("test"), a.count("train")) == (10, 5, 85)
    assert _split(3, 0.05, 0.05, seed=0).count("train") == 1


def test_interrupted_stage_leaves_no_complete_looking_folder(tmp_path, mixed_corpus, monkeypatch):
    """Ctrl-C while the outputs are being written: no folder appears, nothing half-written is left."""
    from slmforge.data import report

    root, _ = mixed_corpus

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(report, "write_report", interrupted)
    cfg = _cfg(tmp_path, [str(root)])
    with pytest.raises(KeyboardInterrupt):
        run_data_stage(cfg, progress=False)
    out = cfg.stage_dir("data")
    assert not out.exists()
    assert not list(out.parent.iterdir())  # the temporary folder is gone too
