"""The first two stages of the smiles and protein recipes: ``bio-data`` (molecules canonicalised,
filtered, deduplicated and split by scaffold; or protein sequences split and cut to length) and
``bio-tokenizer`` (the SMILES regex or amino-acid tokenizer).

``bio-data`` writes a ``dataset`` artifact in the layout the data stage uses (``text/<split>.jsonl``,
one molecule or sequence per document), so the existing train stage pretrains a SMILES GPT on it
unchanged; ``records/<split>.jsonl`` keep the per-molecule fields (canonical SMILES, scaffold).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slmforge.artifacts import Plan, files_fingerprint, output_dir, parent_ref
from slmforge.bio import chem
from slmforge.bio.sources import MOLECULE_SOURCES, Molecule, Protein, rdkit_file, read_molecules, read_proteins
from slmforge.config import ProjectConfig
from slmforge.errors import DataError

SPLITS = ("train", "val", "test")


@dataclass
class BioResult:
    """What a bio stage made: its folder and the numbers in its manifest."""

    path: Path
    metrics: dict[str, Any]


def download_dir(cfg: ProjectConfig) -> Path:
    """Where downloaded source files (Biopython's sources) are kept: ``<project.out_dir>/downloads``."""
    return cfg.resolve(cfg.project.out_dir) / "downloads"


def source_ref(cfg: ProjectConfig, source: str) -> dict[str, str]:
    if source in MOLECULE_SOURCES:
        path = rdkit_file(source)
    elif source == "biopython-tests":
        from slmforge.bio.sources import BIOPYTHON_SDIST

        path = download_dir(cfg) / BIOPYTHON_SDIST
    else:
        path = cfg.resolve(source)
    if not path.exists():
        raise DataError(f"bio.data source {source!r}: {path} does not exist.")
    return {"path": str(path), "kind": "source", "fingerprint": files_fingerprint(path)}


def data_plan(cfg: ProjectConfig) -> Plan:
    """What ``make_bio_data`` would write (its fingerprint covers the sources' names, sizes and times).

    Raises:
        DataError: A source is missing.
    """
    # bio.data.augment came later: at its default it stays out, so existing datasets stay current
    data = cfg.bio.data.model_dump(mode="json", exclude={"augment"} if cfg.bio.data.augment == 1 else None)
    config = {"kind": cfg.bio.kind, "data": data, "seed": cfg.project.seed}
    return Plan("dataset", config, [source_ref(cfg, s) for s in cfg.bio.data.sources])


def _seeded_subset(items: list[Any], limit: int | None, seed: int) -> list[Any]:
    if limit is None or len(items) <= limit:
        return items
    import numpy as np

    keep = sorted(np.random.default_rng(seed).permutation(len(items))[:limit].tolist())
    return [items[i] for i in keep]


def prepare_molecules(molecules: list[Molecule], max_tokens: int, counts: Counter[str]) -> list[Molecule]:
    """Canonical, valid, unique molecules of at most ``max_tokens`` SMILES tokens, in input order.

    Duplicates (same canonical SMILES) are merged: their values averaged. ``counts`` gets how many
    were invalid, duplicate or too long.
    """
    from slmforge.bio.tokenizers import smiles_tokens

    seen: dict[str, list[float]] = {}
    kept: dict[str, Molecule] = {}
    for m in molecules:
        canonical = chem.canonical_smiles(m.smiles)
        if canonical is None:
            counts["invalid"] += 1
            continue
        tokens = smiles_tokens(canonical)
        if tokens is None or len(tokens) > max_tokens:
            counts["too_long" if tokens else "untokenizable"] += 1
            continue
        if canonical in kept:
            counts["duplicates"] += 1
        else:
            kept[canonical] = Molecule(canonical, None, m.name)
        if m.value is not None:
            seen.setdefault(canonical, []).append(m.value)
    for canonical, values in seen.items():
        kept[canonical].value = sum(values) / len(values)
    return list(kept.values())


def split_molecules(molecules: list[Molecule], val: float, test: float) -> dict[str, list[dict[str, Any]]]:
    """Records per split, by Bemis-Murcko scaffold (``chem.scaffold_split``)."""
    smiles = [m.smiles for m in molecules]
    assignment = chem.scaffold_split(smiles, val, test)
    out: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
    for m, split in zip(molecules, assignment):
        record: dict[str, Any] = {"smiles": m.smiles, "scaffold": chem.murcko_scaffold(m.smiles)}
        if m.value is not None:
            record["value"] = m.value
        out[split].append(record)
    return out


def _protein_splits(proteins: list[Protein], cfg: ProjectConfig, counts: Counter[str]) -> dict[str, list[dict]]:
    """Unique sequences split at random (seeded), then cut into pieces of at most ``max_length`` residues,
    so that no piece of a held-out protein is in training."""
    import numpy as np

    unique: dict[str, Protein] = {}
    for p in proteins:
        if p.sequence in unique:
            counts["duplicates"] += 1
        unique.setdefault(p.sequence, p)
    items = _seeded_subset(list(unique.values()), cfg.bio.data.max_records, cfg.project.seed)
    order = np.random.default_rng(cfg.project.seed).permutation(len(items))
    n_test = round(cfg.bio.data.split.test * len(items))
    n_val = round(cfg.bio.data.split.val * len(items))
    out: dict[str, list[dict]] = {s: [] for s in SPLITS}
    size = cfg.bio.data.max_length
    for rank, i in enumerate(order.tolist()):
        split = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
        p = items[i]
        for k in range(0, len(p.sequence), size):
            piece = p.sequence[k : k + size]
            if len(piece) >= 8:
                out[split].append({"id": p.id if k == 0 else f"{p.id}/{k}", "sequence": piece})
    return out


def _write_splits(folder: Path, splits: dict[str, list[dict]], text_key: str, augment: int = 1, seed: int = 0) -> None:
    """``records/`` and ``text/`` per split; with ``augment`` > 1 the training text holds each molecule's
    canonical SMILES then up to ``augment`` - 1 randomized ones (held-out splits stay canonical)."""
    for split, records in splits.items():
        texts = [r[text_key] for r in records]
        if augment > 1 and split == "train":
            from slmforge.bio.chem import randomized_smiles

            texts = [t for i, s in enumerate(texts) for t in [s, *randomized_smiles(s, augment - 1, seed + i)]]
        for sub, rows in (("records", records), ("text", [{"text": t} for t in texts])):
            (folder / sub).mkdir(parents=True, exist_ok=True)
            (folder / sub / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def make_bio_data(cfg: ProjectConfig, command: list[str] | None = None,
                  log: Callable[[str], None] | None = None) -> BioResult:
    """Read ``bio.data.sources`` and write the ``bio-data`` dataset artifact.

    Raises:
        ConfigError: rdkit or Biopython is missing (``pip install slmforge[bio]``).
        DataError: A source is missing or unreadable, or nothing valid is left.
    """
    plan = data_plan(cfg)
    counts: Counter[str] = Counter()
    if cfg.bio.kind == "smiles":
        molecules = [m for s in cfg.bio.data.sources for m in read_molecules(s, cfg.base_dir)]
        counts["read"] = len(molecules)
        kept = _seeded_subset(prepare_molecules(molecules, cfg.bio.data.max_length, counts),
                              cfg.bio.data.max_records, cfg.project.seed)
        splits = split_molecules(kept, cfg.bio.data.split.val, cfg.bio.data.split.test)
        text_key = "smiles"
    else:
        proteins = [p for s in cfg.bio.data.sources for p in read_proteins(s, cfg.base_dir, download_dir(cfg))]
        counts["read"] = len(proteins)
        splits = _protein_splits(proteins, cfg, counts)
        text_key = "sequence"
    if not splits["train"]:
        raise DataError(f"bio.data: nothing left to train on from {cfg.bio.data.sources} ({dict(counts)}).")
    out = output_dir(cfg, "bio-data")
    with plan.writer(out, command) as w:
        augment = cfg.bio.data.augment if cfg.bio.kind == "smiles" else 1
        _write_splits(w.path, splits, text_key, augment, cfg.project.seed)
        w.metrics.update(_data_metrics(cfg.bio.kind, splits, counts))
    if log:
        log(f"bio-data: {', '.join(f'{k} {len(v)}' for k, v in splits.items())} -> {out}")
    return BioResult(out.resolve(), dict(w.metrics))


def _data_metrics(kind: str, splits: dict[str, list[dict]], counts: Counter[str]) -> dict[str, Any]:
    metrics: dict[str, Any] = {"kind": kind, **dict(counts), **{f"{s}_records": len(r) for s, r in splits.items()}}
    if kind == "smiles":
        metrics["scaffolds"] = {s: len({r["scaffold"] for r in rows}) for s, rows in splits.items()}
        metrics["shared_scaffolds"] = shared_scaffolds(splits)
    else:
        metrics["residues"] = {s: sum(len(r["sequence"]) for r in rows) for s, rows in splits.items()}
    return metrics


def shared_scaffolds(splits: dict[str, list[dict[str, Any]]]) -> int:
    """How many scaffolds occur in more than one split (0 for a scaffold split)."""
    seen: Counter[str] = Counter()
    for rows in splits.values():
        seen.update({r["scaffold"] for r in rows})
    return sum(1 for n in seen.values() if n > 1)


def read_records(data: Path, split: str) -> list[dict[str, Any]]:
    """The records of one split of a ``bio-data`` artifact."""
    from slmforge.data import read_jsonl

    return read_jsonl(data / "records" / f"{split}.jsonl")


# --------------------------------------------------------------------------- tokenizer


def tokenizer_plan(cfg: ProjectConfig) -> Plan:
    """What ``make_bio_tokenizer`` would write. Raises ArtifactError when bio-data is missing."""
    return Plan("tokenizer", {"kind": cfg.bio.kind}, [parent_ref(output_dir(cfg, "bio-data"), "dataset")])


def make_bio_tokenizer(cfg: ProjectConfig, command: list[str] | None = None,
                       log: Callable[[str], None] | None = None) -> BioResult:
    """The SMILES tokenizer (vocabulary from the training molecules) or the amino-acid one, as a Hugging Face
    tokenizer folder with a manifest; its metrics say how many held-out strings it round-trips.

    Raises:
        ArtifactError: The bio-data artifact is missing.
    """
    from slmforge.bio.tokenizers import protein_tokenizer, save_tokenizer, smiles_tokenizer

    plan = tokenizer_plan(cfg)
    data = output_dir(cfg, "bio-data")
    key = "smiles" if cfg.bio.kind == "smiles" else "sequence"
    from slmforge.data import iter_jsonl

    train = [r["text"] for r in iter_jsonl(data / "text" / "train.jsonl")]  # randomized SMILES too, if any
    tok = smiles_tokenizer(train) if cfg.bio.kind == "smiles" else protein_tokenizer()
    heldout = [r[key] for s in ("val", "test") for r in read_records(data, s)]
    exact = sum(1 for s in heldout if tok.decode(tok(s, add_special_tokens=False)["input_ids"]) == s)
    out = output_dir(cfg, "bio-tokenizer")
    with plan.writer(out, command) as w:
        save_tokenizer(tok, w.path)
        w.metrics.update({"kind": cfg.bio.kind, "vocab_size": len(tok), "heldout": len(heldout),
                          "heldout_round_trip": round(exact / max(len(heldout), 1), 4)})
    if log:
        log(f"bio-tokenizer: {len(tok)} tokens -> {out}")
    return BioResult(out.resolve(), dict(w.metrics))
