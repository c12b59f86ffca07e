"""Artifacts: atomic writes, manifests, verification, and `slmforge inspect`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from slmforge.artifacts import MANIFEST, ArtifactWriter, parent_ref, read_manifest, verify_artifact
from slmforge.errors import ArtifactError


def _write(target: Path, text: str = "hello", **kw) -> Path:
    with ArtifactWriter(target, kind="thing", config={"a": 1}, command=["test"], **kw) as w:
        (w.path / "sub").mkdir()
        (w.path / "sub" / "x.txt").write_text(text)
        (w.path / "y.bin").write_bytes(b"\x00\x01")
        w.metrics["answer"] = 42
    return target


def test_manifest_lists_every_file_with_size_and_sha(tmp_path):
    out = _write(tmp_path / "art")
    m = read_manifest(out, "thing")
    assert set(m.files) == {"sub/x.txt", "y.bin"}
    assert m.files["sub/x.txt"]["size"] == 5
    assert len(m.files["y.bin"]["sha256"]) == 64
    assert m.metrics == {"answer": 42}
    assert m.config == {"a": 1} and m.command == ["test"]
    assert m.created_at <= m.finished_at
    assert verify_artifact(out) == []
    raw = json.loads((out / MANIFEST).read_text())
    assert raw["format"] == "slmforge.manifest/1" and raw["slmforge_version"]


def test_verify_reports_changed_missing_and_extra_files(tmp_path):
    out = _write(tmp_path / "art")
    (out / "sub" / "x.txt").write_text("HELLO")
    (out / "y.bin").unlink()
    (out / "new.txt").write_text("?")
    problems = verify_artifact(out)
    assert "changed: sub/x.txt (size or sha256 differs from the manifest)" in problems
    assert "missing: y.bin" in problems
    assert "not in manifest: new.txt" in problems


def test_lineage(tmp_path):
    parent = _write(tmp_path / "parent")
    child = _write(tmp_path / "child", parents=[parent_ref(parent, "thing")])
    m = read_manifest(child)
    assert m.parents[0]["kind"] == "thing"
    assert m.parents[0]["fingerprint"] == read_manifest(parent).fingerprint
    # The fingerprint changes with the parents and with the config.
    other = _write(tmp_path / "other")
    assert read_manifest(other).fingerprint != m.fingerprint


def test_wrong_kind_and_no_manifest(tmp_path):
    out = _write(tmp_path / "art")
    with pytest.raises(ArtifactError, match="'thing' artifact, but a 'dataset'"):
        read_manifest(out, "dataset")
    (tmp_path / "plain").mkdir()
    with pytest.raises(ArtifactError, match="no manifest.json"):
        read_manifest(tmp_path / "plain")
    with pytest.raises(ArtifactError, match="does not exist"):
        read_manifest(tmp_path / "nothing")
    (out / MANIFEST).write_text("{broken")
    with pytest.raises(ArtifactError, match="not readable JSON"):
        read_manifest(out)


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_failure_keeps_previous_output_and_leaves_no_temp(tmp_path, exc):
    out = _write(tmp_path / "art", "first")
    with pytest.raises(exc):
        with ArtifactWriter(out, kind="thing") as w:
            (w.path / "sub").mkdir()
            (w.path / "sub" / "x.txt").write_text("second, half written")
            raise exc()
    assert (out / "sub" / "x.txt").read_text() == "first"
    assert verify_artifact(out) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def test_rewrite_replaces_old_files(tmp_path):
    out = _write(tmp_path / "art", "first")
    with ArtifactWriter(out, kind="thing") as w:
        (w.path / "only.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, "only.txt"]
    assert verify_artifact(out) == []


_SLOW_STAGE = """
import sys, time
from pathlib import Path
from slmforge.artifacts import ArtifactWriter
with ArtifactWriter(Path(sys.argv[1]), kind="thing") as w:
    for i in range(1000):
        (w.path / f"part{i}.txt").write_text("x" * 100)
        if i == 5:
            print("writing", flush=True)
        time.sleep(0.01)
"""


def test_kill_9_leaves_nothing_that_looks_complete(tmp_path):
    target = tmp_path / "art"
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_STAGE, str(target)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not target.exists()
    leftovers = [p for p in tmp_path.iterdir()]
    assert leftovers and all(p.name.startswith(".art.tmp-") for p in leftovers)
    assert not any((p / MANIFEST).exists() for p in leftovers)
    with pytest.raises(ArtifactError):
        read_manifest(target)
    # The next run of the stage cleans up after the killed one.
    _write(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def test_cli_inspect(tmp_path):
    out = _write(tmp_path / "art")
    exe = Path(sys.executable).parent / "slmforge"
    ok = subprocess.run([exe, "inspect", str(out)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "all files match the manifest" in ok.stdout and "answer: 42" in ok.stdout
    (out / "y.bin").write_bytes(b"changed")
    bad = subprocess.run([exe, "inspect", str(out)], capture_output=True, text=True)
    assert bad.returncode == 1
    assert "changed: y.bin" in bad.stderr
    js = subprocess.run([exe, "inspect", "--json", str(out)], capture_output=True, text=True)
    assert json.loads(js.stdout)["problems"] == ["changed: y.bin (size or sha256 differs from the manifest)"]
    missing = subprocess.run([exe, "inspect", str(tmp_path / "nope")], capture_output=True, text=True)
    assert missing.returncode == 1 and "does not exist" in missing.stderr and "Traceback" not in missing.stderr
