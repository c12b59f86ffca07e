"""``slmforge run``: the project's stages in order, each skipped when its output
is current.

A stage's output is current when its manifest's fingerprint equals the one the
stage would write now: the fingerprint covers the stage kind, its resolved
config section, its parents' fingerprints (for the data stage: the source files'
names, sizes and modification times) and the slmforge version.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slmforge.artifacts import Plan, output_dir, read_manifest
from slmforge.config import ProjectConfig
from slmforge.errors import ArtifactError, ConfigError


@dataclass
class StageOutcome:
    stage: str
    path: Path
    status: str  # "ran" or "up to date"
    seconds: float


@dataclass(frozen=True)
class _Deferred:
    """A function of a stage's package, imported when first called: those packages pull in torch and
    transformers, which ``slmforge --help`` and the up-to-date checks of finished stages never need.
    Every one points down the layers (pipeline sits above every stage); tests/test_stages.py
    checks that each resolves."""

    module: str
    name: str

    def resolve(self) -> Callable[..., Any]:
        function: Callable[..., Any] = getattr(importlib.import_module(self.module), self.name)
        return function

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.resolve()(*args, **kwargs)


@dataclass(frozen=True)
class Stage:
    """One stage of ``slmforge run``.

    Attributes:
        name: The stage's name in ``project.stages`` and its config section.
        kinds: The artifact kinds its output may be (``sft`` writes a model or a LoRA adapter).
        plan: What it would write now (``Plan``): whose fingerprint decides whether its output is current.
        make: Its public function, called as ``make(cfg, command=..., log=...)``; returns a result with ``.path``.
        logs: Whether ``make`` takes ``log`` (stages that report only through progress bars do not).
    """

    name: str
    kinds: tuple[str, ...]
    plan: Callable[[ProjectConfig], Plan]
    make: Callable[..., Any]
    logs: bool = True

    def output(self, cfg: ProjectConfig) -> Path:
        """The folder it writes: its section's ``out``, else ``<project.out_dir>/<name>``."""
        return output_dir(cfg, self.name)

    def run(self, cfg: ProjectConfig, command: list[str] | None, log: Callable[[str], None] | None) -> Path:
        """Make its output; returns the folder written."""
        return Path(self.make(cfg, command=command, **({"log": log} if self.logs else {})).path)


def _data_plan(cfg: ProjectConfig) -> Plan:
    from slmforge.data import source_refs

    return Plan("dataset", cfg.data.fingerprint_config(), source_refs(cfg))


def _encoder_plan(cfg: ProjectConfig) -> Plan:
    from slmforge.train.encoder import encoder_plan

    return Plan(*encoder_plan(cfg))  # encoder_plan still returns a (kind, config, parents) tuple


# Execution order is project.stages, which must follow this order.
STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("data", ("dataset",), _data_plan, _Deferred("slmforge.data", "run_data_stage"), logs=False),
    Stage("tokenizer", ("tokenizer",), _Deferred("slmforge.tokenizer", "tokenizer_plan"),
          _Deferred("slmforge.tokenizer", "train_tokenizer"), logs=False),
    Stage("bio-data", ("dataset",), _Deferred("slmforge.bio", "data_plan"), _Deferred("slmforge.bio", "make_bio_data")),
    Stage("bio-tokenizer", ("tokenizer",), _Deferred("slmforge.bio", "tokenizer_plan"),
          _Deferred("slmforge.bio", "make_bio_tokenizer")),
    Stage("train", ("model",), _Deferred("slmforge.train", "pretrain_plan"), _Deferred("slmforge.train", "pretrain")),
    Stage("sft", ("model", "adapter"), _Deferred("slmforge.train", "finetune_plan"),
          _Deferred("slmforge.train", "finetune")),
    Stage("bio-sample", ("molecule-samples",), _Deferred("slmforge.bio", "sample_plan"),
          _Deferred("slmforge.bio", "sample_molecules")),
    Stage("bio-mlm", ("masked-lm",), _Deferred("slmforge.bio", "mlm_plan"), _Deferred("slmforge.bio", "train_mlm")),
    Stage("bio-property", ("property-model",), _Deferred("slmforge.bio", "property_plan"),
          _Deferred("slmforge.bio", "train_property")),
    Stage("encoder", ("encoder",), _encoder_plan, _Deferred("slmforge.train.encoder", "train_encoder")),
    Stage("quantize", ("quantized-model",), _Deferred("slmforge.compress", "quantize_plan"),
          _Deferred("slmforge.compress", "quantize")),
    Stage("eval", ("evaluation",), _Deferred("slmforge.evaluate.run", "eval_plan"),
          _Deferred("slmforge.evaluate.run", "run_eval")),
    Stage("report", ("report",), _Deferred("slmforge.evaluate.report", "report_plan"),
          _Deferred("slmforge.evaluate.report", "write_report")),
)}


def is_current(cfg: ProjectConfig, stage: str) -> bool:
    """Whether the stage's output exists and matches what it would write now."""
    s = STAGES[stage]
    try:
        existing = read_manifest(s.output(cfg))
        plan = s.plan(cfg)
    except ArtifactError:  # no output yet, or an input is missing (the stage will say which)
        return False
    return existing.fingerprint == plan.fingerprint


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
    names: list[str] = [n for n in STAGES if n in cfg.project.stages]
    if [n for n in cfg.project.stages if n in STAGES] != names:
        raise ConfigError(f"project.stages must keep this order: {', '.join(STAGES)}; got {cfg.project.stages}.")
    for given in (until, start):
        if given is not None and given not in names:
            raise ConfigError(f"Unknown stage {given!r}; this project's stages are, in order: {', '.join(names)}.")
    first = names.index(start) if start else 0
    last = names.index(until) if until else len(names) - 1
    outcomes = []
    for name in names[first : last + 1]:
        stage = STAGES[name]
        t0 = time.monotonic()
        if not force and is_current(cfg, name):
            outcomes.append(StageOutcome(name, stage.output(cfg), "up to date", time.monotonic() - t0))
            if log:
                log(f"{name}: up to date, skipped")
            continue
        if log:
            log(f"{name}: running")
        path = stage.run(cfg, command, log)
        outcomes.append(StageOutcome(name, path, "ran", time.monotonic() - t0))
    return outcomes
