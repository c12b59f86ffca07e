"""The pipeline's stages: what each would write is pinned, so that a refactoring of the stage table
cannot make an existing project's finished stages look out of date.

The fingerprints below were computed by the stage table before it became one object per stage
(issue 11). A stage's fingerprint decides whether ``slmforge run`` skips it; if one of them
changes, every existing project re-runs that stage (and everything after it) once. Change a value
here only on purpose, and say so in the changelog.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import slmforge.artifacts as artifacts
from slmforge.artifacts import MANIFEST, MANIFEST_FORMAT
from slmforge.config import ProjectConfig

ALL_STAGES = ["data", "tokenizer", "train", "sft", "encoder", "quantize", "eval", "report"]

# Output folder (relative to the project), artifact kind and fingerprint of each stage, for the config
# of the ``project`` fixture, when every stage before it holds the output pinned here.
PINNED = {
    "data": ("runs/data", "dataset", "77fb38662f4554cdbed48610dd6b5751f5060551a83b680a896bf2435aa17f85"),
    "tokenizer": ("runs/tokenizer", "tokenizer", "3dad994ed384e2486f6795f2223f33a0f9191811891776e32438664bf7bbb7a1"),
    "train": ("runs/train", "model", "d0749764239a8e794846c922d377d91c1d03193ac5e317fbde56c5a7bc5823d2"),
    "sft": ("runs/sft", "adapter", "531859b9f7a605aec5515d9f0a6b9a52aa6e0f6f95102f80632e7068435670d8"),
    "encoder": ("runs/encoder-classification", "encoder", "0f0a9448b674d729511443fd7658de84d2a1bbc8db85f438c9a80d1b4ecc1f06"),
    "quantize": ("runs/quantize-int8_weight_only", "quantized-model", "29cc18eb453f185c142686694ada1299dd3c7750b373b7447e9380761eb04f36"),
    "eval": ("runs/eval", "evaluation", "d84d86c10576d887220a3716ce2d15743e8adc234c86cfeee57b695cabf7706c"),
    "report": ("runs/report", "report", "d69a04bddb9d65606cfa46a11f397934f92d5dd94bdbe1949058f18d75e5e283"),
}


def _manifest(folder: Path, kind: str, fingerprint: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MANIFEST).write_text(json.dumps({
        "format": MANIFEST_FORMAT, "kind": kind, "slmforge_version": "pinned", "command": [], "config": {},
        "parents": [], "files": {}, "metrics": {}, "created_at": "", "finished_at": "", "duration_s": 0.0,
        "fingerprint": fingerprint,
    }))


@pytest.fixture
def project(tmp_path, monkeypatch) -> ProjectConfig:
    """A project with every stage and one source file of fixed name, size and modification time.

    The project is rooted at the relative folder ``.`` (the test runs in tmp_path), so that paths
    that reach a stage's config (the sft base, the quantized and reported model) are the same on
    every machine; the version is fixed too."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(artifacts, "__version__", "0.0.0-pinned")
    (tmp_path / "corpus").mkdir()
    doc = tmp_path / "corpus" / "a.txt"
    doc.write_text("A document about gardens.\n")
    os.utime(doc, ns=(1_700_000_000_000_000_000, 1_700_000_000_000_000_000))
    cfg = ProjectConfig().rooted_at(Path("."))
    cfg.project.stages = list(ALL_STAGES)
    cfg.data.sources = ["corpus"]
    cfg.sft.method = "lora"
    return cfg


def _current(cfg: ProjectConfig) -> dict[str, bool]:
    from slmforge.pipeline import is_current

    return {name: is_current(cfg, name) for name in ALL_STAGES}


def test_each_stages_output_folder_and_fingerprint_are_pinned(project, tmp_path):
    assert _current(project) == dict.fromkeys(ALL_STAGES, False)
    for folder, kind, fingerprint in PINNED.values():
        _manifest(tmp_path / folder, kind, fingerprint)
    assert _current(project) == dict.fromkeys(ALL_STAGES, True)
    project.train.lr = 0.5  # the test can tell: a changed section makes its stage out of date
    assert [n for n, current in _current(project).items() if not current] == ["train"]
