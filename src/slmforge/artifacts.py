"""Artifact folders: what every stage writes, with a ``manifest.json`` that lists
its kind, the command and config that made it, its parents, and every file with
size and sha256.

Writes are atomic: a stage writes into a hidden temporary folder beside the
target and renames it into place only when everything (manifest last) is written.
A stage that fails, is interrupted, or is killed leaves either the previous
complete folder or nothing, never a folder that looks complete.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shutil
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slmforge import __version__
from slmforge.errors import ArtifactError, SlmForgeError

if TYPE_CHECKING:  # a type only: config.py is core too, but artifacts.py needs none of its code
    from slmforge.config import ProjectConfig

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "slmforge.manifest/1"
_TMP_MARK = ".tmp-"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def fingerprint(kind: str, config: Any, parents: list[str]) -> str:
    """What decides whether a stage's output is still current: its kind, the
    resolved config section, the parents' fingerprints and the slmforge version."""
    blob = json.dumps(
        {"kind": kind, "config": config, "parents": sorted(parents), "version": __version__},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


@dataclass(frozen=True)
class Plan:
    """What a stage would write: the artifact's kind, its resolved config and its parents' lineage
    entries. ``slmforge run`` skips a stage whose output's manifest has this plan's fingerprint."""

    kind: str
    config: dict[str, Any]
    parents: list[dict[str, str]]

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.kind, self.config, [p.get("fingerprint", "") for p in self.parents])

    def writer(self, target: str | Path, command: list[str] | None = None) -> ArtifactWriter:
        """An ``ArtifactWriter`` for this plan's artifact at ``target`` (its manifest gets this fingerprint)."""
        return ArtifactWriter(target, kind=self.kind, config=self.config, parents=self.parents, command=command)


# --------------------------------------------------------------------------- a project's stage folders

# Each pipeline stage's folder under <project.out_dir> and its section's ``out`` (which wins when set).
_OUTPUTS: dict[str, Callable[[ProjectConfig], tuple[str, str | None]]] = {
    "data": lambda cfg: ("data", cfg.data.out),
    "tokenizer": lambda cfg: ("tokenizer", cfg.tokenizer.out),
    "train": lambda cfg: ("train", cfg.train.out),
    "sft": lambda cfg: ("sft", cfg.sft.out),
    "encoder": lambda cfg: (f"encoder-{cfg.encoder.task}", cfg.encoder.out),
    "quantize": lambda cfg: (f"quantize-{cfg.quantize.method}", cfg.quantize.out),
    "eval": lambda cfg: ("eval", cfg.eval.out),
    "report": lambda cfg: ("report", cfg.report.out),
    "bio-data": lambda cfg: ("bio-data", cfg.bio.data.out),
    "bio-tokenizer": lambda cfg: ("bio-tokenizer", cfg.bio.tokenizer_out),
    "bio-sample": lambda cfg: ("bio-sample", cfg.bio.sample.out),
    "bio-mlm": lambda cfg: ("bio-mlm", cfg.bio.mlm.out),
    "bio-property": lambda cfg: ("bio-property", cfg.bio.property.out),
}


def output_dir(cfg: ProjectConfig, stage: str) -> Path:
    """The folder a pipeline stage writes and later stages read: the stage's ``out`` key, else
    ``<project.out_dir>/<stage>`` (``encoder-<task>`` and ``quantize-<method>`` for those two)."""
    name, override = _OUTPUTS[stage](cfg)
    return cfg.stage_dir(name, override)


def default_model(
    cfg: ProjectConfig,
    use: str = "use",
    advice: str = "name a model on the command line",
    error: type[SlmForgeError] = ArtifactError,
) -> Path:
    """The model a project works on when none is named: the sft stage's output when it exists,
    else the train stage's. The one rule for every command that needs "the project's model".

    Args:
        use: What the model is for, for the error message ("generate with", "quantize").
        advice: The other way out, for the error message ("set quantize.model").
        error: The error class to raise (the calling stage's own).

    Raises:
        error: Neither folder exists.
    """
    sft, train = output_dir(cfg, "sft"), output_dir(cfg, "train")
    for folder in (sft, train):
        if folder.exists():
            return folder
    raise error(f"No model to {use}: neither {sft} nor {train} exists. Train one first (`slmforge train`), "
                f"or {advice}.")


@dataclass
class Manifest:
    """The parsed ``manifest.json`` of an artifact folder."""

    kind: str
    slmforge_version: str
    command: list[str]
    config: dict[str, Any]
    parents: list[dict[str, str]]
    files: dict[str, dict[str, Any]]
    metrics: dict[str, Any]
    created_at: str
    finished_at: str
    duration_s: float
    fingerprint: str
    path: Path | None = field(default=None, compare=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": MANIFEST_FORMAT,
            "kind": self.kind,
            "slmforge_version": self.slmforge_version,
            "command": self.command,
            "config": self.config,
            "parents": self.parents,
            "files": self.files,
            "metrics": self.metrics,
            "created_at": self.created_at,
            "finished_at": self.finished_at,
            "duration_s": self.duration_s,
            "fingerprint": self.fingerprint,
        }


_REQUIRED: dict[str, type | tuple[type, ...]] = {
    "kind": str,
    "slmforge_version": str,
    "command": list,
    "config": dict,
    "parents": list,
    "files": dict,
    "metrics": dict,
    "created_at": str,
    "finished_at": str,
    "duration_s": (int, float),
    "fingerprint": str,
}


def read_manifest(path: str | Path, kind: str | None = None) -> Manifest:
    """Read and validate the manifest of an artifact folder (or a manifest.json path).

    Args:
        path: The artifact folder.
        kind: If given, the artifact must be of this kind (``dataset``, ``tokenizer``, ...).

    Raises:
        ArtifactError: No manifest, unreadable JSON, missing fields, or the wrong kind.
    """
    path = Path(path)
    folder = path.parent if path.name == MANIFEST else path
    file = folder / MANIFEST
    if not folder.exists():
        raise ArtifactError(f"{folder} does not exist. Run the stage that makes it first (see `slmforge --help`).")
    if not file.is_file():
        raise ArtifactError(
            f"{folder} has no {MANIFEST}, so it is not a finished slmforge artifact (an interrupted "
            "stage, or a folder made by another tool). Re-run the stage that writes it."
        )
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{file} is not readable JSON ({exc}); re-run the stage that writes it.") from None
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        raise ArtifactError(f"{file} is not a slmforge manifest (expected format {MANIFEST_FORMAT!r}).")
    bad = [k for k, t in _REQUIRED.items() if not isinstance(data.get(k), t)]
    if bad:
        raise ArtifactError(f"{file} is missing or has malformed fields: {', '.join(bad)}.")
    if kind is not None and data["kind"] != kind:
        raise ArtifactError(f"{folder} is a {data['kind']!r} artifact, but a {kind!r} artifact was expected here.")
    return Manifest(**{k: data[k] for k in _REQUIRED}, path=folder)


def verify_artifact(path: str | Path) -> list[str]:
    """Check every file listed in the manifest against its size and sha256.

    Returns:
        A list of problems, one line each (empty when the artifact is intact): missing
        files, changed files, and files present but not listed.

    Raises:
        ArtifactError: The manifest itself is missing or invalid.
    """
    manifest = read_manifest(path)
    folder = manifest.path
    assert folder is not None
    problems = []
    for rel, info in sorted(manifest.files.items()):
        f = folder / rel
        if not f.is_file():
            problems.append(f"missing: {rel}")
        elif f.stat().st_size != info.get("size") or sha256_file(f) != info.get("sha256"):
            problems.append(f"changed: {rel} (size or sha256 differs from the manifest)")
    listed = set(manifest.files) | {MANIFEST}
    for f in sorted(folder.rglob("*")):
        rel = f.relative_to(folder).as_posix()
        if f.is_file() and rel not in listed:
            problems.append(f"not in manifest: {rel}")
    return problems


def parent_ref(path: str | Path, kind: str | None = None) -> dict[str, str]:
    """The lineage entry of a parent artifact, for ``ArtifactWriter(parents=...)``."""
    m = read_manifest(path, kind)
    return {"path": str(Path(path).resolve()), "kind": m.kind, "fingerprint": m.fingerprint}


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (a zombie too: its parent must reap it)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def files_fingerprint(path: str | Path) -> str:
    """A cheap identity of a file or folder not made by slmforge: file names, sizes and mtimes."""
    path = Path(path)
    h = hashlib.sha256()
    for f in [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def is_endpoint(ref: str | Path | None) -> bool:
    """Whether a model reference is an OpenAI-compatible HTTP endpoint (``http(s)://HOST/v1#MODEL``)."""
    return str(ref or "").startswith(("http://", "https://"))


def model_ref(spec: str | Path) -> dict[str, str]:
    """The lineage entry of a model: its manifest (a slmforge artifact), else an external
    folder or file fingerprinted by its files, else an HTTP endpoint or a hub id taken at its word."""
    if is_endpoint(spec):
        return {"path": str(spec), "kind": "endpoint", "fingerprint": str(spec)}
    path = Path(str(spec))
    if path.is_dir() and (path / MANIFEST).exists():
        return parent_ref(path)
    if path.exists():
        return {"path": str(path.resolve()), "kind": "external-model", "fingerprint": files_fingerprint(path)}
    return {"path": str(spec), "kind": "hub-model", "fingerprint": str(spec)}


class ArtifactWriter:
    """Write an artifact folder atomically.

    Use as a context manager; write files under ``writer.path``, put numbers in
    ``writer.metrics``. On a clean exit the manifest is written last and the
    temporary folder replaces ``target``; on an exception (Ctrl-C included) the
    temporary folder is removed and any previous ``target`` is left untouched.

        with ArtifactWriter(out, kind="dataset", config=cfg.data.model_dump(mode="json")) as w:
            (w.path / "train.jsonl").write_text(...)
            w.metrics["documents"] = 10
    """

    def __init__(
        self,
        target: str | Path,
        kind: str,
        config: dict[str, Any] | None = None,
        parents: list[dict[str, str]] | None = None,
        command: list[str] | None = None,
    ) -> None:
        self.target = Path(target).resolve()
        self.kind = kind
        self.config = config or {}
        self.parents = parents or []
        self.command = command if command is not None else list(sys.argv)
        self.metrics: dict[str, Any] = {}
        self.path = self.target.parent / f".{self.target.name}{_TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._created = ""
        self._t0 = 0.0

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.kind, self.config, [p.get("fingerprint", "") for p in self.parents])

    def __enter__(self) -> ArtifactWriter:
        if self.target.exists() and not self.target.is_dir():
            raise ArtifactError(f"{self.target} exists and is a file; choose another output folder.")
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self._remove_stale_temps()
        self.path.mkdir()
        self._created = _now()
        self._t0 = time.monotonic()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if exc_type is not None:
            shutil.rmtree(self.path, ignore_errors=True)
            return
        try:
            self._finish()
        except BaseException:
            shutil.rmtree(self.path, ignore_errors=True)
            raise

    def _remove_stale_temps(self) -> None:
        """Temp folders left by writers of this target that were killed (kill -9, power loss)."""
        for p in self.target.parent.glob(f".{self.target.name}{_TMP_MARK}*"):
            pid = p.name[len(f".{self.target.name}{_TMP_MARK}") :].split("-", 1)[0]
            if pid.isdigit() and not pid_alive(int(pid)):
                shutil.rmtree(p, ignore_errors=True)

    def _finish(self) -> None:
        files = {}
        for f in sorted(self.path.rglob("*")):
            if f.is_file():
                rel = f.relative_to(self.path).as_posix()
                if rel == MANIFEST:
                    raise ArtifactError(f"a stage must not write {MANIFEST} itself ({self.target}).")
                files[rel] = {"size": f.stat().st_size, "sha256": sha256_file(f)}
        manifest = Manifest(
            kind=self.kind,
            slmforge_version=__version__,
            command=self.command,
            config=self.config,
            parents=self.parents,
            files=files,
            metrics=self.metrics,
            created_at=self._created,
            finished_at=_now(),
            duration_s=round(time.monotonic() - self._t0, 3),
            fingerprint=self.fingerprint,
        )
        tmp_manifest = self.path / (MANIFEST + ".part")
        tmp_manifest.write_text(json.dumps(manifest.to_json(), indent=2, default=str) + "\n", encoding="utf-8")
        os.replace(tmp_manifest, self.path / MANIFEST)
        # Swap in: move the old folder aside first, so that a crash between the two
        # renames leaves the old complete folder under a hidden name, never a mix.
        old = None
        if self.target.exists():
            old = self.target.parent / f".{self.target.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(self.target, old)
        os.replace(self.path, self.target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
