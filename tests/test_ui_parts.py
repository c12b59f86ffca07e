"""Issue 17: the dashboard's parts without a browser: recorded progress, artifact scanning, lineage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from slmforge._progress import PROGRESS_FILE, progress_bar
from slmforge.artifacts import ArtifactWriter, parent_ref
from slmforge.ui._lineage import lineage_svg
from slmforge.ui._scan import Project, artifacts, find, integrity, lineage, metric_deltas


def test_progress_bars_are_recorded_for_the_dashboard(tmp_path: Path, monkeypatch):
    record = tmp_path / "progress.jsonl"
    monkeypatch.setenv(PROGRESS_FILE, str(record))
    with progress_bar(False) as bar:  # recorded even where the terminal shows nothing
        task = bar.add_task("tokenize", total=5, info="")
        for _ in range(5):
            bar.advance(task)
        bar.update(task, info="done")
    rows = [json.loads(x) for x in record.read_text().splitlines()]
    assert rows[0] == {**rows[0], "task": "tokenize", "completed": 0, "total": 5, "done": False}
    assert rows[-1]["completed"] == 5 and rows[-1]["done"] and rows[-1]["info"] == "done"
    assert len(rows) < 8  # throttled: not one line per update
    monkeypatch.delenv(PROGRESS_FILE)
    with progress_bar(False) as bar:
        bar.add_task("quiet", total=1)
    assert len(record.read_text().splitlines()) == len(rows)


def _artifact(folder: Path, kind: str, parents: list[Path], metrics: dict) -> Path:
    with ArtifactWriter(folder, kind=kind, config={}, parents=[parent_ref(p) for p in parents]) as w:
        (w.path / "x.txt").write_text(kind)
        w.metrics.update(metrics)
    return folder


def test_scan_lineage_integrity_and_deltas(tmp_path: Path):
    (tmp_path / "slmforge.yaml").write_text("project:\n  name: demo\n")
    runs = tmp_path / "runs"
    data = _artifact(runs / "data", "dataset", [], {"documents_out": 10})
    model = _artifact(runs / "train", "model", [data], {"val_ppl": 50.0, "steps": 10})
    model_b = _artifact(runs / "sweep" / "points" / "p1" / "train", "model", [data], {"val_ppl": 40.0, "steps": 20})
    _artifact(runs / "eval", "evaluation", [model], {"passing": False})
    (runs / "half-done").mkdir()  # no manifest: not an artifact
    p = Project("p0", tmp_path / "slmforge.yaml")
    items = {a.id: a for a in artifacts(p)}
    assert set(items) == {"data", "train", "sweep/points/p1/train", "eval"}
    assert items["eval"].status == "failing" and items["train"].status == "done"
    assert items["train"].headline() == {"val_ppl": 50.0, "steps": 10}
    nodes, edges = lineage(p, list(items.values()))
    assert ("data", "train") in edges and ("train", "eval") in edges and ("data", "sweep/points/p1/train") in edges
    svg = lineage_svg(nodes, edges, "/ui/p/p0/a/")
    assert svg.count('class="node"') == 4 and 'href="/ui/p/p0/a/sweep/points/p1/train"' in svg
    assert integrity(items["train"]) == []
    (model / "x.txt").write_text("changed")
    assert integrity(find(p, "train")) == ["changed: x.txt (size or sha256 differs from the manifest)"]
    deltas = {r["metric"]: r for r in metric_deltas(items["train"], find(p, "sweep/points/p1/train"))}
    assert deltas["val_ppl"]["delta"] == pytest.approx(-10.0) and deltas["steps"]["delta"] == 10
    from slmforge.errors import ArtifactError

    with pytest.raises(ArtifactError, match="not inside"):
        find(p, "../../etc")
    assert model_b.exists()


def test_evaluation_rows_wrong_first_and_filtered(tmp_path: Path):
    from slmforge.ui._detail import evaluation_rows

    (tmp_path / "items").mkdir()
    (tmp_path / "results.json").write_text(json.dumps({"suites": {"qa": {"primary": "f1"}, "perplexity": {}}}))
    items = [{"id": f"q{i}", "prompt": f"question {i}", "output": "x", "target": "y", "scores": {"f1": s}}
             for i, s in enumerate([0.9, 0.0, 0.5, 0.0])]
    (tmp_path / "items" / "qa.jsonl").write_text("".join(json.dumps(it) + "\n" for it in items))
    (tmp_path / "items" / "perplexity.jsonl").write_text("")  # no rows: not offered
    view = evaluation_rows(tmp_path, None, "wrong", "")
    assert view["suites"] == ["qa"] and view["primary"] == "f1"
    assert [r["score"] for r in view["rows"]] == [0.0, 0.0, 0.5, 0.9]
    assert [r["id"] for r in evaluation_rows(tmp_path, "qa", "file", "")["rows"]] == ["q0", "q1", "q2", "q3"]
    assert [r["id"] for r in evaluation_rows(tmp_path, "qa", "wrong", "question 2")["rows"]] == ["q2"]


def test_the_cli_hands_the_server_its_keys_and_the_dashboard(tmp_path: Path, monkeypatch):
    """`slmforge serve --ui`, `slmforge ui` and `slmforge proxy` reach the library's servers with the keys file
    and (for the first two) the dashboard's project; the server itself is not started here."""
    from typer.testing import CliRunner

    import slmforge.serve as serve_lib
    from slmforge.cli.main import app

    calls: list[tuple[str, dict]] = []
    monkeypatch.setattr(serve_lib, "serve", lambda *a, **kw: calls.append(("serve", kw)))
    monkeypatch.setattr(serve_lib, "proxy", lambda *a, **kw: calls.append(("proxy", kw)))
    (tmp_path / "slmforge.yaml").write_text("project:\n  name: demo\n")
    keys = tmp_path / "keys.txt"
    keys.write_text("sk-test\n")
    project = ["-c", str(tmp_path / "slmforge.yaml"), "--api-keys", str(keys)]
    for argv in (["serve", "m", "--ui", *project], ["ui", *project],
                 ["proxy", "--upstream", "http://127.0.0.1:9/v1", *project]):
        r = CliRunner().invoke(app, argv)
        assert r.exit_code == 0, (argv, r.output, r.exception)
    (_, s), (_, u), (_, p) = calls
    assert s["api_keys_file"] == u["api_keys_file"] == p["api_keys_file"] == keys
    assert [x.config_path for x in s["ui"]] == [x.config_path for x in u["ui"]] == [(tmp_path / "slmforge.yaml").resolve()]
