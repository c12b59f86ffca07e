"""Encoder heads: a sequence-classification head and a token-classification (NER)
head, trained on the data stage's ``classification`` / ``ner`` outputs with the
shared loop, then scored on the test split (validation when there is no test).

    from slmforge import load_config
    from slmforge.train.encoder import train_encoder
    cfg = load_config("slmforge.yaml")
    cfg.encoder.task = "ner"
    result = train_encoder(cfg)          # runs/encoder-ner: a Hugging Face folder + manifest
    print(result.metrics["f1"])          # entity-level F1 on the test split

The model is either a fresh small BERT on the project's own tokenizer (the
default) or a local Hugging Face encoder folder (``encoder.base``) with its own
tokenizer. Either way the artifact loads back with
``AutoModelForSequenceClassification`` / ``AutoModelForTokenClassification``.

The scores come from ``slmforge.label_metrics`` (shared with evaluation; written there rather
than taken from scikit-learn or seqeval, which are not dependencies): ``classification_metrics``
(accuracy, macro P/R/F1, per class, confusion matrix) and ``entity_f1``
(conlleval/seqeval-style, over ``entity_spans``); all three stay importable from here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from slmforge.artifacts import ArtifactWriter, model_ref, output_dir, parent_ref, read_manifest
from slmforge.config import ProjectConfig
from slmforge.errors import ConfigError, ModelError, TrainError
from slmforge.label_metrics import classification_metrics, entity_f1, entity_spans
from slmforge.train import TrainResult, _dataset_dir, _loop_metrics, _write_log, work_dir_for

__all__ = ["train_encoder", "encoder_plan", "classification_metrics", "entity_f1", "entity_spans"]

_SPLITS = ("train", "val", "test")


# --------------------------------------------------------------------------- examples


class _PaddedExamples:
    """Token sequences of different lengths, right-padded per batch (dynamic padding).

    Labels are one class id per sequence (classification) or one per token with -100
    where there is no loss (NER: special tokens, non-first sub-tokens and padding).
    """

    def __init__(self, examples: list[tuple[list[int], int | list[int]]], pad_id: int) -> None:
        self.examples = examples
        self.pad_id = pad_id

    def __len__(self) -> int:
        return len(self.examples)

    def batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        items = [self.examples[i] for i in indices]
        width = max(1, *(len(ids) for ids, _ in items))  # an empty text (no special tokens) is one pad
        ids = torch.full((len(items), width), self.pad_id, dtype=torch.long)  # (B, T)
        attn = torch.zeros((len(items), width), dtype=torch.long)  # (B, T)
        per_token = isinstance(items[0][1], list)
        if per_token:
            labels = torch.full((len(items), width), -100, dtype=torch.long)  # (B, T)
        else:
            labels = torch.tensor([y for _, y in items], dtype=torch.long)  # (B,)
        for row, (x, y) in enumerate(items):
            ids[row, : len(x)] = torch.tensor(x, dtype=torch.long)
            attn[row, : len(x)] = 1
            if per_token:
                labels[row, : len(y)] = torch.tensor(y, dtype=torch.long)
        return {"input_ids": ids, "attention_mask": attn, "labels": labels}

    def tokens_in(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["attention_mask"].sum())


def _special_affixes(tok) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after a text: ``[bos]`` and ``[]``
    for slmforge's byte-level BPE, ``[CLS]`` and ``[SEP]`` for BERT."""
    inner = tok("a", add_special_tokens=False)["input_ids"]
    full = tok("a")["input_ids"]
    for i in range(len(full) - len(inner) + 1):
        if full[i : i + len(inner)] == inner:
            return full[:i], full[i + len(inner) :]
    return [], []


@dataclass
class _Encoded:
    """A split turned into model inputs, plus what evaluation needs to map them back."""

    examples: list[tuple[list[int], int | list[int]]] = field(default_factory=list)
    # NER: per sequence, the source record and (word index, token position) of each word's first sub-token
    windows: list[tuple[int, list[tuple[int, int]]]] = field(default_factory=list)
    cut_off: int = 0  # classification: texts truncated; NER: records split over several sequences


def _encode_classification(records: list[dict], tok, seq_len: int, label2id: dict[str, int]) -> _Encoded:
    prefix, suffix = _special_affixes(tok)
    budget = seq_len - len(prefix) - len(suffix)
    enc = _Encoded()
    for start in range(0, len(records), 512):
        chunk = records[start : start + 512]
        for record, ids in zip(chunk, tok([r["text"] for r in chunk], add_special_tokens=False)["input_ids"]):
            enc.cut_off += len(ids) > budget
            enc.examples.append((prefix + ids[:budget] + suffix, label2id[record["label"]]))
    return enc


def _encode_ner(records: list[dict], tok, seq_len: int, label2id: dict[str, int]) -> _Encoded:
    """Words -> sub-tokens, each word encoded on its own (with a leading space after the
    first, as it sits in running text); the tag goes on a word's first sub-token and -100
    on the rest. Records longer than ``seq_len`` are split into consecutive windows of
    whole words, so every word is trained on and predicted."""
    prefix, suffix = _special_affixes(tok)
    budget = seq_len - len(prefix) - len(suffix)
    unk = tok.unk_token_id
    enc = _Encoded()
    for n, record in enumerate(records):
        words = [w if i == 0 else " " + w for i, w in enumerate(record["tokens"])]
        pieces = tok(words, add_special_tokens=False)["input_ids"] if words else []
        windows: list[list[tuple[int, list[int]]]] = [[]]
        used = 0
        for w, ids in enumerate(pieces):
            ids = (ids or ([unk] if unk is not None else []))[:budget]  # one overlong word: keep its start
            if not ids:
                continue  # encodes to nothing: evaluated as "O"
            if used + len(ids) > budget and windows[-1]:
                windows.append([])
                used = 0
            windows[-1].append((w, ids))
            used += len(ids)
        if not windows[-1]:
            windows.pop()  # no words: nothing to train on; evaluated as all "O"
        enc.cut_off += len(windows) > 1
        for window in windows:
            ids, labels, positions = list(prefix), [-100] * len(prefix), []
            for w, word_ids in window:
                positions.append((w, len(ids)))
                labels += [label2id[record["tags"][w]]] + [-100] * (len(word_ids) - 1)
                ids += word_ids
            enc.examples.append((ids + suffix, labels + [-100] * len(suffix)))
            enc.windows.append((n, positions))
    return enc


# --------------------------------------------------------------------------- inputs


def _read_split(file: Path) -> list[dict]:
    from slmforge.data import read_jsonl

    try:
        return read_jsonl(file)
    except json.JSONDecodeError as exc:
        raise TrainError(f"{file} has a line that is not JSON ({exc}); re-run `slmforge data`.") from None


def _read_task_data(data_dir: Path, task: str) -> tuple[list[str], dict[str, list[dict]]]:
    """The label list and the train/val/test records of the task's output folder."""
    folder = data_dir / task
    if not (folder / "train.jsonl").is_file() or not (folder / "labels.json").is_file():
        raise TrainError(
            f"The dataset {data_dir} has no {task} output ({task}/train.jsonl and {task}/labels.json), so "
            f"there is nothing to train a {task} head on. Add {task} to data.formats in the project file "
            f"(for example --set 'data.formats=[text, chat, {task}]') and run `slmforge data` again."
        )
    labels = json.loads((folder / "labels.json").read_text(encoding="utf-8"))
    splits = {s: _read_split(folder / f"{s}.jsonl") for s in _SPLITS}
    key = "label" if task == "classification" else "tags"
    if not isinstance(labels, list) or len(labels) < 2:
        what = (
            "classes (label_from decides where they come from: data.classification.label_from)"
            if task == "classification"
            else "entity types besides O (set data.ner.gazetteer or data.ner.builtin_gazetteer, or give "
            "records with tokens/tags)"
        )
        raise TrainError(
            f"{folder / 'labels.json'} lists {len(labels) if isinstance(labels, list) else 0} label(s), "
            f"{labels!r}; a {task} head needs at least 2. Give the data stage sources with at least two {what}, "
            "then run `slmforge data` again."
        )
    known = set(labels)
    for split, records in splits.items():
        for r in records:
            values = [r.get(key)] if task == "classification" else r.get(key) or []
            bad = [v for v in values if v not in known]
            if bad or (task == "ner" and len(r.get("tokens") or []) != len(values)):
                raise TrainError(
                    f"{folder / f'{split}.jsonl'}, record {r.get('id')!r}: "
                    + (f"label(s) {bad} are not in labels.json" if bad else "tokens and tags differ in length")
                    + ". The dataset artifact is damaged or hand-edited; run `slmforge data` again."
                )
    if not splits["train"]:
        raise TrainError(
            f"{folder / 'train.jsonl'} has no examples, so there is nothing to train on. Check the data stage's "
            f"report ({data_dir / 'report.md'}) for why no document became a {task} example, add sources, "
            "and run `slmforge data` again."
        )
    return labels, splits


def _model_source(cfg: ProjectConfig) -> tuple[Path, list[dict[str, str]]]:
    """Where the encoder starts from (``encoder.base``, else the tokenizer of a fresh one) and its lineage."""
    ecfg = cfg.encoder
    if not ecfg.base:
        tok_dir = cfg.resolve(ecfg.tokenizer) if ecfg.tokenizer else output_dir(cfg, "tokenizer")
        return tok_dir, [parent_ref(tok_dir, "tokenizer")]
    path = cfg.resolve(ecfg.base)
    if not (path / "config.json").is_file():
        raise ModelError(
            f"encoder.base {ecfg.base!r} is not a Hugging Face model folder ({path} has no config.json). "
            "Point it at a local encoder folder (config.json, weights, tokenizer), or leave it null to "
            "train a fresh small encoder on the project's tokenizer."
        )
    return path, [model_ref(path)]


def encoder_plan(
    cfg: ProjectConfig, data: str | Path | None = None
) -> tuple[str, dict[str, Any], list[dict[str, str]]]:
    """(kind, config, parents) of what ``train_encoder`` would write: what decides whether it is current.

    Raises:
        ArtifactError: The dataset or tokenizer artifact is missing.
        ModelError: ``encoder.base`` is set but is not a model folder.
    """
    data_dir = _dataset_dir(cfg, cfg.encoder.data, data)
    _, model_parents = _model_source(cfg)
    config = {"encoder": cfg.encoder.model_dump(mode="json"), "seed": cfg.project.seed}
    return "encoder", config, [parent_ref(data_dir, "dataset")] + model_parents


def _build_model(cfg: ProjectConfig, task: str, labels: list[str]) -> tuple[Any, Any]:
    """The model (with a fresh head of ``len(labels)`` outputs) and its tokenizer."""
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification, BertConfig

    from slmforge.tokenizer import load_tokenizer

    ecfg = cfg.encoder
    id2label = dict(enumerate(labels))
    label2id = {label: i for i, label in enumerate(labels)}
    auto = AutoModelForSequenceClassification if task == "classification" else AutoModelForTokenClassification
    torch.manual_seed(cfg.project.seed)  # the new head (and a fresh body) start from the project seed
    source, _ = _model_source(cfg)
    if ecfg.base:
        path = source
        tok = load_tokenizer(path)
        try:
            model = auto.from_pretrained(
                path, num_labels=len(labels), id2label=id2label, label2id=label2id, ignore_mismatched_sizes=True
            )
        except Exception as exc:  # transformers raises many kinds; all mean "not a usable encoder"
            raise ModelError(
                f"Could not load {path} as an encoder with a {task} head: {type(exc).__name__}: {exc}. "
                "encoder.base must be an encoder architecture transformers knows (BERT, RoBERTa, DistilBERT, ...)."
            ) from None
        limit = min(getattr(model.config, "max_position_embeddings", None) or ecfg.seq_len, tok.model_max_length)
        if ecfg.seq_len > limit:
            raise TrainError(
                f"encoder.seq_len={ecfg.seq_len} is longer than the {limit} positions {path} supports; "
                f"set encoder.seq_len to {limit} or less."
            )
        return model, tok

    if ecfg.hidden_size % ecfg.num_heads:
        raise ConfigError(
            f"encoder.hidden_size={ecfg.hidden_size} must be divisible by encoder.num_heads={ecfg.num_heads}."
        )
    tok = load_tokenizer(source)
    tok.model_max_length = ecfg.seq_len  # saved with it: pipelines then truncate to what the model can take
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    bert = BertConfig(
        vocab_size=len(tok),
        hidden_size=ecfg.hidden_size,
        num_hidden_layers=ecfg.num_layers,
        num_attention_heads=ecfg.num_heads,
        intermediate_size=4 * ecfg.hidden_size,
        max_position_embeddings=ecfg.seq_len,
        pad_token_id=pad,
        num_labels=len(labels),
        id2label=id2label,
        label2id=label2id,
    )
    return auto.from_config(bert), tok


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def _predict(model, source: _PaddedExamples, batch_size: int) -> list[Any]:
    """Argmax class per sequence (classification) or per real token (NER), in fp32."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: list[Any] = []
    for start in range(0, len(source), batch_size):
        batch = source.batch(list(range(start, min(len(source), start + batch_size))))
        inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask")}
        logits = model(**inputs).logits  # (B, C) or (B, T, C)
        best = logits.argmax(-1).cpu()  # (B,) or (B, T)
        if best.dim() == 1:
            out.extend(best.tolist())
        else:
            out.extend(row[: int(n)].tolist() for row, n in zip(best, batch["attention_mask"].sum(1)))
    model.train(was_training)
    return out


def _evaluate(model, task: str, records: list[dict], enc: _Encoded, labels: list[str], batch_size: int, pad: int):
    predicted = _predict(model, _PaddedExamples(enc.examples, pad), batch_size)
    if task == "classification":
        return classification_metrics([r["label"] for r in records], [labels[i] for i in predicted], labels)
    pred_tags = [["O"] * len(r["tags"]) for r in records]
    for (n, positions), row in zip(enc.windows, predicted):
        for w, pos in positions:
            pred_tags[n][w] = labels[row[pos]]
    return entity_f1([r["tags"] for r in records], pred_tags)


def _plot_confusion(confusion: list[list[int]], labels: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    size = min(3 + 0.5 * len(labels), 14)
    fig, ax = plt.subplots(figsize=(size, size * 0.85), dpi=110)
    image = ax.imshow(confusion, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    top = max((max(row) for row in confusion), default=0)
    if len(labels) <= 30:  # counts stay readable
        for i, row in enumerate(confusion):
            for j, count in enumerate(row):
                ax.text(j, i, str(count), ha="center", va="center", fontsize=8,
                        color="white" if count > top / 2 else "black")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# --------------------------------------------------------------------------- the stage


def _describe_run(metrics: dict[str, Any], cfg: ProjectConfig, model: Any, labels: list[str], examples: int,
                  cut_off: int) -> None:
    """What the run was, into its metrics: task, labels, starting point, size, examples cut or split."""
    ecfg = cfg.encoder
    built_from = str(cfg.resolve(ecfg.base)) if ecfg.base else "fresh"
    metrics.update(task=ecfg.task, labels=labels, base=built_from, examples=examples)
    metrics["params"] = sum(p.numel() for p in model.parameters())
    # classification cuts a long example at seq_len; NER trains it as several windows
    metrics["examples_cut_off" if ecfg.task == "classification" else "examples_split"] = cut_off


def train_encoder(
    cfg: ProjectConfig,
    data: str | Path | None = None,
    out: str | Path | None = None,
    command: list[str] | None = None,
    progress: bool = True,
    log=None,
) -> TrainResult:
    """Train a classification or NER head (``encoder.task``) and score it on held-out data.

    Args:
        cfg: The project config; its ``encoder`` section decides the task, model and loop.
        data: The dataset artifact (default: ``encoder.data``, else ``<out_dir>/data``).
        out: The output folder (default: ``encoder.out``, else ``<out_dir>/encoder-<task>``).
        command: Recorded in the manifest (default: ``sys.argv``).
        progress: Show a progress bar on stderr.
        log: Called with one-line notices (resuming, which split was scored).

    Returns:
        The artifact (kind ``encoder``): a Hugging Face model folder with its tokenizer,
        ``labels.json``, ``metrics.json``, ``log.jsonl``, ``loss.png`` and, for
        classification, ``confusion.png``. Its metrics hold ``accuracy`` (token accuracy for
        NER) and ``f1`` (macro F1 for classification, entity F1 for NER) when there is a test
        or validation split; ``metrics.json`` holds the per-class / per-type detail.

    Raises:
        ArtifactError: The dataset or tokenizer artifact is missing.
        TrainError: The dataset has no output for the task, fewer than 2 labels, an empty
            train split, or a ``seq_len`` longer than the base model supports.
        ModelError: ``encoder.base`` is not a loadable encoder folder.
        ConfigError: A fresh encoder's hidden_size is not divisible by num_heads.
    """
    from slmforge.model import pick_device
    from slmforge.train._loop import run_loop, world

    ecfg = cfg.encoder
    task = ecfg.task
    team = world(pick_device(ecfg.device))  # under torchrun: this process's rank; (0, 1) otherwise
    data_dir = _dataset_dir(cfg, ecfg.data, data)
    out_dir = Path(out) if out else cfg.stage_dir(f"encoder-{task}", ecfg.out)
    read_manifest(data_dir, "dataset")  # a missing dataset is reported as such, not as a missing format
    labels, splits = _read_task_data(data_dir, task)
    kind, config, parents = encoder_plan(cfg, data)
    label2id = {label: i for i, label in enumerate(labels)}
    model, tok = _build_model(cfg, task, labels)
    encode = _encode_classification if task == "classification" else _encode_ner
    encoded = {s: encode(records, tok, ecfg.seq_len, label2id) for s, records in splits.items()}
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    train_src = _PaddedExamples(encoded["train"].examples, pad)
    val_src = _PaddedExamples(encoded["val"].examples, pad) if encoded["val"].examples else None

    run_key = {"config": config, "parents": [p["fingerprint"] for p in parents]}
    res = run_loop(model, train_src, val_src, ecfg, work_dir_for(out_dir), cfg.project.seed, run_key,
                   f"encoder ({task})", progress, log)

    metrics = _loop_metrics(res)
    metrics.pop("val_ppl", None)  # exp(cross-entropy over labels) is no perplexity
    if not team.main:  # the replicas are identical: the first process scores and writes the encoder
        return TrainResult(out_dir.resolve(), kind, metrics)
    _describe_run(metrics, cfg, model, labels, len(splits["train"]), encoded["train"].cut_off)
    report = _score_into(metrics, model, task, splits, encoded, labels, ecfg.batch_size, pad, log)
    eval_split = report["split"]

    model.to("cpu")
    with ArtifactWriter(out_dir, kind=kind, config=config, parents=parents, command=command) as w:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        model.save_pretrained(w.path)
        tok.save_pretrained(w.path)
        (w.path / "labels.json").write_text(json.dumps(labels, indent=1) + "\n")
        (w.path / "metrics.json").write_text(json.dumps(report, indent=1) + "\n")
        _write_log(w.path, res.log, f"encoder ({task}), {metrics['params'] / 1e6:.2f}M parameters")
        if task == "classification" and eval_split is not None:
            _plot_confusion(report["confusion"], labels, w.path / "confusion.png",
                            f"{eval_split} split: accuracy {report['accuracy']:.3f}, macro F1 {report['f1']:.3f}")
        w.metrics.update(metrics)
    return TrainResult(out_dir.resolve(), kind, metrics)


def _score_into(metrics: dict[str, Any], model, task: str, splits: dict[str, list[dict]], encoded: dict[str, _Encoded],
                labels: list[str], batch_size: int, pad: int, log) -> dict[str, Any]:
    """Score the trained head on the test split (else validation), adding the headline numbers to ``metrics``.

    Returns:
        The detail for ``metrics.json``: ``split`` (None when there is nothing to score on) and what
        ``_evaluate`` measured.
    """
    eval_split = next((s for s in ("test", "val") if splits[s]), None)
    report: dict[str, Any] = {"split": eval_split}
    if eval_split is None:
        if log:
            log(f"encoder ({task}): no test or validation examples, so no accuracy/F1 is reported")
    else:
        if eval_split != "test" and log:
            log(f"encoder ({task}): the test split is empty; scoring on the validation split")
        report.update(_evaluate(model, task, splits[eval_split], encoded[eval_split], labels, batch_size, pad))
        metrics.update(eval_split=eval_split, eval_examples=len(splits[eval_split]))
        for key in ("accuracy", "precision", "recall", "f1"):
            if key in report:
                metrics[key] = round(report[key], 5)
        if task == "classification":
            metrics["f1_per_class"] = {k: round(v["f1"], 5) for k, v in report["per_class"].items()}
        else:
            metrics["accuracy"] = round(report["token_accuracy"], 5)  # token accuracy, for the one-line summary
            metrics["entities"] = report["entities"]
            metrics["f1_per_type"] = {k: round(v["f1"], 5) for k, v in report["per_type"].items()}
    return report
