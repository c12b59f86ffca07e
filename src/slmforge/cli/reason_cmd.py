"""``slmforge reason``: test-time compute strategies on a question or a suite."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer

from slmforge.cli._options import ConfigOpt, SetOpt, err, out
from slmforge.cli.generate_cmd import ModelOpt

reason_app = typer.Typer(help="Reasoning strategies: self-consistency, best-of-N, tree search, adaptive compute.",
                         no_args_is_help=True)

StrategyHelp = "direct, cot, sc, bon, tot, refine, adaptive or auto"


@reason_app.command("run")
def run_cmd(
    question: Annotated[str, typer.Argument(help="The question (sent as a user message).")],
    strategy: Annotated[str, typer.Option("--strategy", "-s", help=StrategyHelp)] = "sc",
    n: Annotated[int | None, typer.Option("-n", min=1, help="Samples (default reason.n).")] = None,
    model: ModelOpt = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1)] = 256,
    as_json: Annotated[bool, typer.Option("--json", help="Print every internal call as JSON.")] = False,
    config: ConfigOpt = None, set_: SetOpt = None,
) -> None:
    """Answer one question with a strategy; prints the reply, and the answer, calls and tokens on stderr."""
    from slmforge.cli.generate_cmd import load_model
    from slmforge.config import load_config
    from slmforge.generate import SamplingParams, default_model_dir
    from slmforge.reasoning import Budget, extractor, run_strategy

    cfg = load_config(config, set_ or [])
    r = cfg.reason
    gen = load_model(model or str(default_model_dir(cfg)), None, "auto", cfg.generate.endpoints)
    result = run_strategy(strategy, gen, [{"role": "user", "content": question}], n=n or r.n,
                          params=SamplingParams(max_new_tokens=max_new_tokens),
                          budget=Budget(r.max_tokens, r.max_seconds), extract=extractor(r.extract),
                          temperature=r.temperature)
    if as_json:
        out.print(json.dumps({**asdict(result), "tokens": result.tokens}, indent=1, default=str))
        return
    err.print(f"{strategy}: answer {result.answer!r}, {len(result.calls)} calls, {result.tokens} tokens, "
              f"{result.seconds:.1f} s" + (f", votes {result.votes}" if result.votes else "")
              + ("" if result.stopped == "done" else f", stopped by {result.stopped}"), style="dim")
    out.print(result.text)


@reason_app.command("bench")
def bench_cmd(
    suite: Annotated[str, typer.Option(help="A generate suite (built-in name or YAML file).")] = "arithmetic",
    strategies: Annotated[str, typer.Option(help="Comma-separated strategies.")] = "direct,cot,sc,adaptive",
    n: Annotated[int | None, typer.Option("-n", min=1, help="Samples (default reason.n).")] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="Evaluate at most this many items.")] = None,
    model: ModelOpt = None,
    out_dir: Annotated[Path | None, typer.Option("--out", help="Where bench.json/.md/.png go "
                                                 "(default <project.out_dir>/reason-bench).")] = None,
    config: ConfigOpt = None, set_: SetOpt = None,
) -> None:
    """Accuracy, tokens and latency per strategy on a suite, with McNemar's test against direct and a plot."""
    from slmforge.cli.generate_cmd import load_model
    from slmforge.config import load_config
    from slmforge.generate import default_model_dir
    from slmforge.reasoning import Budget
    from slmforge.reasoning.bench import bench, save, table

    cfg = load_config(config, set_ or [])
    r = cfg.reason
    gen = load_model(model or str(default_model_dir(cfg)), None, "auto", cfg.generate.endpoints)
    result = bench(gen, suite, [s.strip() for s in strategies.split(",") if s.strip()], cfg, n=n or r.n,
                   limit=limit, budget=Budget(r.max_tokens, r.max_seconds), temperature=r.temperature)
    files = save(result, out_dir or cfg.stage_dir("reason-bench", None))
    out.print(table(result))
    err.print("wrote " + ", ".join(str(f) for f in files), style="dim")


@reason_app.command("cot")
def cot_cmd(
    out_dir: Annotated[Path | None, typer.Option("--out", help="Where the models and results go "
                                                 "(default <project.out_dir>/cot).")] = None,
    preset: Annotated[str, typer.Option(help="Model preset of both models.")] = "nano",
    minutes: Annotated[float | None, typer.Option(min=0.1, help="Training time of both models together.")] = 16.0,
    train_problems: Annotated[int, typer.Option(min=1)] = 4000,
    eval_problems: Annotated[int, typer.Option(min=1, help="Held-out problems per difficulty.")] = 100,
    sc: Annotated[int, typer.Option("--sc", min=1, help="Samples of self-consistency.")] = 5,
    teacher: Annotated[str | None, typer.Option(help="A teacher (URL#MODEL or a model folder): its step-by-step "
                                                "solutions, kept when their answer is right, replace the "
                                                "computed scratchpads.")] = None,
    seed: Annotated[int, typer.Option()] = 0,
    config: ConfigOpt = None, set_: SetOpt = None,
) -> None:
    """Chain-of-thought fine-tuning: train a direct-answer and a step-by-step model of one size on the same
    verified arithmetic problems, then compare direct, CoT and CoT + self-consistency by difficulty
    (McNemar's test), with a table and a plot."""
    from slmforge.cli.generate_cmd import load_model
    from slmforge.config import load_config
    from slmforge.reasoning.cot import cot_experiment

    cfg = load_config(config, set_ or [])
    gen = load_model(teacher, None, "auto", cfg.generate.endpoints) if teacher else None
    folder = out_dir or cfg.stage_dir("cot", None)
    cot_experiment(folder, preset, train_problems, eval_problems=eval_problems, sc_samples=sc, minutes=minutes,
                   seed=seed, teacher=gen, log=lambda m: err.print(m, style="dim"))
    out.print((Path(folder) / "cot_table.md").read_text())
    err.print(f"wrote {folder}/cot_results.json, cot_table.md, cot_accuracy.png, direct-model/, cot-model/", style="dim")
