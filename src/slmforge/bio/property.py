"""``bio-property``: predict a measured molecular property, scored on a Bemis-Murcko scaffold split.

Three predictors, side by side on the same test scaffolds:
- the constant predictor (the training mean): the floor, R^2 about 0 or below;
- Morgan fingerprints (radius 2) + ridge regression (scikit-learn), its strength picked on validation:
  the classical baseline a learned model must be compared with;
- a small encoder (ESM-style, our SMILES tokenizer) with a regression head on its first token,
  trained with the one loop on standardised targets, fresh or from a ``bio-mlm`` SMILES MLM.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from slmforge.artifacts import Plan, model_ref, output_dir, parent_ref
from slmforge.bio import chem
from slmforge.bio.mlm import encode, encoder_config
from slmforge.bio.sources import read_molecules
from slmforge.bio.stages import SPLITS, BioResult, prepare_molecules, shared_scaffolds, source_ref, split_molecules
from slmforge.config import ProjectConfig
from slmforge.errors import ConfigError, DataError


def regression_scores(y_true: Sequence[float], y_pred: Sequence[float]) -> dict[str, float]:
    """RMSE, MAE and R^2 (1 - residual / total sum of squares; 0 for the mean, negative when worse)."""
    import numpy as np

    t, p = np.asarray(y_true, dtype=float), np.asarray(y_pred, dtype=float)
    ss_tot = float(((t - t.mean()) ** 2).sum())
    return {"rmse": round(float(np.sqrt(((t - p) ** 2).mean())), 4), "mae": round(float(np.abs(t - p).mean()), 4),
            "r2": round(1 - float(((t - p) ** 2).sum()) / ss_tot, 4) if ss_tot > 0 else float("nan")}


def ridge_baseline(splits: dict[str, list[dict]], alphas: Sequence[float], bits: int) -> tuple[dict[str, list[float]], float]:
    """Morgan fingerprint + ridge predictions per split; alpha chosen by validation RMSE (train RMSE without val)."""
    from sklearn.linear_model import Ridge

    x = {s: chem.morgan_fingerprints([r["smiles"] for r in rows], bits) for s, rows in splits.items()}
    y = {s: [r["value"] for r in rows] for s, rows in splits.items()}
    pick = "val" if splits["val"] else "train"
    best = min(alphas, key=lambda a: regression_scores(y[pick], Ridge(alpha=a).fit(x["train"], y["train"]).predict(x[pick]))["rmse"])
    model = Ridge(alpha=best).fit(x["train"], y["train"])
    return {s: model.predict(x[s]).tolist() if len(rows) else [] for s, rows in splits.items()}, best


class RegressionExamples:
    """A ``BatchSource`` of tokenized molecules and standardised float targets."""

    def __init__(self, encoded: list[list[int]], targets: list[float], pad: int) -> None:
        self.encoded, self.targets, self.pad = encoded, targets, pad

    def __len__(self) -> int:
        return len(self.encoded)

    def batch(self, indices: list[int]) -> dict[str, Any]:
        import torch

        from slmforge.train import right_padded

        items = [(torch.tensor(self.encoded[i]), torch.tensor(self.encoded[i])) for i in indices]
        b = right_padded(items, self.pad)
        return {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"],
                "labels": torch.tensor([self.targets[i] for i in indices], dtype=torch.float32)}

    def tokens_in(self, batch: dict[str, Any]) -> int:
        return int(batch["attention_mask"].sum())


def predict(model: Any, source: RegressionExamples, batch_size: int = 64) -> list[float]:
    """The model's outputs (standardised units) for every example of ``source``, in order."""
    import torch

    model.eval()
    out: list[float] = []
    with torch.no_grad():
        for start in range(0, len(source), batch_size):
            b = source.batch(list(range(start, min(len(source), start + batch_size))))
            out += model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, 0].tolist()
    return out


def property_plan(cfg: ProjectConfig) -> Plan:
    """What ``train_property`` would write. Raises ArtifactError when bio-tokenizer (or the base) is missing."""
    p = cfg.bio.property
    parents = [parent_ref(output_dir(cfg, "bio-tokenizer"), "tokenizer"), source_ref(cfg, p.source)]
    if p.base:
        parents.append(model_ref(cfg.resolve(p.base)))
    return Plan("property-model", {"property": p.model_dump(mode="json"), "seed": cfg.project.seed}, parents)


def property_splits(cfg: ProjectConfig) -> tuple[dict[str, list[dict]], dict[str, int]]:
    """The property set canonicalised, deduplicated (values averaged) and split by scaffold.

    Raises:
        DataError: Fewer than 10 molecules with values.
    """
    p = cfg.bio.property
    counts: Counter[str] = Counter()
    molecules = [m for m in read_molecules(p.source, cfg.base_dir, p.value_field) if m.value is not None]
    kept = prepare_molecules(molecules, cfg.bio.data.max_length, counts)
    if len(kept) < 10:
        raise DataError(f"bio.property.source {p.source!r} has {len(kept)} valid molecules with values; need 10 or more.")
    splits = split_molecules(kept, cfg.bio.data.split.val or 0.1, cfg.bio.data.split.test or 0.1)
    return splits, {"read": len(molecules), **dict(counts), **{f"{s}_molecules": len(splits[s]) for s in SPLITS}}


def _encoder(cfg: ProjectConfig, tok: Any) -> Any:
    import torch
    from transformers import AutoModelForSequenceClassification, EsmForSequenceClassification

    torch.manual_seed(cfg.project.seed)
    p = cfg.bio.property
    if p.base:
        return AutoModelForSequenceClassification.from_pretrained(
            str(cfg.resolve(p.base)), num_labels=1, problem_type="regression")
    return EsmForSequenceClassification(encoder_config(p, tok, num_labels=1))


def fit_encoder(cfg: ProjectConfig, splits: dict[str, list[dict]], tok: Any, work: Path, run_key: dict[str, Any],
                   progress: bool, log: Callable[[str], None] | None) -> tuple[Any, dict[str, list[float]], Any]:
    """Train the regression head of ``bio.property`` on ``splits`` (records with smiles and value) with the one
    loop, on standardised targets.

    Returns:
        (the model, its predictions per split in the property's own units, the loop's result).
    """
    import numpy as np

    from slmforge.train import run_loop

    p = cfg.bio.property
    y = np.asarray([r["value"] for r in splits["train"]])
    mean, std = float(y.mean()), float(y.std()) or 1.0
    sources = {s: RegressionExamples(encode([r["smiles"] for r in rows], tok, p.seq_len),
                                     [(r["value"] - mean) / std for r in rows], tok.pad_token_id)
               for s, rows in splits.items()}
    model = _encoder(cfg, tok)
    res = run_loop(model, sources["train"], sources["val"] if len(sources["val"]) else None, p, work,
                   cfg.project.seed, run_key, "property head", progress, log)
    model.to("cpu")
    return model, {s: [v * std + mean for v in predict(model, src)] for s, src in sources.items()}, res


def train_property(cfg: ProjectConfig, command: list[str] | None = None, progress: bool = True,
                   log: Callable[[str], None] | None = None) -> BioResult:
    """Fit the three predictors of ``bio.property`` and write ``bio-property``: the encoder (a Hugging Face
    folder), ``predictions.jsonl`` for the test scaffolds, ``parity.png``, and RMSE / MAE / R^2 of each.

    Raises:
        ConfigError: bio.kind is not smiles, or rdkit / scikit-learn is missing.
        DataError: Too few molecules with values.
    """
    from transformers.utils import logging as hf_logging

    from slmforge.tokenizer import load_tokenizer
    from slmforge.train import plot_losses, work_dir_for

    if cfg.bio.kind != "smiles":
        raise ConfigError("bio-property predicts a molecular property: it needs bio.kind: smiles.")
    chem.require("sklearn")
    plan = property_plan(cfg)
    splits, counts = property_splits(cfg)
    tok = load_tokenizer(output_dir(cfg, "bio-tokenizer"))
    out = output_dir(cfg, "bio-property")
    run_key = {"config": plan.config, "parents": [p["fingerprint"] for p in plan.parents]}
    model, encoder_pred, res = fit_encoder(cfg, splits, tok, work_dir_for(out), run_key, progress, log)
    ridge_pred, alpha = ridge_baseline(splits, cfg.bio.property.ridge_alphas, cfg.bio.property.fingerprint_bits)
    train_mean = sum(r["value"] for r in splits["train"]) / len(splits["train"])
    predictions = {"encoder": encoder_pred, "fingerprint_ridge": ridge_pred,
                   "mean": {s: [train_mean] * len(rows) for s, rows in splits.items()}}
    scores = {name: {s: regression_scores([r["value"] for r in splits[s]], pred[s]) for s in ("val", "test") if splits[s]}
              for name, pred in predictions.items()}
    with plan.writer(out, command) as w:
        hf_logging.disable_progress_bar()  # its "Writing model shards" bar would interleave with our log
        model.save_pretrained(str(w.path))
        tok.save_pretrained(str(w.path))
        rows = [{"smiles": r["smiles"], "scaffold": r["scaffold"], "value": r["value"],
                 **{name: round(pred["test"][i], 4) for name, pred in predictions.items()}}
                for i, r in enumerate(splits["test"])]
        (w.path / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        _plot_parity(rows, w.path / "parity.png", cfg.bio.property.source)
        if res.log:
            plot_losses(res.log, w.path / "loss.png", "property head (standardised MSE)")
        w.metrics.update({"source": cfg.bio.property.source, **counts, "ridge_alpha": alpha, "scores": scores,
                          "encoder_steps": res.steps, "encoder_seconds": round(res.seconds, 2),
                          "shared_scaffolds": shared_scaffolds(splits)})
    if log:
        t = {k: v.get("test", {}) for k, v in scores.items()}
        log("bio-property: test RMSE " + ", ".join(f"{k} {v.get('rmse')}" for k, v in t.items()) + f" -> {out}")
    return BioResult(out.resolve(), dict(w.metrics))


def _plot_parity(rows: list[dict], path: Path, title: str) -> None:
    """Predicted against measured on the test scaffolds, one colour per predictor."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5), dpi=110)
    measured = [r["value"] for r in rows]
    for name, colour in (("mean", "#999999"), ("fingerprint_ridge", "#3b75af"), ("encoder", "#d62728")):
        ax.scatter(measured, [r[name] for r in rows], s=8, alpha=0.6, color=colour, label=name)
    if measured:
        lo, hi = min(measured), max(measured)
        ax.plot([lo, hi], [lo, hi], color="black", linewidth=0.8)
    ax.set_xlabel("measured")
    ax.set_ylabel("predicted")
    ax.set_title(f"{title}: test scaffolds")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
