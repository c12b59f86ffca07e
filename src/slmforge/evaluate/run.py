"""`slmforge eval run|compare`: suites against a model, gates, A/B comparison,
results into the model's manifest, and a report (Markdown, HTML, PNG)."""

from __future__ import annotations

import html
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slmforge.artifacts import (
    MANIFEST,
    ArtifactWriter,
    Plan,
    default_model,
    is_endpoint,
    output_dir,
    parent_ref,
    read_manifest,
)
from slmforge.config import ProjectConfig
from slmforge.errors import ArtifactError, EvalError
from slmforge.evaluate.gates import GateResult, check_gates, enforce
from slmforge.evaluate.runner import SuiteResult, run_suite
from slmforge.evaluate.suites import load_suite
from slmforge.generate import as_engine

__all__ = ["EvalResult", "CompareResult", "run_eval", "eval_plan", "compare_models", "PERPLEXITY"]

PERPLEXITY = "perplexity"  # a pseudo-suite: held-out perplexity of the project's text


@dataclass
class EvalResult:
    path: Path
    model: str
    results: dict[str, SuiteResult]
    metrics: dict[str, float]  # "suite.metric" -> value
    gates: list[GateResult] = field(default_factory=list)
    baseline: dict[str, float] | None = None

    @property
    def passing(self) -> bool:
        return all(g.passed for g in self.gates)


def _default_model(cfg: ProjectConfig) -> Path:
    return default_model(cfg, "evaluate", "pass --model with a model folder, a .gguf file, a hub id or an endpoint")


def _is_default_model(cfg: ProjectConfig, model: str | Path | None) -> bool:
    """Whether ``model`` is the project's own (``None``: the default), so that the evaluation can be
    recorded as the one ``slmforge run`` checks. False outside a project that has a model."""
    if model is None:
        return True
    if is_endpoint(model):
        return False
    try:
        return Path(str(model)).resolve() == _default_model(cfg).resolve()
    except ArtifactError:
        return False


def _perplexity_result(generator, cfg: ProjectConfig, model: str) -> SuiteResult:
    from slmforge.evaluate import perplexity
    from slmforge.tokenizer.packing import jsonl_texts

    split = cfg.report.heldout_split
    texts = jsonl_texts(output_dir(cfg, "data") / "text" / f"{split}.jsonl")  # read as far as perplexity needs
    if next(iter(texts), None) is None:
        raise EvalError(f"The perplexity suite needs the data artifact's text/{split}.jsonl; run `slmforge data`.")
    if as_engine(generator).capabilities.perplexity:
        lm, tokenizer = generator.model, generator.tokenizer
    elif str(model).endswith(".gguf"):  # llama.cpp here scores no tokens; transformers reads the file dequantised
        from slmforge.model import load_causal_lm

        lm, tokenizer = load_causal_lm(model)
    else:
        raise EvalError(
            f"The perplexity suite scores every token with the in-process PyTorch engine; {model} runs on "
            "another engine. Measure the PyTorch model it was exported from, or use generation suites."
        )
    p = perplexity(lm, tokenizer, texts, seq_len=min(cfg.train.seq_len, 512))
    metrics = {"ppl": round(p.ppl, 4), "bits_per_byte": round(p.bits_per_byte, 5)}
    return SuiteResult(PERPLEXITY, "perplexity", model, metrics, [], "ppl", 0.0, {"tokens": p.tokens})


def evaluate_suites(
    generator, model: str | Path, suites: list[str], cfg: ProjectConfig | None, use_cache: bool = True,
    limit: int | None = None, progress: bool = True,
) -> dict[str, SuiteResult]:
    """Run suites (names or YAML paths; ``perplexity`` for held-out perplexity) against one generator."""
    # A remote endpoint can change behind its URL, so its answers are never cached.
    remote = is_endpoint(model)
    cache = (cfg.resolve(cfg.project.out_dir) / "eval-cache") if (cfg is not None and use_cache and not remote) else None
    out = {}
    for name in suites:
        if name == PERPLEXITY:
            if cfg is None:
                raise EvalError("The perplexity suite measures the project's held-out text; run inside a project.")
            out[name] = _perplexity_result(generator, cfg, str(model))
            continue
        spec, base = load_suite(name)
        if limit is not None:
            spec.limit = min(limit, spec.limit or limit)
        out[spec.name] = run_suite(generator, spec, base, model, cfg, cache, cfg.eval.batch_size if cfg else 8,
                                   progress, allow_weak_sandbox=cfg.eval.allow_weak_sandbox if cfg else False)
    return out


def _flat(results: dict[str, SuiteResult]) -> dict[str, float]:
    return {f"{s}.{k}": v for s, r in results.items() for k, v in r.metrics.items()}


def _sandbox_records(results: dict[str, SuiteResult]) -> dict[str, dict[str, Any]]:
    """Per code suite: the protections its programs ran under and whether the box was weak."""
    return {name: r.sandbox for name, r in results.items() if r.sandbox is not None}


def _baseline_model(cfg: ProjectConfig, model: Path, spec: str | None) -> str | None:
    """``parent``: the model this one was made from (by its manifest); else a path; else none."""
    if not spec:
        return None
    if spec != "parent":
        return str(cfg.resolve(spec))
    try:
        parents = read_manifest(model).parents
    except ArtifactError:
        return None
    for p in parents:
        if p.get("kind") in ("model", "external-model", "hub-model"):
            return p["path"]
    return None


def eval_plan(cfg: ProjectConfig) -> Plan:
    """What the evaluation ``slmforge run`` would write: what decides whether an existing one is current.

    Raises:
        ArtifactError: The project has no model yet.
    """
    model = _default_model(cfg)
    config = {"eval": cfg.eval.model_dump(mode="json"), "suites": cfg.eval.suites, "gates": cfg.eval.gates,
              "baseline": _baseline_model(cfg, model, cfg.eval.regression_vs)}
    return Plan("evaluation", config, [parent_ref(model)])


def run_eval(
    cfg: ProjectConfig,
    model: str | Path | None = None,
    suites: list[str] | None = None,
    gates: list[str] | None = None,
    baseline: str | None = None,
    out: str | Path | None = None,
    use_cache: bool = True,
    limit: int | None = None,
    command: list[str] | None = None,
    progress: bool = True,
    log=None,
) -> EvalResult:
    """Evaluate a model on suites, check gates, write the evaluation artifact and the
    results into the model's manifest.

    Raises:
        GateFailed: A gate failed (after everything is written, with the numbers).
        EvalError: Unknown suite, bad gate, or a model the engine cannot run.
    """
    from slmforge.generate import load_generator

    ecfg = cfg.eval
    remote = is_endpoint(model)
    model_path = (str(model) if remote else Path(str(model))) if model else _default_model(cfg)
    suites = suites or ecfg.suites
    limit = limit if limit is not None else ecfg.limit
    rules = gates if gates is not None else ecfg.gates
    base_spec = baseline if baseline is not None else ecfg.regression_vs
    generator = load_generator(model_path, endpoints=cfg.generate.endpoints)
    if log:
        log(f"eval: {model_path} on {', '.join(suites)}")
    results = evaluate_suites(generator, model_path, suites, cfg, use_cache, limit, progress)
    metrics = _flat(results)
    base_metrics = None
    base_model = _baseline_model(cfg, model_path, base_spec) if not remote or base_spec != "parent" else None
    if base_model:
        if log:
            log(f"eval: baseline {base_model}")
        base_gen = load_generator(base_model, endpoints=cfg.generate.endpoints)
        base_metrics = _flat(evaluate_suites(base_gen, base_model, suites, cfg, use_cache, limit, progress))
    gate_results = check_gates(rules, metrics, base_metrics) if rules else []
    out_dir = Path(out) if out else output_dir(cfg, "eval")
    local = not remote and (model_path / MANIFEST).exists()
    parents = [parent_ref(model_path)] if local else []
    result = EvalResult(out_dir.resolve(), str(model_path), results, metrics, gate_results, base_metrics)
    config = {"eval": ecfg.model_dump(mode="json"), "suites": suites, "gates": rules, "baseline": base_model}
    if _is_default_model(cfg, model) and suites == ecfg.suites and rules == ecfg.gates and limit == ecfg.limit:
        config = eval_plan(cfg).config  # what `slmforge run` checks to skip an up-to-date evaluation
    with ArtifactWriter(out_dir, kind="evaluation", config=config, parents=parents, command=command) as w:
        for name, r in results.items():
            (w.path / "items").mkdir(exist_ok=True)
            (w.path / "items" / f"{name}.jsonl").write_text("".join(json.dumps(it) + "\n" for it in r.items))
        payload = {"model": str(model_path), "metrics": metrics, "baseline": base_metrics,
                   "sandbox": _sandbox_records(results),
                   "gates": [g.__dict__ for g in gate_results], "passing": result.passing,
                   "suites": {n: {k: v for k, v in r.to_json().items() if k != "items"} for n, r in results.items()}}
        (w.path / "results.json").write_text(json.dumps(payload, indent=2) + "\n")
        _plot_metrics(w.path / "metrics.png", metrics, base_metrics)
        _write_eval_report(w.path, result)
        w.metrics.update({**metrics, "passing": result.passing})
    if local:
        record_in_manifest(model_path, metrics, result.passing, gate_results, _sandbox_records(results))
    enforce(gate_results, str(model_path))
    return result


def record_in_manifest(folder: Path, metrics: dict[str, float], passing: bool, gates: list[GateResult],
                       sandbox: dict[str, dict[str, Any]] | None = None) -> None:
    """Put evaluation results into a model's manifest (the manifest is not in its own file list,
    so the artifact still verifies). Written atomically. ``sandbox``: per code suite, the
    protections its generated programs ran under (``metrics.eval_sandbox``)."""
    file = folder / MANIFEST
    data = json.loads(file.read_text())
    data["metrics"].setdefault("eval", {}).update(metrics)
    if sandbox:
        data["metrics"].setdefault("eval_sandbox", {}).update(sandbox)
    data["metrics"]["passing"] = passing
    if gates:
        data["metrics"]["gates"] = [g.describe() for g in gates]
    tmp = file.with_suffix(f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(file)


# --------------------------------------------------------------------------- A/B


@dataclass
class CompareResult:
    path: Path
    suites: dict[str, dict[str, Any]]  # suite -> stats.compare output (+ metric, n)


def compare_models(
    cfg: ProjectConfig | None, a: str | Path, b: str | Path, suites: list[str], out: str | Path | None = None,
    use_cache: bool = True, limit: int | None = None, command: list[str] | None = None, progress: bool = True,
) -> CompareResult:
    """Paired A/B comparison on the same items: difference with a 95% paired-bootstrap CI,
    McNemar (binary scores) or paired permutation p-value, and a verdict for B vs. A."""
    from slmforge.evaluate.stats import compare
    from slmforge.generate import load_generator

    endpoints = cfg.generate.endpoints if cfg is not None else None  # which key each endpoint gets
    ga, gb = load_generator(a, endpoints=endpoints), load_generator(b, endpoints=endpoints)
    ga, gb, borrowed = _shared_template(ga, gb, a, b)
    ra = evaluate_suites(ga, a, suites, cfg, use_cache and not borrowed, limit, progress)
    rb = evaluate_suites(gb, b, suites, cfg, use_cache and not borrowed, limit, progress)
    report: dict[str, dict[str, Any]] = {}
    pairs: list[dict[str, Any]] = []
    for name in ra:
        if not ra[name].items:
            continue  # perplexity has no per-item scores to pair
        sa, sb = ra[name].scores(), rb[name].scores()
        ids = [i for i in sa if i in sb]
        xa, xb = [sa[i] for i in ids], [sb[i] for i in ids]
        binary = all(v in (0.0, 1.0) for v in xa + xb)
        report[name] = {"metric": ra[name].primary, "n": len(ids), **compare(xa, xb, binary=binary)}
        pairs += _paired_items(name, ra[name], rb[name], ids)
    target = Path(out) if out else (cfg.stage_dir("compare") if cfg else Path("compare"))
    with ArtifactWriter(target, kind="comparison", config={"a": str(a), "b": str(b), "suites": suites},
                        command=command, parents=_artifact_parents(a, b)) as w:
        (w.path / "compare.json").write_text(json.dumps({"a": str(a), "b": str(b), "suites": report,
                                                         "note": borrowed}, indent=2) + "\n")
        (w.path / "items.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
        _plot_compare(w.path / "difference.png", report)
        _write_compare_report(w.path, str(a), str(b), report, borrowed)
        w.metrics.update({f"{s}.verdict": r["verdict"] for s, r in report.items()})
    return CompareResult(target.resolve(), report)


def _chat_template(gen: Any) -> str | None:
    """The Jinja chat template a generator renders with (llama.cpp: the file's; others: the tokenizer's)."""
    template = getattr(gen, "chat_template", None) or getattr(getattr(gen, "tokenizer", None), "chat_template", None)
    return template if isinstance(template, str) and template else None


def _shared_template(ga: Any, gb: Any, a: str | Path, b: str | Path) -> tuple[Any, Any, str | None]:
    """Two generators of which at most one lacks a chat template: a base model (a GGUF of a pretrained
    base has none) is given its fine-tune's, so both answer the same rendered prompts. Returns the
    generators and a note for the report when a template was borrowed."""
    ta, tb = _chat_template(ga), _chat_template(gb)
    if (ta is None) == (tb is None):
        return ga, gb, None
    lacking, template, name, other = (ga, tb, a, b) if ta is None else (gb, ta, b, a)
    from slmforge.generate import LlamaCppGenerator

    if isinstance(lacking, LlamaCppGenerator):  # the template is fixed when llama.cpp loads the file
        file = lacking.gguf_file
        lacking.close()
        lacking = LlamaCppGenerator(file, chat_template=template)
    elif getattr(lacking, "tokenizer", None) is not None:
        lacking.tokenizer.chat_template = template
    else:
        return ga, gb, None
    note = f"{name} has no chat template; it was evaluated with the one of {other}."
    return (lacking, gb, note) if ta is None else (ga, lacking, note)


def _artifact_parents(*models: str | Path) -> list[dict[str, str]]:
    """Lineage entries of the models that are slmforge artifacts (a GGUF file or an endpoint is not)."""
    refs = []
    for m in models:
        try:
            refs.append(parent_ref(m))
        except ArtifactError:
            continue
    return refs


def _paired_items(suite: str, ra: SuiteResult, rb: SuiteResult, ids: list[str]) -> list[dict[str, Any]]:
    """One row per paired item: both outputs and primary scores, and B - A (the comparison's items.jsonl)."""
    items_a, items_b = {it["id"]: it for it in ra.items}, {it["id"]: it for it in rb.items}
    sa, sb = ra.scores(), rb.scores()
    return [{"suite": suite, "id": i, "prompt": items_a[i].get("prompt", ""), "output_a": items_a[i].get("output", ""),
             "output_b": items_b[i].get("output", ""), "score_a": sa[i], "score_b": sb[i], "diff": sb[i] - sa[i]}
            for i in ids if i in items_a and i in items_b]


# --------------------------------------------------------------------------- reports


def _plot_metrics(path: Path, metrics: dict[str, float], baseline: dict[str, float] | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [k for k in metrics if not k.endswith(("ppl", "bits_per_byte"))] or list(metrics)
    fig, ax = plt.subplots(figsize=(max(5, 0.9 * len(names) + 2), 3.6), dpi=110)
    xs = range(len(names))
    width = 0.38 if baseline else 0.6
    ax.bar([x - (width / 2 if baseline else 0) for x in xs], [metrics[n] for n in names], width, label="model",
           color="#3b75af")
    if baseline:
        ax.bar([x + width / 2 for x in xs], [baseline.get(n, 0.0) for n in names], width, label="baseline",
               color="#aaaaaa")
        ax.legend()
    ax.set_xticks(list(xs), names, rotation=30, ha="right", fontsize=8)
    ax.set_title("metrics per suite")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _plot_compare(path: Path, report: dict[str, dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report)
    fig, ax = plt.subplots(figsize=(6, 0.6 * len(names) + 1.8), dpi=110)
    for i, n in enumerate(names):
        r = report[n]
        color = {"better": "#2ca02c", "worse": "#d62728"}.get(r["verdict"], "#7f7f7f")
        ax.errorbar(r["diff"], i, xerr=[[r["diff"] - r["ci_low"]], [r["ci_high"] - r["diff"]]], fmt="o", color=color,
                    capsize=4)
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_yticks(range(len(names)), [f"{n} ({report[n]['metric']})" for n in names])
    ax.set_xlabel("B - A (95% paired bootstrap CI)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _write_eval_report(folder: Path, result: EvalResult) -> None:
    lines = [f"# Evaluation of {result.model}", ""]
    lines += ["| metric | value |" + (" baseline |" if result.baseline else ""), "|---|---:|" + ("---:|" if result.baseline else "")]
    for k, v in result.metrics.items():
        base = f" {result.baseline.get(k, float('nan')):.4g} |" if result.baseline else ""
        lines.append(f"| {k} | {v:.4g} |{base}")
    lines.append("")
    if result.gates:
        lines += ["## Gates", ""] + [f"- {g.describe()}" for g in result.gates] + [""]
    sandbox = _sandbox_lines(result.results)
    if sandbox:
        lines += ["## Sandbox", ""] + [f"- {line}" for line in sandbox] + [""]
    lines += ["![metrics](metrics.png)", "", "## Errors (first items scoring 0)", ""]
    for name, r in result.results.items():
        misses = [it for it in r.items if it["scores"].get(r.primary, 1) == 0][:5]
        for it in misses:
            lines.append(f"- **{name} {it['id']}**: expected `{str(it['target'])[:120]}`, got `{str(it['answer'])[:120]}`")
    (folder / "report.md").write_text("\n".join(lines) + "\n")
    body = "".join(f"<tr><td>{html.escape(k)}</td><td>{v:.4g}</td></tr>" for k, v in result.metrics.items())
    gates = "".join(f"<li>{html.escape(g.describe())}</li>" for g in result.gates)
    gates += "".join(f"<li>sandbox: {html.escape(line)}</li>" for line in sandbox)
    (folder / "report.html").write_text(
        "<!doctype html><html><head><meta charset='utf-8'><title>slmforge evaluation</title></head><body>"
        f"<h1>Evaluation of {html.escape(result.model)}</h1><table border=1>{body}</table>"
        f"<ul>{gates}</ul><img src='metrics.png' alt='metrics'></body></html>\n"
    )


def _sandbox_lines(results: dict[str, SuiteResult]) -> list[str]:
    """One line per code suite: the protections, and a warning when the box was weak."""
    lines = []
    for name, rec in _sandbox_records(results).items():
        text = f"{name}: {rec['executions']} programs ran under {', '.join(rec['protections'])}."
        if rec["weak"]:
            text = (f"WEAK SANDBOX (opted in with eval.allow_weak_sandbox): {text} Missing: {', '.join(rec['missing'])}; "
                    "an audit hook stood in, which is not a sandbox.")
        lines.append(text)
    return lines


def _write_compare_report(folder: Path, a: str, b: str, report: dict[str, dict[str, Any]],
                          note: str | None = None) -> None:
    lines = ["# A/B comparison", "", f"A: `{a}`  ", f"B: `{b}`", "", *([note, ""] if note else []),
             "| suite | metric | n | A | B | B - A | 95% CI | p | verdict |", "|---|---|---:|---:|---:|---:|---|---:|---|"]
    for s, r in report.items():
        lines.append(f"| {s} | {r['metric']} | {r['n']} | {r['mean_a']:.4f} | {r['mean_b']:.4f} | {r['diff']:+.4f} | "
                     f"[{r['ci_low']:+.4f}, {r['ci_high']:+.4f}] | {r['p_value']:.4g} | {r['verdict']} |")
    lines += ["", "![difference](difference.png)"]
    (folder / "report.md").write_text("\n".join(lines) + "\n")
    rows = "".join(
        f"<tr><td>{html.escape(s)}</td><td>{r['diff']:+.4f}</td><td>[{r['ci_low']:+.4f}, {r['ci_high']:+.4f}]</td>"
        f"<td>{r['p_value']:.4g}</td><td>{html.escape(r['verdict'])}</td></tr>" for s, r in report.items())
    (folder / "report.html").write_text(
        "<!doctype html><html><head><meta charset='utf-8'><title>slmforge A/B</title></head><body>"
        f"<h1>A/B comparison</h1><p>A: {html.escape(a)}<br>B: {html.escape(b)}</p>"
        f"{'<p>' + html.escape(note) + '</p>' if note else ''}<table border=1>"
        f"<tr><th>suite</th><th>B - A</th><th>95% CI</th><th>p</th><th>verdict</th></tr>{rows}</table>"
        "<img src='difference.png' alt='difference'></body></html>\n"
    )
