"""The pipeline commands: ``slmforge run``, ``report`` and ``quickstart``, and how they print outcomes."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from slmforge.cli import bio_cmd
from slmforge.cli._options import ConfigOpt, SetOpt, err, load_project, out


def run(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    until: Annotated[str | None, typer.Option(help="Stop after this stage.")] = None,
    start: Annotated[str | None, typer.Option("--from", help="Start at this stage (earlier ones must exist).")] = None,
    force: Annotated[bool, typer.Option(help="Re-run stages even when they are up to date.")] = False,
) -> None:
    """Run the project's stages in order, skipping those whose inputs and config are unchanged."""
    from slmforge.pipeline import run_pipeline

    cfg = load_project(config, set_)
    try:
        outcomes = run_pipeline(cfg, until=until, start=start, force=force, command=sys.argv, log=err.print)
    except KeyboardInterrupt as exc:  # training checkpointed; finished stages keep their output
        err.print(f"stopped: {exc or 'interrupted'}. Run the same command again to resume.", style="yellow")
        raise typer.Exit(130) from None
    _print_outcomes(outcomes)


def _print_outcomes(outcomes) -> None:
    for o in outcomes:
        verb = "ran" if o.status == "ran" else "up to date"
        out.print(f"  {o.stage:<10} {verb} {o.path} ({o.seconds:.1f} s)")


def report(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    out_dir: Annotated[Path | None, typer.Option("--out", help="Output folder (default: report.out).")] = None,
) -> None:
    """Held-out perplexity vs a unigram baseline, loss curves, data stats and sample answers (MD + HTML)."""
    from slmforge.evaluate.report import write_report

    cfg = load_project(config, set_)
    result = write_report(cfg, out=out_dir, command=sys.argv, log=err.print)
    _print_report(result.path, result.metrics)


def _print_report(path: Path, m: dict) -> None:
    verdict = "beats" if m["beats_unigram"] else "does NOT beat"
    out.print(f"held-out perplexity {m['ppl']} ({m['bits_per_byte']} bits/byte): {verdict} the unigram baseline {m['unigram_ppl']}")
    out.print(f"  -> {path / 'report.html'}")


def quickstart(
    out_dir: Annotated[Path, typer.Option("--out", help="Project folder to create and run in.")] = Path("quickstart"),
    force: Annotated[bool, typer.Option(help="Re-run every stage even when up to date.")] = False,
    set_: SetOpt = None,
    recipe: Annotated[str, typer.Option(help="quickstart: a small model from scratch; adapt: Gemma 3 270M (offline "
                                        "package) specialised on the domain and compared with its base; code: "
                                        "Gemma 3 270M adapted to Python code with fill-in-the-middle; smiles: a "
                                        "SMILES GPT and a property head on molecules; protein: a masked protein "
                                        "LM.")] = "quickstart",
) -> None:
    """Init + run on the built-in python-docs domain: data, tokenizer, pretraining, fine-tuning, report."""
    from slmforge.config import PROJECT_FILE, init_project, load_config
    from slmforge.pipeline import run_pipeline

    project_file = out_dir / PROJECT_FILE
    if not project_file.exists():
        init_project(out_dir, recipe)
        out.print(f"Wrote {project_file}")
    cfg = load_config(project_file, set_ or [])
    if recipe in ("adapt", "code") and cfg.model.base and not cfg.resolve(cfg.model.base).exists():
        from slmforge.model.offline import offline_base

        err.print(f"writing the offline base to {cfg.resolve(cfg.model.base)} (once)", style="dim")
        offline_base(cfg.resolve(cfg.model.base))
    if recipe in ("smiles", "protein"):
        bio_cmd.prepare_recipe(cfg)
    outcomes = run_pipeline(cfg, force=force, command=sys.argv, log=err.print)
    _print_outcomes(outcomes)
    if recipe in ("smiles", "protein"):
        return bio_cmd.print_recipe({o.stage: o.path for o in outcomes}, project_file)
    paths = {o.stage: o.path for o in outcomes}
    if "report" in paths:
        report_json = json.loads((paths["report"] / "report.json").read_text())
        out.print("")
        _print_report(paths["report"], report_json["metrics"])
        for sample in report_json["samples"][:2]:
            out.print(f"\nQ: {sample['question']}")
            for name, answer in sample["answers"].items():
                out.print(f"  [{name}] {answer[:300]}")
    model = paths.get("sft") or paths.get("train")
    # Plain print: these lines are meant to be copied, so no wrapping.
    print(
        "\nNext:\n"
        + (f"  open {paths['report']}/report.html\n" if "report" in paths else "")
        + (f"  open {paths['eval']}/report.md   (the model against its base)\n" if "report" not in paths and "eval" in paths else "")
        + f"  slmforge chat --model {model}\n"
        f"  slmforge generate 'What does json.dumps do?' --chat --model {model} --profile creative\n"
        f"  slmforge inspect {model}\n"
        f"  slmforge serve {model}   (OpenAI-compatible API on http://127.0.0.1:8000/v1)\n"
        f"  edit {project_file}, then: slmforge run -c {project_file}   (only changed stages re-run)"
    )
