"""The ``slmforge`` command line. The only module that parses argv, prints for
humans and exits. Stages are imported inside the commands that run them, so
``slmforge --help`` stays instant."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from slmforge import __version__
from slmforge.cli import (
    agent_cmd,
    bench_cmd,
    bio_cmd,
    generate_cmd,
    graph_cmd,
    keys_cmd,
    memory_cmd,
    model_cmd,
    pipeline_cmd,
    rag_cmd,
    reason_cmd,
    serve_cmd,
    sizing_cmd,
    ui_cmd,
)
from slmforge.cli._options import ConfigOpt, SetOpt, err, load_project, out
from slmforge.errors import SlmForgeError

app = typer.Typer(
    name="slmforge",
    help="Own a domain-specific small language model end to end: data, tokenizer, training, "
    "evaluation, compression, export, serving.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
config_app = typer.Typer(help="Show the resolved project config.", no_args_is_help=True)
model_app = typer.Typer(help="Size models; merge a LoRA adapter into its base; trim a vocabulary to a domain.",
                        no_args_is_help=True)
eval_app = typer.Typer(help="Evaluate models on suites, check gates, compare A/B.", no_args_is_help=True)
tokenizer_app = typer.Typer(help="Train (or extend: tokenizer.method) and analyze tokenizers.", no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(tokenizer_app, name="tokenizer")
app.add_typer(model_app, name="model")
model_app.command("trim-vocab")(model_cmd.trim_vocab)
app.add_typer(eval_app, name="eval")
app.command("generate")(generate_cmd.generate)
app.command("chat")(generate_cmd.chat)
app.command("serve")(serve_cmd.serve)
app.command("proxy")(serve_cmd.proxy)
app.command("ui")(ui_cmd.ui)
app.command("doctor")(sizing_cmd.doctor)
app.command("roi")(sizing_cmd.roi)
app.command("sweep")(sizing_cmd.sweep)
app.add_typer(keys_cmd.keys_app, name="keys")
app.add_typer(bench_cmd.bench_app, name="bench")
app.add_typer(rag_cmd.rag_app, name="rag")
app.add_typer(memory_cmd.memory_app, name="memory")
app.add_typer(graph_cmd.graph_app, name="graph")
app.add_typer(agent_cmd.agent_app, name="agent")
app.add_typer(reason_cmd.reason_app, name="reason")
app.add_typer(bio_cmd.bio_app, name="bio")


def _version(value: bool) -> None:
    if value:
        out.print(f"slmforge {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """slmforge: one CLI for the whole life of a domain small language model."""


# --------------------------------------------------------------------------- project


@app.command()
def init(
    directory: Annotated[Path, typer.Argument(help="Folder for the project (created if missing).")] = Path("."),
    template: Annotated[str, typer.Option(help="quickstart (python-docs domain), adapt (a pretrained base "
                                          "specialised on it), code (a code model with fill-in-the-middle), "
                                          "smiles or protein (molecules, proteins: slmforge bio) or blank.")] = "quickstart",
    force: Annotated[bool, typer.Option(help="Overwrite an existing slmforge.yaml.")] = False,
) -> None:
    """Write DIR/slmforge.yaml from a template, every key documented."""
    from slmforge.config import init_project

    path = init_project(directory, template, force)
    out.print(f"Wrote {path}. Next: cd {directory} && slmforge run")


@config_app.command("show")
def config_show(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Print the resolved config (defaults -> project file -> --set) as YAML."""
    from slmforge.config import dump_config

    cfg = load_project(config, set_)
    out.print(f"# resolved from: {cfg.source}")
    print(dump_config(cfg), end="")


@app.command()
def inspect(
    path: Annotated[Path, typer.Argument(help="An artifact folder (or its manifest.json).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the manifest as JSON.")] = False,
) -> None:
    """Print and validate an artifact's manifest; report missing or changed files by name."""
    from slmforge.artifacts import read_manifest, verify_artifact

    m = read_manifest(path)
    problems = verify_artifact(path)
    if as_json:
        print(json.dumps({**m.to_json(), "problems": problems}, indent=2))
    else:
        out.print(f"{m.kind} at {m.path}")
        out.print(f"  made by slmforge {m.slmforge_version} at {m.finished_at} in {m.duration_s} s")
        out.print(f"  command: {' '.join(m.command)}")
        for p in m.parents:
            out.print(f"  parent: {p.get('kind')} {p.get('path')}")
        total = sum(f["size"] for f in m.files.values())
        out.print(f"  files: {len(m.files)} ({total / 1e6:.2f} MB)")
        for k, v in m.metrics.items():
            out.print(f"  {k}: {json.dumps(v) if isinstance(v, (dict, list)) else v}")
        if problems:
            err.print(f"{len(problems)} problem(s):", style="red")
            for p in problems:
                err.print(f"  {p}")
        else:
            out.print("all files match the manifest", style="green")
    if problems:
        raise typer.Exit(1)


# --------------------------------------------------------------------------- stages


@app.command()
def data(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    out_dir: Annotated[Path | None, typer.Option("--out", help="Output folder (default: data.out).")] = None,
) -> None:
    """Ingest, clean, dedup, filter and scrub documents; write text/chat/classification/NER sets."""
    from slmforge.data import run_data_stage

    cfg = load_project(config, set_)
    result = run_data_stage(cfg, out=out_dir, command=sys.argv)
    s = result.stats
    out.print(
        f"data {s['documents_in']} read -> {s['documents_out']} kept "
        f"(train {s['splits']['train']['documents']}, val {s['splits']['val']['documents']}, "
        f"test {s['splits']['test']['documents']}) in {s['seconds']} s"
    )
    if s["dropped"]:
        out.print("  dropped: " + ", ".join(f"{k} {v}" for k, v in s["dropped"].items()))
    if s["inputs_skipped"]:
        out.print("  skipped: " + ", ".join(f"{k} {v}" for k, v in s["inputs_skipped"].items()))
    if any(s["pii"].values()):
        out.print("  PII replaced: " + ", ".join(f"{k} {v}" for k, v in s["pii"].items() if v))
    if code := {k: v for k, v in s["cleaning"].items() if k.endswith(("headers_removed", "functions_removed")) and v}:
        out.print("  code: " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in code.items()))
    out.print(f"  -> {result.path} (report: {result.path / 'report.md'})")


@tokenizer_app.command("train")
def tokenizer_train(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    data_dir: Annotated[Path | None, typer.Option("--data", help="Data artifact (default: tokenizer.data).")] = None,
    out_dir: Annotated[Path | None, typer.Option("--out", help="Output folder (default: tokenizer.out).")] = None,
) -> None:
    """Train a byte-level BPE tokenizer on the data stage's text (or extend one: tokenizer.method=extend)."""
    from slmforge.tokenizer import train_tokenizer

    cfg = load_project(config, set_)
    result = train_tokenizer(cfg, data=data_dir, out=out_dir, command=sys.argv)
    out.print(f"tokenizer vocab {result.vocab_size}, {len(result.domain_terms)} domain terms -> {result.path}")
    held = result.metrics.get("heldout")
    if held:
        out.print(
            f"  held-out: {held.get('fertility', 0):.3f} tokens/word, {held.get('chars_per_token', 0):.2f} chars/token",
            highlight=False,
        )


@tokenizer_app.command("analyze")
def tokenizer_analyze(
    tokenizers: Annotated[list[Path], typer.Argument(help="Tokenizer folders to compare side by side.")],
    data_dir: Annotated[Path | None, typer.Option("--data", help="Data artifact whose held-out split to use.")] = None,
    text: Annotated[Path | None, typer.Option("--text", help="A text file to use instead of --data.")] = None,
    split: Annotated[str, typer.Option(help="Split of --data: val or test.")] = "val",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Fertility, byte-fallback/unknown rate and compression of tokenizers on held-out domain text."""
    from dataclasses import asdict

    from slmforge.tokenizer import analyze_tokenizers, format_stats_table, heldout_texts

    if (data_dir is None) == (text is None):
        raise typer.BadParameter("give exactly one of --data DIR or --text FILE")
    if text is not None:
        if not text.is_file():
            raise typer.BadParameter(f"{text} is not a file", param_hint="--text")
        texts = [text.read_text(encoding="utf-8", errors="replace")]
    else:
        texts = heldout_texts(data_dir, split)
    stats = analyze_tokenizers(list(tokenizers), texts)
    if as_json:
        print(json.dumps([asdict(s) for s in stats], indent=2))
    else:
        print(format_stats_table(stats))


@model_app.command("estimate")
def model_estimate(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    seq_len: Annotated[int | None, typer.Option(help="Sequence length (default: train.seq_len).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Batch size (default: train.batch_size).")] = None,
    vocab_size: Annotated[int | None, typer.Option(help="Vocabulary (default: the trained tokenizer's, else tokenizer.vocab_size).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Parameters, FLOPs per token, and memory (weights, training, KV cache) at fp32/bf16/int8/int4."""
    from slmforge.artifacts import output_dir
    from slmforge.model import estimate, format_estimate

    cfg = load_project(config, set_)
    if vocab_size is None:
        tok_json = output_dir(cfg, "tokenizer") / "tokenizer.json"
        if tok_json.exists():
            from slmforge.tokenizer import load_tokenizer

            vocab_size = len(load_tokenizer(tok_json.parent))
        else:
            vocab_size = cfg.tokenizer.vocab_size
    e = estimate(cfg.model, vocab_size, seq_len or cfg.train.seq_len, batch_size or cfg.train.batch_size)
    if as_json:
        print(json.dumps(e.to_json(), indent=2))
    else:
        print(f"preset {cfg.model.preset}")
        print(format_estimate(e))


@model_app.command("merge")
def model_merge(
    base: Annotated[str, typer.Option(help="The base model (folder, hub id or .gguf).")],
    adapter: Annotated[Path, typer.Option(help="A LoRA adapter folder made by `slmforge train sft`.")],
    out_dir: Annotated[Path, typer.Option("--out", help="Output folder for the merged model.")],
) -> None:
    """Merge a LoRA adapter into its base model and save a full model folder."""
    from slmforge.train import merge_adapter

    path = merge_adapter(base, adapter, out_dir, command=sys.argv)
    out.print(f"merged -> {path}")


@app.command()
def train(
    what: Annotated[str, typer.Argument(help="pretrain (from scratch), sft (fine-tune on chat data), encoder (classification/NER head).")] = "pretrain",
    config: ConfigOpt = None,
    set_: SetOpt = None,
    out_dir: Annotated[Path | None, typer.Option("--out", help="Output folder (default: the section's out).")] = None,
    nproc: Annotated[int, typer.Option(min=1, help="Data-parallel processes on this machine (torchrun; "
                                       "gloo on CPU, nccl on GPUs); the global batch stays the section's batch_size.")] = 1,
    launcher: Annotated[str, typer.Option(help="torchrun, or accelerate: `accelerate launch` with a config written "
                                          "from the section's distributed key (ddp, fsdp, deepspeed).")] = "torchrun",
    print_config: Annotated[bool, typer.Option("--print-config", help="With --launcher accelerate: write and "
                                               "print the accelerate (and DeepSpeed) config, then stop.")] = False,
) -> None:
    """Train: interrupted runs (Ctrl-C, kill -9) resume from their last checkpoint when re-run."""
    from slmforge import train as training
    from slmforge.cli.train_cmd import launch

    if what not in ("pretrain", "sft", "encoder"):
        raise typer.BadParameter(f"choose one of: pretrain, sft, encoder (got {what!r})")
    launch(what, nproc, launcher, print_config, config, set_, out_dir)
    cfg = load_project(config, set_)
    runners = {"pretrain": training.pretrain, "sft": training.finetune}
    if what == "encoder":
        from slmforge.train.encoder import train_encoder

        runners["encoder"] = train_encoder
    try:
        result = runners[what](cfg, out=out_dir, command=sys.argv, log=err.print)
    except KeyboardInterrupt as exc:
        err.print(f"stopped: {exc or 'interrupted'}. Run the same command again to resume.", style="yellow")
        raise typer.Exit(130) from None
    if os.environ.get("RANK", "0") != "0":  # one of several processes: the first one reports
        return
    m = result.metrics
    parts = [f"{k} {m[k]}" for k in ("steps", "train_loss", "val_loss", "val_ppl", "unigram_val_ppl", "accuracy", "f1", "tokens_per_s") if k in m]
    out.print(f"{what}: {', '.join(parts)}")
    out.print(f"  -> {result.path} ({result.kind})")


@eval_app.command("list")
def eval_list() -> None:
    """The built-in suites."""
    from slmforge.evaluate.suites import builtin_suites, load_suite

    for name in builtin_suites():
        spec, _ = load_suite(name)
        out.print(f"{name:<16} {spec.task:<16} {spec.description}")
    out.print(f"{'perplexity':<16} {'perplexity':<16} Held-out perplexity and bits per byte of the project's text.")


@eval_app.command("run")
def eval_run(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    model: Annotated[str | None, typer.Option("--model", "-m", help="Model folder (default: sft, else train output).")] = None,
    suite: Annotated[list[str] | None, typer.Option("--suite", "-s", help="Suite name or YAML (repeatable; default eval.suites).")] = None,
    gate: Annotated[list[str] | None, typer.Option("--gate", help="A gate such as 'exact_match >= 0.6' (repeatable; default eval.gates).")] = None,
    baseline: Annotated[str | None, typer.Option(help="Baseline for *_delta gates: parent or a model path.")] = None,
    limit: Annotated[int | None, typer.Option(help="Evaluate at most this many items per suite.")] = None,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Ignore cached results.")] = False,
    out_dir: Annotated[Path | None, typer.Option("--out", help="Output folder (default: eval.out).")] = None,
    allow_weak_sandbox: Annotated[bool, typer.Option(
        "--allow-weak-sandbox", help="Run generated code even where the kernel refuses the sandbox's namespaces "
        "(the results then say the sandbox was weak; default eval.allow_weak_sandbox).")] = False,
) -> None:
    """Run suites on a model; exit 3 if a quality gate fails."""
    from slmforge.artifacts import output_dir
    from slmforge.errors import GateFailed
    from slmforge.evaluate.run import run_eval

    cfg = load_project(config, set_)
    if allow_weak_sandbox:
        cfg.eval.allow_weak_sandbox = True
    try:
        result = run_eval(cfg, model, suite or None, gate, baseline, out_dir, not no_cache, limit, sys.argv, log=err.print)
    except GateFailed:
        out.print(f"results: {output_dir(cfg, 'eval') if out_dir is None else out_dir}")
        raise
    for name, r in result.results.items():
        cached = " (cached)" if r.cached else ""
        out.print(f"{name}: " + ", ".join(f"{k} {v:.4g}" for k, v in r.metrics.items()) + cached)
        if r.sandbox and r.sandbox["weak"]:
            err.print(f"warning: {name} ran generated code in a weak sandbox (no {', '.join(r.sandbox['missing'])})")
    for g in result.gates:
        out.print(g.describe())
    out.print(f"  -> {result.path / 'report.md'}")


@eval_app.command("lm-eval-task")
def eval_lm_eval_task(
    suite: Annotated[str, typer.Option("--suite", "-s", help="Suite name or YAML.")],
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for the task YAML and its JSONL.")],
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Write a suite as an lm-evaluation-harness task, to score the same items with lm-eval."""
    from slmforge.evaluate.suites import export_lm_eval_task, load_suite

    cfg = load_project(config, set_)
    spec, base = load_suite(suite)
    path = export_lm_eval_task(spec, base, cfg, out_dir)
    out.print(f"wrote {path}")
    # add_bos_token: slmforge scores with the BOS its tokenizers add; drop it for a model whose tokenizer adds none.
    chat = " --apply_chat_template" if spec.chat else ""
    tail = f"--include_path {out_dir} --tasks {path.stem}{chat}"
    print(f"  HF_DATASETS_OFFLINE=1 lm_eval --model hf --model_args pretrained=MODEL_DIR,add_bos_token=True {tail}")
    if spec.task == "generate":
        print("  # (--model hf caps generation at MODEL_DIR/generation_config.json's max_new_tokens, if it has one)")
    print("  # or against `slmforge serve MODEL_DIR --port 8000`:")
    print("  HF_DATASETS_OFFLINE=1 lm_eval --model local-completions --model_args model=NAME,"
          "base_url=http://127.0.0.1:8000/v1/completions,tokenizer_backend=huggingface,tokenizer=MODEL_DIR,"
          f"add_bos_token=True {tail}")


@eval_app.command("compare")
def eval_compare(
    model_a: Annotated[str, typer.Argument(help="Model A (the reference).")],
    model_b: Annotated[str, typer.Argument(help="Model B (the candidate).")],
    suite: Annotated[list[str], typer.Option("--suite", "-s", help="Suite name or YAML (repeatable).")],
    config: ConfigOpt = None,
    set_: SetOpt = None,
    limit: Annotated[int | None, typer.Option(help="Evaluate at most this many items per suite.")] = None,
    out_dir: Annotated[Path | None, typer.Option("--out", help="Output folder (default: <out_dir>/compare).")] = None,
) -> None:
    """Paired A/B comparison: B - A with a 95% bootstrap CI, a p-value and a verdict."""
    from slmforge.evaluate.run import compare_models

    cfg = load_project(config, set_)
    result = compare_models(cfg, model_a, model_b, suite, out_dir, limit=limit, command=sys.argv)
    for name, r in result.suites.items():
        out.print(f"{name} ({r['metric']}, n={r['n']}): A {r['mean_a']:.4f}, B {r['mean_b']:.4f}, "
                  f"B-A {r['diff']:+.4f} [{r['ci_low']:+.4f}, {r['ci_high']:+.4f}], p={r['p_value']:.3g}: {r['verdict']}")
    out.print(f"  -> {result.path / 'report.md'}")


@app.command()
def quantize(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    model: Annotated[str | None, typer.Option("--model", "-m", help="Model folder (default: quantize.model, else sft, else train).")] = None,
    sensitivity: Annotated[bool, typer.Option(help="Only measure per-layer sensitivity and propose a mixed-precision plan.")] = False,
    out_dir: Annotated[Path | None, typer.Option("--out", help="Output folder (default: quantize.out).")] = None,
) -> None:
    """Quantize a model (int8, int4, SmoothQuant, ternary); exit 3 if perplexity rises past the gate."""
    cfg = load_project(config, set_)
    if sensitivity:
        from slmforge.compress import sensitivity as measure

        rows = measure(cfg, model=model)
        for r in rows[:20]:
            out.print(f"  {r['module']:<48} ppl delta {r['ppl_delta_pct']:+.3f}%")
        return
    from slmforge.compress import quantize as run_quantize

    result = run_quantize(cfg, model=model, out=out_dir, command=sys.argv, log=err.print)
    m = result.metrics
    out.print(", ".join(f"{k} {m[k]}" for k in ("method", "compression_ratio", "ppl", "ppl_delta_pct", "passing") if k in m))
    out.print(f"  -> {result.path}")


@app.command()
def export(
    fmt: Annotated[str, typer.Argument(help="onnx, gguf, ollama or edge.")],
    config: ConfigOpt = None,
    set_: SetOpt = None,
    model: Annotated[str | None, typer.Option("--model", "-m", help="Model folder (default: export.model, else sft, else train).")] = None,
    out_dir: Annotated[Path | None, typer.Option("--out", help="Output folder (default: <out_dir>/export-<format>).")] = None,
    target: Annotated[str | None, typer.Option(help="edge: raspberry-pi-5, jetson-orin-nano, android-8gb or "
                                               "iphone-15.")] = None,
    context: Annotated[int, typer.Option(min=1, help="edge: the context length the memory must hold.")] = 2048,
) -> None:
    """Export a model: ONNX (+ ONNX Runtime optimisation), GGUF for llama.cpp, an Ollama Modelfile, or an
    edge bundle (GGUF type chosen for the device, memory checked, speed estimated, run script)."""
    from slmforge.export import FORMATS, run_export

    if fmt == "edge":
        sizing_cmd.export_edge(config, set_, model, out_dir, target, context)
        return
    if fmt not in FORMATS:
        raise typer.BadParameter(f"choose one of: {', '.join([*FORMATS, 'edge'])}")
    cfg = load_project(config, set_)
    result = run_export(cfg, fmt, model=model, out=out_dir, command=sys.argv, log=err.print)
    out.print(f"export {fmt}: {result.metrics['bytes'] / 1e6:.1f} MB -> {result.path}")
    parity = result.metrics.get("parity")
    if parity:  # what the exported file did against the source model (details in the manifest)
        tok = parity.get("tokenization")
        out.print(f"  parity ({parity.get('engine') or parity.get('provider')}): next token "
                  f"{parity['top1_agreement']:.1%}, greedy identical {parity['greedy_identical']}/{parity['prompts']}"
                  + (f", tokenization {tok['identical']}/{tok['texts']} texts" if tok else ""))
    if "import" in result.metrics:
        print(f"  {result.metrics['import']}")


@app.command()
def profile(
    onnx_dir: Annotated[Path, typer.Argument(help="An exported ONNX folder (slmforge export onnx).")],
    prompt: Annotated[str, typer.Option(help="Prompt to run.")] = "def fibonacci(n):",
    top: Annotated[int, typer.Option(help="Operators to list.")] = 10,
    levels: Annotated[bool, typer.Option(help="Also compare the graph optimisation levels.")] = False,
) -> None:
    """ONNX Runtime profile: the top operators by time and a Chrome trace file."""
    from slmforge.export.onnx import format_optimization_table, format_profile, optimization_table, profile_onnx

    rows, trace = profile_onnx(onnx_dir, prompt, top_n=top)
    print(format_profile(rows))
    print(f"trace: {trace}  (open in chrome://tracing or https://ui.perfetto.dev)")
    if levels:
        onnx_file = onnx_dir / "model.onnx" if onnx_dir.is_dir() else onnx_dir
        print(format_optimization_table(optimization_table(onnx_file)))


app.command("run")(pipeline_cmd.run)
app.command("quickstart")(pipeline_cmd.quickstart)
app.command("report")(pipeline_cmd.report)


def main() -> None:
    """Console-script entry point: user mistakes become one message and an exit code, not a traceback."""
    try:
        app()
    except SlmForgeError as exc:
        err.print(f"error: {exc}", style="bold red")
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
