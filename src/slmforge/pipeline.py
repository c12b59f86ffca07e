"""``slmforge run``: the project's stages in order, each skipped when its output
is current.

A stage's output is current when its manifest's fingerprint equals the one the
stage would write now: the fingerprint covers the stage kind, its resolved
config section, its parents' fingerprints (for the data stage: the source files'
names, sizes and modification times) and the slmforge version.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from slmforge.artifacts import fingerprint, read_manifest
from slmforge.config import ProjectConfig
from slmforge.errors import ArtifactError, ConfigError


@dataclass
class StageOutcome:
    stage: str
    path: Path
    status: str  # "ran" or "up to date"
    seconds: float


def _data_dir(cfg: ProjectConfig) -> Path:
    return cfg.stage_dir("data", cfg.data.out)


def _tokenizer_data_dir(cfg: ProjectConfig) -> Path:
    return cfg.resolve(cfg.tokenizer.data) if cfg.tokenizer.data else _data_dir(cfg)


def _data_expected(cfg: ProjectConfig) -> str:
    from slmforge.data import source_refs

    return fingerprint("dataset", cfg.data.model_dump(mode="json"), [r["fingerprint"] for r in source_refs(cfg)])


def _tokenizer_expected(cfg: ProjectConfig) -> str:
    parent = read_manifest(_tokenizer_data_dir(cfg), "dataset")
    return fingerprint("tokenizer", cfg.tokenizer.model_dump(mode="json"), [parent.fingerprint])


def _run_data(cfg: ProjectConfig, command: list[str] | None) -> Path:
    from slmforge.data import run_data_stage

    return run_data_stage(cfg, command=command).path


def _run_tokenizer(cfg: ProjectConfig, command: list[str] | None) -> Path:
    from slmforge.tokenizer import train_tokenizer

    return train_tokenizer(cfg, command=command).path


# name -> (output folder, expected fingerprint, runner). Order is execution order.
STAGES: dict[str, tuple[Callable[[ProjectConfig], Path], Callable[[ProjectConfig], str], Callable]] = {
    "data": (_data_dir, _data_expected, _run_data),
    "tokenizer": (lambda c: c.stage_dir("tokenizer", c.tokenizer.out), _tokenizer_expected, _run_tokenizer),
}


def is_current(cfg: ProjectConfig, stage: str) -> bool:
    """Whether the stage's output exists and matches what it would write now."""
    out_dir, expected, _ = STAGES[stage]
    try:
        return read_manifest(out_dir(cfg)).fingerprint == expected(cfg)
    except ArtifactError:
        return False


def run_pipeline(
    cfg: ProjectConfig,
    until: str | None = None,
    start: str | None = None,
    force: bool = False,
    command: list[str] | None = None,
    log: Callable[[str], None] | None = None,
) -> list[StageOutcome]:
    """Run the stages from ``start`` to ``until`` (default: all), skipping current ones.

    Raises:
        ConfigError: An unknown stage name.
        SlmForgeError: Whatever a stage raises; stages finished before it keep their output.
    """
    names = list(STAGES)
    for given in (until, start):
        if given is not None and given not in STAGES:
            raise ConfigError(f"Unknown stage {given!r}; the stages are, in order: {', '.join(names)}.")
    first = names.index(start) if start else 0
    last = names.index(until) if until else len(names) - 1
    outcomes = []
    for name in names[first : last + 1]:
        out_dir, _, runner = STAGES[name]
        t0 = time.monotonic()
        if not force and is_current(cfg, name):
            outcomes.append(StageOutcome(name, out_dir(cfg), "up to date", time.monotonic() - t0))
            if log:
                log(f"{name}: up to date, skipped")
            continue
        if log:
            log(f"{name}: running")
        path = runner(cfg, command)
        outcomes.append(StageOutcome(name, path, "ran", time.monotonic() - t0))
    return outcomes
