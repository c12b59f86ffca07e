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

from slmforge.artifacts import fingerprint, parent_ref, read_manifest
from slmforge.config import ProjectConfig
from slmforge.errors import ArtifactError, ConfigError


@dataclass
class StageOutcome:
    stage: str
    path: Path
    status: str  # "ran" or "up to date"
    seconds: float


Plan = tuple[str, dict, list[dict[str, str]]]  # (kind, config, parents) of the output a stage would write


def _data_plan(cfg: ProjectConfig) -> Plan:
    from slmforge.data import source_refs

    return "dataset", cfg.data.model_dump(mode="json"), source_refs(cfg)


def _tokenizer_plan(cfg: ProjectConfig) -> Plan:
    data = cfg.resolve(cfg.tokenizer.data) if cfg.tokenizer.data else cfg.stage_dir("data", cfg.data.out)
    return "tokenizer", cfg.tokenizer.model_dump(mode="json"), [parent_ref(data, "dataset")]


def _train_plan(cfg: ProjectConfig) -> Plan:
    from slmforge.train import pretrain_plan

    return pretrain_plan(cfg)


def _sft_plan(cfg: ProjectConfig) -> Plan:
    from slmforge.train import finetune_plan

    return finetune_plan(cfg)


def _encoder_plan(cfg: ProjectConfig) -> Plan:
    from slmforge.train.encoder import encoder_plan

    return encoder_plan(cfg)


def _quantize_plan(cfg: ProjectConfig) -> Plan:
    from slmforge.compress import quantize_plan

    return quantize_plan(cfg)


def _eval_plan(cfg: ProjectConfig) -> Plan:
    from slmforge.evaluate.run import eval_plan

    return eval_plan(cfg)


def _report_plan(cfg: ProjectConfig) -> Plan:
    from slmforge.evaluate.report import report_plan

    return report_plan(cfg)


def _run_data(cfg: ProjectConfig, command, log) -> Path:
    from slmforge.data import run_data_stage

    return run_data_stage(cfg, command=command).path


def _run_tokenizer(cfg: ProjectConfig, command, log) -> Path:
    from slmforge.tokenizer import train_tokenizer

    return train_tokenizer(cfg, command=command).path


def _run_train(cfg: ProjectConfig, command, log) -> Path:
    from slmforge.train import pretrain

    return pretrain(cfg, command=command, log=log).path


def _run_sft(cfg: ProjectConfig, command, log) -> Path:
    from slmforge.train import finetune

    return finetune(cfg, command=command, log=log).path


def _run_encoder(cfg: ProjectConfig, command, log) -> Path:
    from slmforge.train.encoder import train_encoder

    return train_encoder(cfg, command=command, log=log).path


def _run_quantize(cfg: ProjectConfig, command, log) -> Path:
    from slmforge.compress import quantize

    return quantize(cfg, command=command, log=log).path


def _run_eval(cfg: ProjectConfig, command, log) -> Path:
    from slmforge.evaluate.run import run_eval

    return run_eval(cfg, command=command, log=log).path


def _run_report(cfg: ProjectConfig, command, log) -> Path:
    from slmforge.evaluate.report import write_report

    return write_report(cfg, command=command, log=log).path


# name -> (output folder, plan, runner). Execution order is project.stages, which must follow this order.
STAGES: dict[str, tuple[Callable[[ProjectConfig], Path], Callable[[ProjectConfig], Plan], Callable]] = {
    "data": (lambda c: c.stage_dir("data", c.data.out), _data_plan, _run_data),
    "tokenizer": (lambda c: c.stage_dir("tokenizer", c.tokenizer.out), _tokenizer_plan, _run_tokenizer),
    "train": (lambda c: c.stage_dir("train", c.train.out), _train_plan, _run_train),
    "sft": (lambda c: c.stage_dir("sft", c.sft.out), _sft_plan, _run_sft),
    "encoder": (lambda c: c.stage_dir(f"encoder-{c.encoder.task}", c.encoder.out), _encoder_plan, _run_encoder),
    "quantize": (lambda c: c.stage_dir(f"quantize-{c.quantize.method}", c.quantize.out), _quantize_plan, _run_quantize),
    "eval": (lambda c: c.stage_dir("eval", c.eval.out), _eval_plan, _run_eval),
    "report": (lambda c: c.stage_dir("report", c.report.out), _report_plan, _run_report),
}


def is_current(cfg: ProjectConfig, stage: str) -> bool:
    """Whether the stage's output exists and matches what it would write now."""
    out_dir, plan, _ = STAGES[stage]
    try:
        existing = read_manifest(out_dir(cfg))
        kind, config, parents = plan(cfg)
    except ArtifactError:  # no output yet, or an input is missing (the stage will say which)
        return False
    return existing.fingerprint == fingerprint(kind, config, [p["fingerprint"] for p in parents])


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
    names = [n for n in STAGES if n in cfg.project.stages]
    if [n for n in cfg.project.stages if n in STAGES] != names:
        raise ConfigError(f"project.stages must keep this order: {', '.join(STAGES)}; got {cfg.project.stages}.")
    for given in (until, start):
        if given is not None and given not in names:
            raise ConfigError(f"Unknown stage {given!r}; this project's stages are, in order: {', '.join(names)}.")
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
        path = runner(cfg, command, log)
        outcomes.append(StageOutcome(name, path, "ran", time.monotonic() - t0))
    return outcomes
