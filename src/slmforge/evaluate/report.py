"""The pipeline's closing report: held-out perplexity against a unigram baseline,
loss curves, data statistics, and sample answers under two sampling profiles,
as Markdown and HTML (plots as PNG files beside them)."""

from __future__ import annotations

import html
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slmforge.artifacts import Plan, default_model, output_dir, parent_ref, read_manifest
from slmforge.config import ProjectConfig
from slmforge.errors import ArtifactError

if TYPE_CHECKING:
    from slmforge.tokenizer.packing import TextSource

__all__ = ["ReportResult", "report_plan", "write_report"]


@dataclass
class ReportResult:
    path: Path
    metrics: dict[str, Any]


def _model_dir(cfg: ProjectConfig) -> Path:
    """``report.model``, else the project's model (the sft output, else train's)."""
    if cfg.report.model:
        return cfg.resolve(cfg.report.model)
    return default_model(cfg, "report on", "set report.model")


def report_plan(cfg: ProjectConfig) -> Plan:
    """What the report the config asks for would be: what decides whether an existing report is current.

    Raises:
        ArtifactError: The model, the data or (with an eval stage) the evaluation artifact is missing.
    """
    model = _model_dir(cfg)
    parents = [parent_ref(model), parent_ref(output_dir(cfg, "data"), "dataset")]
    if "eval" in cfg.project.stages:
        parents.append(parent_ref(output_dir(cfg, "eval"), "evaluation"))
    return Plan("report", {"report": cfg.report.model_dump(mode="json"), "model": str(model)}, parents)


def _generator(model_dir: Path):
    """A generator for a model folder, or for an adapter over its base."""
    from slmforge.generate import TorchGenerator

    return TorchGenerator.from_pretrained(model_dir), str(model_dir)


def write_report(cfg: ProjectConfig, out: str | Path | None = None, command: list[str] | None = None,
                 progress: bool = True, log=None) -> ReportResult:
    """Write the report artifact for the project's final model.

    Raises:
        ArtifactError: The model or the data artifact is missing.
    """
    from slmforge.tokenizer.packing import jsonl_texts

    rcfg = cfg.report
    plan = report_plan(cfg)
    model_dir = _model_dir(cfg)
    data_dir = output_dir(cfg, "data")
    out_dir = Path(out) if out else output_dir(cfg, "report")
    # Read from disk as they are used, never held: the splits may not fit in memory.
    heldout = jsonl_texts(data_dir / "text" / f"{rcfg.heldout_split}.jsonl")
    train_texts = jsonl_texts(data_dir / "text" / "train.jsonl")
    if next(iter(heldout), None) is None:
        raise ArtifactError(f"{data_dir} has no {rcfg.heldout_split} text to measure perplexity on.")
    gen, base_spec = _generator(model_dir)
    metrics = {"model": str(model_dir), "heldout_split": rcfg.heldout_split,
               **_perplexity_metrics(cfg, gen, model_dir, heldout, train_texts, log)}
    rows = _sample_answers(cfg, gen, model_dir, data_dir, log)
    metrics.update(_evaluation_metrics(cfg))
    with plan.writer(out_dir, command) as w:
        figures = _copy_figures(cfg, w.path)
        data_stats = json.loads((data_dir / "stats.json").read_text()) if (data_dir / "stats.json").exists() else {}
        train_metrics = _metrics_of(output_dir(cfg, "train"))
        sft_metrics = _metrics_of(output_dir(cfg, "sft")) if "sft" in cfg.project.stages else {}
        doc = _document(cfg, metrics, rows, figures, data_stats, train_metrics, sft_metrics)
        (w.path / "report.md").write_text(_markdown(doc), encoding="utf-8")
        (w.path / "report.html").write_text(_html(doc), encoding="utf-8")
        (w.path / "report.json").write_text(json.dumps({"metrics": metrics, "samples": rows}, indent=2) + "\n")
        w.metrics.update(metrics)
    return ReportResult(out_dir.resolve(), metrics)


def _perplexity_metrics(cfg: ProjectConfig, gen, model_dir: Path, heldout: TextSource, train_texts: TextSource,
                        log) -> dict[str, Any]:
    """Held-out perplexity of the model, of a unigram model of the same tokenizer, and of the
    pretrained model when the reported one was made from it. The training split's tokens (for the unigram
    counts) go through a scratch token cache, memory-mapped, so they are never all in memory."""
    import tempfile

    import torch

    from slmforge.evaluate import perplexity
    from slmforge.tokenizer.packing import tokenize_documents, unigram_perplexity

    tok = gen.tokenizer
    seq_len = min(cfg.train.seq_len, 512)
    if log:
        log("report: measuring held-out perplexity")
    with torch.no_grad():
        ppl = perplexity(gen.model, tok, heldout, seq_len=seq_len)
    held_tokens = ppl.tokens + sum(1 for _ in heldout)  # one more per held-out document
    held_stream = tokenize_documents(heldout, tok, max_tokens=held_tokens)[:held_tokens]
    with tempfile.TemporaryDirectory(prefix="slmforge-report-tokens-") as scratch:
        train_stream = tokenize_documents(train_texts, tok, Path(scratch))
        unigram = unigram_perplexity(train_stream, held_stream, len(tok))
        del train_stream  # the memory map, before its file is removed
    base_ppl = None
    train_dir = output_dir(cfg, "train")
    if model_dir != train_dir and (train_dir / "manifest.json").exists():
        from slmforge.generate import TorchGenerator

        base_gen = TorchGenerator.from_pretrained(train_dir)
        base_ppl = perplexity(base_gen.model, base_gen.tokenizer, heldout, seq_len=seq_len)
        del base_gen
    metrics = {
        "heldout_tokens": ppl.tokens,
        "ppl": round(ppl.ppl, 3),
        "bits_per_byte": round(ppl.bits_per_byte, 4),
        "unigram_ppl": round(unigram, 3),
        "beats_unigram": ppl.ppl < unigram,
    }
    if base_ppl is not None:
        metrics["pretrained_ppl"] = round(base_ppl.ppl, 3)
    return metrics


def _sample_answers(cfg: ProjectConfig, gen, model_dir: Path, data_dir: Path, log) -> list[dict[str, Any]]:
    """The model's answers to ``report.questions`` and to held-out chat questions (with their
    reference answers), under each of ``report.profiles``."""
    import itertools

    from slmforge.data import iter_jsonl
    from slmforge.generate import SamplingParams, resolve_profile

    rcfg = cfg.report
    questions = [(q, None) for q in rcfg.questions]
    for r in itertools.islice(iter_jsonl(data_dir / "chat" / f"{rcfg.heldout_split}.jsonl"), rcfg.heldout_questions):
        user = next(m["content"] for m in r["messages"] if m["role"] == "user")
        reference = next(m["content"] for m in r["messages"] if m["role"] == "assistant")
        questions.append((user, reference))
    if log:
        log(f"report: answering {len(questions)} questions with profiles {', '.join(rcfg.profiles)}")
    rows: list[dict[str, Any]] = []
    for q, ref in questions:
        answers = {}
        for name in rcfg.profiles:
            profile = resolve_profile(name, model_dir if (model_dir / "generation_config.json").exists() else None,
                                      cfg.generate)
            params = SamplingParams.from_profile(profile, max_new_tokens=rcfg.max_new_tokens,
                                                 seed=cfg.project.seed if profile.temperature > 0 else None)
            answers[name] = gen.chat([{"role": "user", "content": q}], params)[0].text.strip()
        rows.append({"question": q, "reference": ref, "answers": answers})
    return rows


def _evaluation_metrics(cfg: ProjectConfig) -> dict[str, Any]:
    """The eval stage's suite metrics and gate verdict, when the project has one and it ran."""
    eval_file = output_dir(cfg, "eval") / "results.json"
    if "eval" not in cfg.project.stages or not eval_file.exists():
        return {}
    evaluation = json.loads(eval_file.read_text())
    return {"suites": {k: round(v, 4) for k, v in evaluation["metrics"].items()}, "gates_passing": evaluation["passing"]}


def _metrics_of(folder: Path) -> dict[str, Any]:
    try:
        return read_manifest(folder).metrics
    except ArtifactError:
        return {}


def _copy_figures(cfg: ProjectConfig, folder: Path) -> dict[str, str]:
    found = {}
    for label, src in (
        ("pretraining loss", output_dir(cfg, "train") / "loss.png"),
        ("fine-tuning loss", output_dir(cfg, "sft") / "loss.png"),
        ("document lengths", output_dir(cfg, "data") / "lengths.png"),
    ):
        if src.exists():
            name = label.replace(" ", "_").replace("-", "_") + ".png"
            shutil.copyfile(src, folder / name)
            found[label] = name
    return found


# A report is a list of blocks rendered twice (Markdown and HTML): ("h", text), ("p", text),
# ("table", (header, rows)), ("img", (alt, file)), ("pre", text).
def _document(cfg, metrics, rows, figures, data_stats, train_metrics, sft_metrics) -> list[tuple[str, Any]]:
    d: list[tuple[str, Any]] = [("h1", f"Model report: {cfg.project.name}")]
    verdict = "beats" if metrics["beats_unigram"] else "does NOT beat"
    d.append(("p", f"Held-out perplexity {metrics['ppl']} on the {metrics['heldout_split']} split "
                   f"({metrics['heldout_tokens']:,} tokens): the model {verdict} the unigram baseline of the same "
                   f"tokenizer ({metrics['unigram_ppl']}). Bits per byte: {metrics['bits_per_byte']}."))
    final = "fine-tuned model" if "pretrained_ppl" in metrics else "model"
    table = [[final, str(metrics["ppl"]), str(metrics["bits_per_byte"])],
             ["unigram baseline (same tokenizer)", str(metrics["unigram_ppl"]), ""]]
    if "pretrained_ppl" in metrics:
        table.insert(1, ["pretrained model before fine-tuning", str(metrics["pretrained_ppl"]), ""])
    d += [("h2", "Perplexity"), ("table", (["model", "perplexity", "bits/byte"], table))]
    if metrics.get("suites"):
        d.append(("h2", "Evaluation suites"))
        d.append(("table", (["suite.metric", "value"], [[k, str(v)] for k, v in metrics["suites"].items()])))
        d.append(("p", "Gates: " + ("all passing." if metrics.get("gates_passing") else "FAILING (see the eval report).")))
    if train_metrics or sft_metrics:
        d.append(("h2", "Training"))
        keys = ["params", "trainable_params", "steps", "tokens", "tokens_per_s", "seconds", "train_loss", "val_loss",
                "val_ppl", "epochs"]
        tr = [[k, str(train_metrics.get(k, "")), str(sft_metrics.get(k, ""))] for k in keys
              if k in train_metrics or k in sft_metrics]
        d.append(("table", (["", "pretraining", "fine-tuning"], tr)))
    for label in ("pretraining loss", "fine-tuning loss"):
        if label in figures:
            d.append(("img", (label, figures[label])))
    if data_stats:
        d.append(("h2", "Data"))
        d.append(("p", f"{data_stats['documents_in']} documents read, {data_stats['documents_out']} kept; "
                       f"dropped: {', '.join(f'{k} {v}' for k, v in data_stats['dropped'].items()) or 'none'}; "
                       f"PII replaced: {', '.join(f'{k} {v}' for k, v in data_stats['pii'].items() if v) or 'none'}."))
        splits = [[k, str(v["documents"]), f"{v['chars']:,}"] for k, v in data_stats["splits"].items()]
        d.append(("table", (["split", "documents", "characters"], splits)))
        if "document lengths" in figures:
            d.append(("img", ("document lengths", figures["document lengths"])))
    d.append(("h2", "Sample answers"))
    profiles = list(rows[0]["answers"]) if rows else []
    for r in rows:
        d.append(("h3", r["question"]))
        for name in profiles:
            d.append(("answer", (name, r["answers"][name])))
        if r["reference"]:
            d.append(("answer", ("reference", r["reference"])))
    return d


def _markdown(doc) -> str:
    out = []
    for kind, body in doc:
        if kind in ("h1", "h2", "h3"):
            if out and out[-1] != "":
                out.append("")
            out += ["#" * int(kind[1]) + " " + body, ""]
        elif kind == "p":
            out += [body, ""]
        elif kind == "table":
            header, rows = body
            out += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            out += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows] + [""]
        elif kind == "img":
            out += [f"![{body[0]}]({body[1]})", ""]
        elif kind == "answer":
            text = body[1].replace("\n", " ") or "(empty)"
            out += [f"- **{body[0]}**: {text}"]
            continue
    return "\n".join(out) + "\n"


def _html(doc) -> str:
    e = html.escape
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>slmforge report</title><style>",
             "body{font-family:system-ui,sans-serif;max-width:900px;margin:2em auto;line-height:1.45;color:#222}",
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 10px;text-align:left}",
             "img{max-width:100%}.answer{margin:.3em 0 .3em 1em}.answer b{display:inline-block;min-width:6em}",
             "</style></head><body>"]
    for kind, body in doc:
        if kind in ("h1", "h2", "h3"):
            parts.append(f"<{kind}>{e(body)}</{kind}>")
        elif kind == "p":
            parts.append(f"<p>{e(body)}</p>")
        elif kind == "table":
            header, rows = body
            parts.append("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>")
            parts += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in rows]
            parts.append("</table>")
        elif kind == "img":
            parts.append(f"<figure><img src='{e(body[1])}' alt='{e(body[0])}'><figcaption>{e(body[0])}</figcaption></figure>")
        elif kind == "answer":
            parts.append(f"<div class='answer'><b>{e(body[0])}</b> {e(body[1]) or '(empty)'}</div>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
