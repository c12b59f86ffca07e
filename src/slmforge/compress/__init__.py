"""Compression: post-training quantization (int8, int4, SmoothQuant W8A8), a ternary
quantization-aware fine-tune, per-layer sensitivity with mixed-precision plans, and
loading models larger than memory with offload.

    from slmforge.compress import quantize, sensitivity, load_quantized
    rows = sensitivity(cfg)                      # runs/quantize-sensitivity: sensitivity.json + .png
    cfg.quantize.plan = json.load(open("runs/quantize-sensitivity/sensitivity.json"))["plan"]
    res = quantize(cfg)                          # runs/quantize-<method>, gated on perplexity
    model, tok = load_quantized(res.path)

Every quantized layer is a small ``nn.Module`` of ours (``slmforge.model.quant_layers``), stored as
safetensors (int8 / packed int4 / packed ternary tensors plus scales), not
``torch.ao.quantization``: its ``quantize_dynamic`` is deprecated in favour of
torchao, CPU-only, and its packed parameters cannot be written without pickle.
Hand-written layers also run unchanged on CUDA, and one W8A8 layer serves both
int8_dynamic and SmoothQuant. torchao would bring faster kernels but a new
dependency; the formats here are simple enough to port to it later. The token
embedding and the output head follow ``quantize.embeddings`` (one quantized table
when they are tied).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slmforge.artifacts import ArtifactWriter, Plan, default_model, model_ref, output_dir, parent_ref
from slmforge.compress._methods import METHODS, NONE
from slmforge.compress._offload import load_offloaded
from slmforge.config import ProjectConfig
from slmforge.errors import ArtifactError, ConfigError
from slmforge.model.quantized import load_quantized, save_quantized

__all__ = [
    "METHODS",
    "QuantizeResult",
    "quantize_plan",
    "quantize",
    "quantize_model",
    "sensitivity",
    "propose_mixed_precision",
    "save_quantized",
    "load_quantized",
    "load_offloaded",
]

SENSITIVITY_FORMAT = "slmforge.sensitivity/1"


@dataclass
class QuantizeResult:
    path: Path
    metrics: dict[str, Any]


# --------------------------------------------------------------------------- inputs


def _model_spec(cfg: ProjectConfig, model: str | Path | None) -> str:
    """The model to quantize: explicit, ``quantize.model``, else the sft output, else train's."""
    spec = model if model is not None else cfg.quantize.model
    if spec is None:
        return str(default_model(cfg, "quantize", "set quantize.model"))
    resolved = cfg.resolve(spec)
    return str(resolved) if resolved.exists() else str(spec)


def _uses(cfg: ProjectConfig, method: str) -> bool:
    return cfg.quantize.method == method or method in cfg.quantize.plan.values()


def quantize_plan(cfg: ProjectConfig, model: str | Path | None = None) -> Plan:
    """What ``quantize`` would write: what decides whether an existing quantized model is current."""
    spec = _model_spec(cfg, model)
    config: dict[str, Any] = {
        "quantize": cfg.quantize.model_dump(mode="json"),
        "model": spec,
        "seed": cfg.project.seed,
        "heldout_split": cfg.report.heldout_split,
        "eval_seq_len": min(cfg.train.seq_len, 512),
    }
    for name, method in METHODS.items():
        if method.plan is not None and _uses(cfg, name):
            config.update(method.plan(cfg))
    return Plan("quantized-model", config, [model_ref(spec), parent_ref(output_dir(cfg, "data"), "dataset")])


def _load_float_model(spec: str):
    """The parent as a plain float32 causal LM (a LoRA adapter is merged into its base)."""
    from slmforge.generate import TorchGenerator
    from slmforge.model.quantized import is_quantized_folder

    if is_quantized_folder(spec):
        raise ArtifactError(f"{spec} is already quantized; quantize the model it was made from instead.")
    gen = TorchGenerator.from_pretrained(spec, device="cpu")
    model = gen.model
    if hasattr(model, "merge_and_unload"):  # peft adapter over its base
        model = model.merge_and_unload()
    return model, gen.tokenizer


def _heldout(cfg: ProjectConfig) -> Iterable[str]:
    """The held-out split's texts, read from disk on each pass (perplexity reads only what its tokens need).

    Raises:
        ArtifactError: The split is missing or has no text.
    """
    from slmforge.tokenizer.packing import jsonl_texts

    split = cfg.report.heldout_split
    file = output_dir(cfg, "data") / "text" / f"{split}.jsonl"
    texts = jsonl_texts(file)
    if not file.is_file() or next(iter(texts), None) is None:
        raise ArtifactError(f"{file} has no text to measure perplexity on; run `slmforge data` with text in data.formats.")
    return texts


def _fp32_bytes(model) -> int:
    """Bytes of the model's parameters at 4 bytes each, tied tensors counted once."""
    return _tensor_bytes(model.parameters(), fp32=True)


def _tensor_bytes(tensors, fp32: bool = False) -> int:
    """Bytes of ``tensors``, each stored tensor once (a tied embedding and head share theirs);
    ``fp32``: at 4 bytes an element, whatever their dtype."""
    unique = {(t.data_ptr(), t.numel()): t for t in tensors}
    return sum(t.numel() * (4 if fp32 else t.element_size()) for t in unique.values())


# --------------------------------------------------------------------------- quantize


def quantize_model(model, method: str = "int8_weight_only", group_size: int = 64,
                   plan: dict[str, str] | None = None, embeddings: str = "auto") -> dict[str, dict[str, Any]]:
    """Quantize a model's linears, token embedding and output head in place with a one-shot method (no data needed).

    Args:
        model: A causal LM (float).
        method: ``int8_weight_only``, ``int8_dynamic`` or ``int4_weight_only``.
        group_size: Weights per scale for int4.
        plan: Module name or prefix -> method or ``none`` (see ``quantize``).
        embeddings: As ``quantize.embeddings``: ``auto`` (the method's weight-only format),
            ``int8_weight_only``, ``int4_weight_only`` or ``none`` (keep them float).

    Returns:
        Module name -> the layer's description, as ``save_quantized`` wants it.

    Raises:
        ConfigError: A method that needs data (smoothquant, ternary: use ``quantize``), or a bad plan.
    """
    from slmforge.compress._methods import assign_methods, convert, convert_embeddings, embedding_format

    methods = assign_methods(model, method, plan or {}, group_size)
    table = embedding_format(model, method, embeddings, group_size)
    needy = sorted({m for m in methods.values() if m != NONE and not METHODS[m].one_shot})
    if needy:
        raise ConfigError(f"{', '.join(needy)} needs calibration or training data; use slmforge.compress.quantize(cfg).")
    layers = convert(model, methods, group_size)
    return {**layers, **convert_embeddings(model, table, group_size)} if table else layers


def quantize(
    cfg: ProjectConfig,
    model: str | Path | None = None,
    out: str | Path | None = None,
    command: list[str] | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> QuantizeResult:
    """Quantize a model with ``quantize.method`` (and ``quantize.plan``), measure it, gate it, save it.

    The output folder holds the quantized tensors (``quantized.safetensors``), ``quantize.json``
    (what ``load_quantized`` needs), the config and tokenizer; its manifest's metrics hold the
    weight size, the compression ratio against the parent's fp32 weights, the held-out perplexity
    of parent and quantized model, ``ppl_delta_pct`` and ``passing``.

    Args:
        cfg: The project; ``cfg.quantize`` says how.
        model: The model to quantize (default ``quantize.model``, else the sft output, else train's).
        out: Output folder (default ``quantize.out``, else ``<out_dir>/quantize-<method>``).
        command: Recorded in the manifest.
        progress: Show the fine-tuning progress bar (ternary).
        log: Receives one line per phase.

    Returns:
        The folder and its metrics.

    Raises:
        ArtifactError: No model, or no data artifact with held-out text.
        ConfigError: A bad plan or group size.
        GateFailed: The perplexity rose by more than ``quantize.max_ppl_increase_pct``; the
            folder is written anyway, with ``passing: false``.
    """
    import time

    from slmforge.compress._methods import assign_methods, embedding_format
    from slmforge.evaluate import perplexity
    from slmforge.evaluate.gates import check_gates, enforce
    from slmforge.model import pick_device

    qcfg = cfg.quantize
    t0 = time.monotonic()
    planned = quantize_plan(cfg, model)
    spec = planned.config["model"]
    out_dir = Path(out) if out else output_dir(cfg, "quantize")
    heldout = _heldout(cfg)
    net, tok = _load_float_model(spec)
    methods = assign_methods(net, qcfg.method, qcfg.plan, qcfg.group_size)
    table = embedding_format(net, qcfg.method, qcfg.embeddings, qcfg.group_size)
    net.to(pick_device(cfg.train.device)).eval()
    seq_len = planned.config["eval_seq_len"]
    parent_bytes = _fp32_bytes(net)
    if log:
        log(f"quantize: held-out perplexity of {spec}")
    base = perplexity(net, tok, heldout, seq_len=seq_len)
    converted = _convert(cfg, planned, net, tok, (methods, table), out_dir, progress, log)
    if log:
        log(f"quantize: held-out perplexity after {qcfg.method} ({len(converted.layers)} of {len(methods)} layers)")
    quant = perplexity(net, tok, heldout, seq_len=seq_len)
    gates = check_gates([f"ppl_delta_pct <= {qcfg.max_ppl_increase_pct}"], {"ppl": quant.ppl}, baseline={"ppl": base.ppl})
    net.to("cpu")
    with planned.writer(out_dir, command) as w:
        weights_bytes = _write_quantized(cfg, net, tok, spec, converted, w.path)
        metrics = _quantize_metrics(cfg, methods, converted, parent_bytes, weights_bytes, (base, quant), gates)
        metrics["seconds"] = round(time.monotonic() - t0, 2)
        w.metrics.update(metrics)
    if log:
        log(f"quantize: {weights_bytes / 1e6:.2f} MB ({metrics['compression_ratio']:.2f}x smaller than fp32), "
            f"perplexity {base.ppl:.3f} -> {quant.ppl:.3f} ({metrics['ppl_delta_pct']:+.2f}%)")
    enforce(gates, f"the quantized model {out_dir}")
    return QuantizeResult(out_dir.resolve(), metrics)


@dataclass
class _Converted:
    """A model after ``_convert``: its quantized layers and what the methods' model-wide steps left."""

    layers: dict[str, dict[str, Any]]  # module name -> layer description, for save_quantized
    embeddings: str  # the embedding's (and head's) layer format, or "none"
    extra: dict[str, Any]  # metrics of the model-wide steps (SmoothQuant calibration, ternary fine-tune)
    loop_log: list[dict[str, Any]]  # the ternary fine-tune's losses, if it ran
    float_layer_bytes: int  # the converted linears' weights at fp32
    stored_layer_bytes: int  # the same layers as stored


def _convert(cfg: ProjectConfig, planned: Plan, net, tok, choice: tuple[dict[str, str], str | None], out_dir: Path,
             progress: bool, log: Callable[[str], None] | None) -> _Converted:
    """Run the methods' model-wide steps (in METHODS order), then swap every chosen linear for its
    quantized layer, and the embedding and head for theirs (``choice``: the methods per linear and
    the embedding's format or None), in place."""
    from slmforge.compress._methods import Inputs, convert, convert_embeddings
    from slmforge.train import work_dir_for

    methods, table = choice
    qcfg = cfg.quantize
    inputs = Inputs(cfg, tok, output_dir(cfg, "data"), work_dir_for(out_dir),
                    {"config": planned.config, "parents": [p["fingerprint"] for p in planned.parents]}, progress, log)
    extra: dict[str, Any] = {}
    for name, method in METHODS.items():
        chosen = [n for n, m in methods.items() if m == name]
        if chosen and method.prepare is not None:
            extra.update(method.prepare(net, chosen, inputs))
    chosen = [net.get_submodule(n).weight for n, m in methods.items() if m != NONE]
    if table:
        chosen += [net.get_input_embeddings().weight, net.get_output_embeddings().weight]
    float_layer_bytes = _tensor_bytes(chosen, fp32=True)
    layers = convert(net, methods, qcfg.group_size)
    if table:
        layers.update(convert_embeddings(net, table, qcfg.group_size))
    stored = [t for n in layers for t in net.get_submodule(n).state_dict().values()]
    return _Converted(layers, table or NONE, extra, inputs.loop_log, float_layer_bytes, _tensor_bytes(stored))


def _write_quantized(cfg: ProjectConfig, net, tok, spec: str, converted: _Converted, folder: Path) -> int:
    """The quantized model's files (and the ternary fine-tune's loss log and plot) into ``folder``;
    returns the size of the quantized weights file."""
    import json

    from slmforge.train import plot_losses

    qcfg = cfg.quantize
    weights = save_quantized(net, tok, folder, converted.layers,
                             extra={"method": qcfg.method, "group_size": qcfg.group_size, "parent": spec})
    if converted.loop_log:
        (folder / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in converted.loop_log))
        plot_losses(converted.loop_log, folder / "loss.png", f"ternary QAT ({qcfg.ternary_steps} steps)")
    return weights.stat().st_size


def _quantize_metrics(cfg: ProjectConfig, methods: dict[str, str], converted: _Converted, parent_bytes: int,
                      weights_bytes: int, ppls: tuple[Any, Any], gates: list[Any]) -> dict[str, Any]:
    """The quantized model's manifest metrics (sizes, perplexity before and after, the gate), in
    the order they are written; ``seconds`` is added by the caller."""
    base, quant = ppls
    counts: dict[str, int] = {}
    for m in methods.values():
        counts[m] = counts.get(m, 0) + 1
    return {
        "method": cfg.quantize.method,
        "layers": counts,
        "weights_bytes": weights_bytes,
        "parent_fp32_bytes": parent_bytes,
        "compression_ratio": round(parent_bytes / weights_bytes, 4),
        "embeddings": converted.embeddings,
        "quantized_layers_ratio": round(converted.float_layer_bytes / max(converted.stored_layer_bytes, 1), 4),
        "heldout_split": cfg.report.heldout_split,
        "heldout_tokens": quant.tokens,
        "ppl_parent": round(base.ppl, 4),
        "ppl": round(quant.ppl, 4),
        "ppl_delta_pct": round(gates[0].value, 4),
        "bits_per_byte_parent": round(base.bits_per_byte, 5),
        "bits_per_byte": round(quant.bits_per_byte, 5),
        "gates": [g.describe() for g in gates],
        "passing": all(g.passed for g in gates),
        **converted.extra,
    }


# --------------------------------------------------------------------------- sensitivity


def propose_mixed_precision(rows: list[dict[str, Any]], max_delta_pct: float) -> dict[str, str]:
    """A plan that keeps the most sensitive layers in float until the predicted total stays in budget.

    The prediction adds the layers' individual perplexity increases (decreases count as zero):
    a first-order estimate, since errors of different layers interact. Check it with ``quantize``.

    Args:
        rows: What ``sensitivity`` returns (``module``, ``method``, ``ppl_delta_pct`` each).
        max_delta_pct: The budget, normally ``quantize.max_ppl_increase_pct``.

    Returns:
        Module name -> method or ``none``, for every row; usable as ``quantize.plan``.
    """
    plan = {r["module"]: r["method"] for r in rows}
    for r in sorted(rows, key=lambda r: r["ppl_delta_pct"], reverse=True):
        # keeping a layer whose quantization did not hurt cannot lower the prediction
        if _predicted_delta(rows, plan) <= max_delta_pct + 1e-9 or r["ppl_delta_pct"] <= 0:
            break
        plan[r["module"]] = NONE
    return plan


def _layer_deltas(net, names: list[str], method: str, group_size: int, base: float, progress: bool,
                  log: Callable[[str], None] | None, measure: Callable[[], float]) -> list[dict[str, Any]]:
    """Quantize one linear of ``net`` at a time (then put it back) and ``measure`` the model's perplexity
    each time: one row per layer with its perplexity and its change against ``base`` in percent."""
    from slmforge._progress import progress_bar
    from slmforge.model.quant_layers import LAYER_FORMATS

    cls = LAYER_FORMATS[METHODS[method].layer]
    rows = []
    with progress_bar(progress) as bar:
        task = bar.add_task(f"sensitivity ({method})", total=len(names), info="")
        for name in names:
            original = net.get_submodule(name)
            net.set_submodule(name, cls.from_linear(original, group_size=group_size))
            ppl = measure()
            net.set_submodule(name, original)
            delta = 100.0 * (ppl - base) / base
            rows.append({"module": name, "method": method, "params": original.weight.numel(),
                         "ppl": round(ppl, 4), "ppl_delta_pct": round(delta, 4)})
            bar.update(task, advance=1, info=f"{name} {delta:+.3f}%")
            if log:
                log(f"sensitivity: {name} {delta:+.3f}%")
    return rows


def _predicted_delta(rows: list[dict[str, Any]], plan: dict[str, str]) -> float:
    return sum(max(r["ppl_delta_pct"], 0.0) for r in rows if plan.get(r["module"], NONE) != NONE)


def sensitivity(
    cfg: ProjectConfig,
    model: str | Path | None = None,
    method: str = "int4_weight_only",
    out: str | Path | None = None,
    command: list[str] | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    max_tokens: int = 50_000,
) -> list[dict[str, Any]]:
    """Quantize one linear at a time and measure the held-out perplexity change of each.

    Writes ``sensitivity.json`` (the rows, the proposed plan and its predicted delta) and
    ``sensitivity.png`` (a bar per layer) to ``out`` (default ``<out_dir>/quantize-sensitivity``).

    Args:
        cfg: The project (model choice, held-out split, group size, gate budget).
        model: As for ``quantize``.
        method: A one-shot method: ``int8_weight_only``, ``int8_dynamic`` or ``int4_weight_only``.
        max_tokens: Held-out tokens per measurement (one measurement per layer).

    Returns:
        One row per quantizable linear, most sensitive first: ``module``, ``method``, ``params``,
        ``ppl``, ``ppl_delta_pct`` and ``plan`` (what ``propose_mixed_precision`` chose for it).

    Raises:
        ConfigError: A method that needs data or training (smoothquant, ternary) or an unknown one.
        ArtifactError: No model or no held-out text.
    """
    import json

    from slmforge.compress._methods import assign_methods, quantizable_linears
    from slmforge.compress._plot import plot_sensitivity
    from slmforge.evaluate import perplexity
    from slmforge.model import pick_device

    if method not in METHODS or not METHODS[method].one_shot:
        one_shot = [m for m, spec in METHODS.items() if spec.one_shot]
        raise ConfigError(f"Sensitivity needs a one-shot method ({', '.join(one_shot)}); got {method!r}.")
    qcfg = cfg.quantize
    spec = _model_spec(cfg, model)
    parents = [model_ref(spec), parent_ref(output_dir(cfg, "data"), "dataset")]
    out_dir = Path(out) if out else cfg.stage_dir("quantize-sensitivity")
    heldout = _heldout(cfg)
    net, tok = _load_float_model(spec)
    names = quantizable_linears(net)
    assign_methods(net, method, {}, qcfg.group_size)  # checks the group size against every layer
    net.to(pick_device(cfg.train.device)).eval()
    seq_len = min(cfg.train.seq_len, 512)
    base = perplexity(net, tok, heldout, seq_len=seq_len, max_tokens=max_tokens).ppl
    rows = _layer_deltas(net, names, method, qcfg.group_size, base, progress, log,
                         measure=lambda: perplexity(net, tok, heldout, seq_len=seq_len, max_tokens=max_tokens).ppl)
    rows.sort(key=lambda r: r["ppl_delta_pct"], reverse=True)
    plan = propose_mixed_precision(rows, qcfg.max_ppl_increase_pct)
    for r in rows:
        r["plan"] = plan[r["module"]]
    predicted = _predicted_delta(rows, plan)
    config = {"method": method, "group_size": qcfg.group_size, "model": spec, "heldout_split": cfg.report.heldout_split,
              "budget_pct": qcfg.max_ppl_increase_pct, "max_tokens": max_tokens, "eval_seq_len": seq_len}
    report = {"format": SENSITIVITY_FORMAT, **config, "ppl_parent": round(base, 4),
              "predicted_delta_pct": round(predicted, 4), "plan": plan, "layers": rows}
    with ArtifactWriter(out_dir, kind="quantize-sensitivity", config=config, parents=parents, command=command) as w:
        (w.path / "sensitivity.json").write_text(json.dumps(report, indent=1) + "\n")
        plot_sensitivity(rows, w.path / "sensitivity.png", method, qcfg.max_ppl_increase_pct, predicted)
        w.metrics.update({"layers": len(rows), "kept_float": sum(r["plan"] == NONE for r in rows),
                          "ppl_parent": round(base, 4), "predicted_delta_pct": round(predicted, 4),
                          "most_sensitive": rows[0]["module"] if rows else None})
    return rows
