"""What the dashboard shows of a project: its artifacts (every folder with a manifest under the project's
``out_dir``), their lineage, integrity and headline metrics. Reads only files; no model is loaded."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slmforge.artifacts import MANIFEST, Manifest, read_manifest, verify_artifact
from slmforge.config import ProjectConfig, load_config
from slmforge.errors import ArtifactError

# The metrics a runs table shows first, per kind (the rest are in the detail view).
_HEADLINE = {
    "dataset": ("documents_out", "train_documents", "train_tokens"),
    "tokenizer": ("vocab_size", "chars_per_token"),
    "model": ("val_ppl", "val_loss", "train_loss", "steps", "tokens_per_s"),
    "adapter": ("val_ppl", "val_loss", "train_loss", "steps"),
    "evaluation": (),
    "comparison": (),
    "quantized-model": ("size_ratio", "ppl_ratio", "perplexity"),
}
_MAX_DEPTH = 4  # runs/sweep/points/<point>/<stage>: sweeps nest artifacts this deep


@dataclass
class Project:
    """A project file the dashboard was given, with the ``--set`` overrides its runs use."""

    key: str  # short id used in URLs
    config_path: Path | None
    overrides: list[str] = field(default_factory=list)

    def config(self) -> ProjectConfig:
        return load_config(self.config_path, self.overrides)

    @property
    def name(self) -> str:
        return self.config().project.name

    @property
    def root(self) -> Path:
        cfg = self.config()
        return cfg.resolve(cfg.project.out_dir).resolve()


@dataclass
class Artifact:
    """One artifact folder as the runs table shows it."""

    id: str  # path relative to the project's out_dir, used in URLs
    path: Path
    manifest: Manifest

    @property
    def kind(self) -> str:
        return self.manifest.kind

    @property
    def status(self) -> str:
        """``passing`` / ``failing`` where gates were checked, else ``done``."""
        passing = self.manifest.metrics.get("passing")
        return "done" if passing is None else ("passing" if passing else "failing")

    @property
    def size(self) -> int:
        return sum(int(f.get("size", 0)) for f in self.manifest.files.values())

    def headline(self, n: int = 4) -> dict[str, Any]:
        """A few metrics worth a column: the kind's usual ones, else the first numeric ones."""
        metrics = {k: v for k, v in self.manifest.metrics.items() if k != "passing"}
        chosen = [k for k in _HEADLINE.get(self.kind, ()) if k in metrics]
        chosen += [k for k, v in metrics.items() if k not in chosen and isinstance(v, (int, float, str))]
        return {k: metrics[k] for k in chosen[:n]}


def artifacts(project: Project) -> list[Artifact]:
    """Every finished artifact under the project's ``out_dir``, newest first."""
    root = project.root
    found: list[Artifact] = []
    if not root.is_dir():
        return found
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        depth = len(here.relative_to(root).parts)
        dirnames[:] = [] if depth >= _MAX_DEPTH else sorted(d for d in dirnames if not d.startswith("."))
        if MANIFEST in filenames:
            try:
                found.append(Artifact(here.relative_to(root).as_posix(), here, read_manifest(here)))
            except ArtifactError:
                continue  # an unfinished folder: not an artifact yet
            dirnames[:] = [d for d in dirnames if d == "points"]  # an artifact's own files are not artifacts
    return sorted(found, key=lambda a: a.manifest.finished_at, reverse=True)


def find(project: Project, artifact_id: str) -> Artifact:
    """The artifact ``artifact_id`` (relative to ``out_dir``) of the project.

    Raises:
        ArtifactError: No such artifact, or an id that leaves the project's folder.
    """
    root = project.root
    path = (root / artifact_id).resolve()
    if root != path and root not in path.parents:
        raise ArtifactError(f"{artifact_id!r} is not inside the project's {root}.")
    return Artifact(path.relative_to(root).as_posix(), path, read_manifest(path))


_INTEGRITY: dict[Path, tuple[tuple, list[str]]] = {}  # folder -> (files' stamp, problems): the latest only


def integrity(artifact: Artifact) -> list[str]:
    """``slmforge inspect``'s check (files against their sizes and sha256), cached while no file changes."""
    stamp = tuple((f.relative_to(artifact.path).as_posix(), f.stat().st_size, f.stat().st_mtime_ns)
                  for f in sorted(artifact.path.rglob("*")) if f.is_file())
    cached = _INTEGRITY.get(artifact.path)
    if cached is None or cached[0] != stamp:
        _INTEGRITY[artifact.path] = cached = (stamp, verify_artifact(artifact.path))
    return cached[1]


def lineage(project: Project, items: list[Artifact]) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """The lineage graph: nodes (each artifact, and each parent outside the project such as a base
    model) and edges (parent id -> child id) from the manifests' ``parents``."""
    by_path = {str(a.path.resolve()): a for a in items}
    nodes = {a.id: {"id": a.id, "kind": a.kind, "status": a.status, "inside": True} for a in items}
    edges: list[tuple[str, str]] = []
    for a in items:
        for parent in a.manifest.parents:
            ref = str(parent.get("path", ""))
            resolved = str(Path(ref).resolve()) if ref and "://" not in ref else ref
            source = by_path.get(resolved)
            pid = source.id if source else ref
            if source is None and pid not in nodes:
                nodes[pid] = {"id": pid, "kind": parent.get("kind", "external"), "status": "external",
                              "inside": False}
            edges.append((pid, a.id))
    return list(nodes.values()), edges


def read_jsonl(path: Path, limit: int = 5000) -> list[dict[str, Any]]:
    """Up to ``limit`` JSON objects of a JSON-lines file (lines that are not objects are skipped)."""
    rows: list[dict[str, Any]] = []
    if not path.is_file():
        return rows
    with path.open(encoding="utf-8") as f:
        for line in f:
            if len(rows) >= limit:
                break
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict):
                rows.append(row)
    return rows


def metric_deltas(a: Artifact, b: Artifact) -> list[dict[str, Any]]:
    """The metrics of two artifacts side by side, with B - A where both are numbers."""
    ma, mb = a.manifest.metrics, b.manifest.metrics
    rows = []
    for key in [*ma, *(k for k in mb if k not in ma)]:
        va, vb = ma.get(key), mb.get(key)
        number = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (va, vb))
        rows.append({"metric": key, "a": va, "b": vb, "delta": (vb - va) if number else None})  # type: ignore[operator]
    return rows
