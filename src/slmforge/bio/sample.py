"""``bio-sample``: molecules sampled from the SMILES GPT, scored as MOSES and GuacaMol score generators.

Validity (RDKit parses it), uniqueness (distinct canonical SMILES among the valid) and novelty
(unique ones absent from the training split), and the distributions of MW, logP, QED and TPSA of
the unique valid samples against the training molecules: means, standard deviations and the
Wasserstein-1 distance per property, and a histogram plot (``properties.png``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from slmforge.artifacts import Plan, model_ref, output_dir, parent_ref
from slmforge.bio import chem
from slmforge.bio.stages import BioResult, read_records
from slmforge.config import ProjectConfig
from slmforge.errors import ArtifactError


def _model_dir(cfg: ProjectConfig) -> Path:
    return cfg.resolve(cfg.bio.sample.model) if cfg.bio.sample.model else output_dir(cfg, "train")


def sample_plan(cfg: ProjectConfig) -> Plan:
    """What ``sample_molecules`` would write. Raises ArtifactError when the model or bio-data is missing."""
    model = _model_dir(cfg)
    if not model.exists():
        raise ArtifactError(f"No SMILES model at {model}: run `slmforge train` first (or set bio.sample.model).")
    config = {"sample": cfg.bio.sample.model_dump(mode="json"), "seed": cfg.project.seed}
    return Plan("molecule-samples", config, [model_ref(model), parent_ref(output_dir(cfg, "bio-data"), "dataset")])


def generate_smiles(model_dir: Path, n: int, temperature: float = 1.0, top_k: int | None = None,
                    max_new_tokens: int = 120, batch_size: int = 250, seed: int = 0) -> list[str]:
    """``n`` strings sampled from a causal LM folder, each started from its BOS token and ended at EOS.

    Raises:
        TokenizerError: The folder holds no tokenizer.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from slmforge.tokenizer import load_tokenizer

    tok = load_tokenizer(model_dir)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    torch.manual_seed(seed)
    out: list[str] = []
    with torch.no_grad():
        while len(out) < n:
            rows = min(batch_size, n - len(out))
            start = torch.full((rows, 1), tok.bos_token_id, dtype=torch.long)  # (B, 1)
            ids = model.generate(start, attention_mask=torch.ones_like(start), do_sample=True,
                                 temperature=temperature, top_k=top_k or 0, top_p=1.0, max_new_tokens=max_new_tokens,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
            out += tok.batch_decode(ids[:, 1:], skip_special_tokens=True)
    return out


def distribution_table(generated: list[str], training: list[str]) -> dict[str, dict[str, float]]:
    """Per descriptor: mean and standard deviation of both sets and their Wasserstein-1 distance."""
    import numpy as np

    wasserstein_distance = chem.require("scipy.stats").wasserstein_distance
    gen, ref = chem.descriptor_table(generated), chem.descriptor_table(training)
    table = {}
    for name in chem.DESCRIPTORS:
        g, r = np.asarray(gen[name]), np.asarray(ref[name])
        table[name] = {"train_mean": round(float(r.mean()), 3), "train_std": round(float(r.std()), 3),
                       "generated_mean": round(float(g.mean()), 3) if len(g) else float("nan"),
                       "generated_std": round(float(g.std()), 3) if len(g) else float("nan"),
                       "wasserstein": round(float(wasserstein_distance(g, r)), 4) if len(g) else float("nan")}
    return table


def plot_distributions(generated: list[str], training: list[str], path: Path, title: str) -> None:
    """Histograms of MW, logP, QED and TPSA: training molecules against generated ones."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gen, ref = chem.descriptor_table(generated), chem.descriptor_table(training)
    fig, axes = plt.subplots(2, 2, figsize=(8, 6), dpi=110)
    for ax, name in zip(axes.flat, chem.DESCRIPTORS):
        ax.hist(ref[name], bins=40, density=True, alpha=0.5, color="#3b75af", label=f"train ({len(ref[name])})")
        ax.hist(gen[name], bins=40, density=True, alpha=0.5, color="#d62728", label=f"generated ({len(gen[name])})")
        ax.set_title(name)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def sample_molecules(cfg: ProjectConfig, command: list[str] | None = None,
                     log: Callable[[str], None] | None = None) -> BioResult:
    """Sample ``bio.sample.n`` SMILES from the model and write the ``bio-sample`` artifact: ``samples.jsonl``
    (each string, whether valid, its canonical form), the metrics, and ``properties.png``.

    Raises:
        ArtifactError: The model or the bio-data artifact is missing.
        ConfigError: rdkit is missing (``pip install slmforge[bio]``).
    """
    s = cfg.bio.sample
    plan = sample_plan(cfg)
    training = [r["smiles"] for r in read_records(output_dir(cfg, "bio-data"), "train")]
    generated = generate_smiles(_model_dir(cfg), s.n, s.temperature, s.top_k, s.max_new_tokens, s.batch_size,
                                cfg.project.seed)
    metrics, unique = chem.generation_metrics(generated, training)
    table = distribution_table(unique, training)
    out = output_dir(cfg, "bio-sample")
    with plan.writer(out, command) as w:
        rows = [{"text": g, "canonical": chem.canonical_smiles(g)} for g in generated]
        (w.path / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        plot_distributions(unique, training, w.path / "properties.png",
                           f"{metrics.unique} unique valid samples vs {len(training)} training molecules")
        w.metrics.update({**metrics.to_json(), "properties": table, "examples": unique[:10]})
    if log:
        log(f"bio-sample: validity {metrics.validity:.3f}, uniqueness {metrics.uniqueness:.3f}, "
            f"novelty {metrics.novelty:.3f} -> {out}")
    return BioResult(out.resolve(), dict(w.metrics))
