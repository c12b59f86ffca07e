"""``slmforge doctor``, ``roi``, ``sweep`` and ``export edge``: what this machine can run, whether owning pays off,
which configuration is the smallest that is good enough, and what runs on a device."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from slmforge.cli._options import ConfigOpt, SetOpt, err, out


def doctor(
    model: Annotated[list[str] | None, typer.Option("--model", "-m", help="A model folder or .gguf file to check "
                                                    "too (repeatable).")] = None,
    preset: Annotated[str, typer.Option(help="Comma-separated presets to check.")] = "nano,micro,small,base",
    vocab: Annotated[int, typer.Option(min=1, help="Vocabulary size of the presets.")] = 8192,
    context: Annotated[int, typer.Option(min=1, help="Context length the inference memory includes (KV cache).")
                       ] = 2048,
    measure: Annotated[bool, typer.Option(help="Measure memory bandwidth, matmul GFLOP/s and one real decode "
                                          "(a few seconds).")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    config: ConfigOpt = None, set_: SetOpt = None,
) -> None:
    """This machine (CPU, instruction sets, memory, GPUs, runtimes), what fits it for inference and training,
    and the decode speed to expect, checked against one measured run."""
    from slmforge.config import load_config
    from slmforge.sizing import fit, fit_table, measure as measure_hw, measured_check, model_shape, preset_shape, probe

    cfg = load_config(config, set_ or [])
    hw = probe(cfg.base_dir)
    check = None
    if measure:
        err.print("measuring memory bandwidth, matmul throughput and a decode ...", style="dim")
        hw = measure_hw(hw)
        check = measured_check(hw)
    shapes = [preset_shape(p.strip(), vocab) for p in preset.split(",") if p.strip()]
    shapes += [model_shape(cfg.resolve(m)) for m in model or []]
    fits = [fit(s, hw, context) for s in shapes]
    if as_json:
        from slmforge.sizing import as_dicts

        out.print(json.dumps({"hardware": hw.as_dict(), "fits": as_dicts(fits), "decode_check": check}, indent=1))
        return
    gb = 1024**3
    gpus = ", ".join(f"{g.name} ({g.memory_bytes / gb:.0f} GB, {g.kind})" for g in hw.gpus) or "none"
    lines = [f"CPU        {hw.cpu}, {hw.cores} cores, {' '.join(hw.isa) or 'no SIMD flags read'}"
             f" (torch kernels: {hw.torch_cpu_capability}, BLAS: {hw.blas})",
             f"memory     {hw.ram_bytes / gb:.1f} GB, {hw.ram_available_bytes / gb:.1f} GB available; disk free "
             + (f"{hw.disk_free_bytes / gb:.0f} GB" if hw.disk_free_bytes is not None else "unknown"),
             f"GPUs       {gpus}",
             f"runtimes   ONNX Runtime: {', '.join(hw.onnxruntime_providers) or 'not installed'}; llama.cpp: "
             f"{' '.join(hw.llamacpp_features) or 'not installed'}"]
    if hw.bandwidth_gbs:
        lines.append(f"measured   memory bandwidth {hw.bandwidth_gbs:.1f} GB/s (one thread), fp32 matmul "
                     f"{hw.matmul_gflops:.0f} GFLOP/s")
    if check:
        lines.append(f"decode     {check['preset']} ({check['params'] / 1e6:.0f}M, fp32, torch): measured "
                     f"{check['measured_tokens_per_s']:.0f} tok/s vs the bandwidth bound "
                     f"{check['predicted_tokens_per_s']:.0f} ({check['share_of_bound']:.0%} of it: the bound is what "
                     "the memory allows; an engine's per-token overhead takes the rest)")
    out.print("\n".join(lines) + f"\n\nfits at context {context} (memory needed, where; QLoRA needs a CUDA GPU for "
              "bitsandbytes):\n" + fit_table(fits))


def roi(
    bench: Annotated[Path | None, typer.Option(help="The JSON of `slmforge bench serve --json`: its measured "
                                               "tokens/s is one machine's capacity.")] = None,
    years: Annotated[int | None, typer.Option(min=1, max=10, help="Horizon (default roi.years).")] = None,
    plot: Annotated[Path | None, typer.Option(help="Write the cumulative-cost chart here (PNG).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON (every month too).")] = False,
    config: ConfigOpt = None, set_: SetOpt = None,
) -> None:
    """Owned model vs API over 1/3/5 years: break-even month and volume, and how they move with each
    assumption. Prices and volumes are the roi and serve.cost sections (--set roi.monthly_output_tokens=1e8)."""
    from slmforge.config import load_config
    from slmforge.errors import ConfigError
    from slmforge.sizing import RoiInputs, roi_plot, roi_report, roi_table

    cfg = load_config(config, set_ or [])
    r, cost = cfg.roi, cfg.serve.cost
    tps = r.tokens_per_s
    if bench is not None:
        try:
            tps = float(json.loads(bench.read_text())["tokens_per_s"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"--bench {bench}: not the JSON of `slmforge bench serve --json` with tokens_per_s "
                              f"({type(e).__name__}: {e}).") from None
    if tps is None:
        raise ConfigError("roi needs one machine's throughput: --bench FILE (from `slmforge bench serve --json`) or "
                          "roi.tokens_per_s.")
    inputs = RoiInputs(cost.api_usd_per_1m_input_tokens, cost.api_usd_per_1m_output_tokens, r.monthly_input_tokens,
                       r.monthly_output_tokens, r.growth_per_month, tps, r.utilization, r.prefill_speedup,
                       r.hardware_usd, r.hardware_life_months, r.power_watts, r.usd_per_kwh, r.ops_usd_per_month)
    result = roi_report(inputs, years or r.years)
    if plot is not None:
        roi_plot(result, plot)
        err.print(f"wrote {plot}", style="dim")
    if as_json:
        out.print(json.dumps(result, indent=1))
        return
    out.print(f"vs {cost.api_name} at ${cost.api_usd_per_1m_input_tokens:g}/${cost.api_usd_per_1m_output_tokens:g} "
              f"per 1M input/output tokens; one machine serves {tps:g} output tokens/s at {r.utilization:.0%} "
              f"utilisation\n\n" + roi_table(result))


def export_edge(config: Path | None, set_: list[str] | None, model: str | None, out_dir: Path | None,
                 target: str | None, context: int) -> None:
    from slmforge.errors import ConfigError
    from slmforge.generate import default_model_dir
    from slmforge.sizing import model_shape
    from slmforge.sizing.edge import DEVICES, plan, write_bundle

    if target is None:
        raise ConfigError(f"export edge needs --target: one of {', '.join(DEVICES)}.")
    from slmforge.config import load_config

    cfg = load_config(config, set_ or [])
    folder = Path(model) if model else (cfg.resolve(cfg.export.model) if cfg.export.model else default_model_dir(cfg))
    p = plan(model_shape(folder), target, context)
    gb = 1024**3
    out.print(f"{p.device['name']}: {p.device['usable_gb']:g} GB for the app, {p.device['bandwidth_gbs']:g} GB/s")
    for t, need in p.memory_bytes.items():
        out.print(f"  {t:5} {need / gb:6.2f} GB at context {context}  {'fits' if p.fits[t] else 'does not fit'}")
    out.print(f"choice: {p.gguf_type or 'none'} ({p.reason})")
    record = write_bundle(folder, out_dir or cfg.stage_dir(f"export-edge-{target}", None), p)
    out.print(f"estimated decode: {p.decode_tokens_per_s:.0f} tokens/s; bundle {record['gguf']} "
              f"({record['gguf_bytes'] / 1e6:.1f} MB) + run.sh + edge.json")


def _number(value):
    """YAML 1.1 reads 3e-3 (no dot) as a string; a sweep value that reads as a number is one."""
    if isinstance(value, str):
        try:
            return int(value) if value.lstrip("-").isdigit() else float(value)
        except ValueError:
            return value
    return value


def sweep(
    grid: Annotated[list[str], typer.Option("--grid", "-g", help="KEY=[v1, v2, ...]: a config key and its values "
                                            "(repeatable; every combination runs).")],
    metric: Annotated[str, typer.Option(help="<stage>.<key> of a manifest's metrics, e.g. train.val_ppl, "
                                        "eval.arithmetic.exact_match.")] = "train.val_ppl",
    goal: Annotated[str, typer.Option(help="min or max.")] = "min",
    gate: Annotated[str | None, typer.Option(help="A quality gate, e.g. 'train.val_ppl<=200': the smallest "
                                             "configuration that meets it is reported.")] = None,
    size: Annotated[str | None, typer.Option(help="The metric of a point's size (default: its model's "
                                             "parameters; e.g. quantize.weights_bytes).")] = None,
    jobs: Annotated[int, typer.Option(min=1, help="Points run at once (processes); shared stages are made "
                                      "once.")] = 1,
    random_points: Annotated[int | None, typer.Option("--random", min=1, help="Run this many random points "
                                                      "of the grid instead of all.")] = None,
    out_dir: Annotated[Path | None, typer.Option("--out", help="Sweep folder (default <project.out_dir>/sweep).")
                       ] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Grid or random search over config keys, each point a pipeline run that reuses unchanged stages;
    a table, sweep.json and sweep.png (metric vs size); resumable."""
    import yaml

    from slmforge.sweep import plot, run_sweep, table

    space = {}
    for item in grid:
        key, sep, values = item.partition("=")
        parsed = yaml.safe_load(values) if sep else None
        if not isinstance(parsed, list):
            raise typer.BadParameter(f"{item!r}: give KEY=[v1, v2, ...].", param_hint="--grid")
        space[key.strip()] = [_number(v) for v in parsed]
    from slmforge.config import load_config

    cfg = load_config(config, set_ or [])
    result = run_sweep(cfg, space, metric, goal, gate, "random" if random_points else "grid", random_points,
                       out=out_dir, command=sys.argv, size=size, log=lambda m: err.print(m, style="dim"), jobs=jobs)
    root = out_dir or cfg.stage_dir("sweep", None)
    plot(result, Path(root) / "sweep.png")
    out.print(table(result))
    best, small = result["best"], result["smallest_passing"]
    out.print(f"best {metric}: {best['overrides'] if best else 'none'}" + (
        f"; smallest meeting {gate}: {small['overrides'] if small else 'none'}" if gate else ""))
    err.print(f"wrote {Path(root) / 'sweep.json'} and sweep.png", style="dim")
