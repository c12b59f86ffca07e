"""Chemistry with RDKit: canonical SMILES, Bemis-Murcko scaffolds and the scaffold split, the
descriptors the SMILES recipe reports (MW, logP, QED, TPSA), Morgan fingerprints, and the
validity / uniqueness / novelty of generated molecules (as MOSES and GuacaMol define them).

RDKit is imported inside the functions: it comes with ``pip install slmforge[bio]``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from slmforge.errors import ConfigError

DESCRIPTORS = ("MW", "logP", "QED", "TPSA")


def require(module: str) -> Any:
    """Import one of the bio extra's packages, or say how to install it.

    Raises:
        ConfigError: The package is missing (``pip install slmforge[bio]``).
    """
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"The smiles and protein recipes need {module.split('.')[0]}: pip install slmforge[bio]") from None


def _quiet_rdkit() -> Any:
    """RDKit's Chem module with its parse warnings off (an invalid sample is counted, not printed)."""
    chem = require("rdkit.Chem")
    require("rdkit.RDLogger").DisableLog("rdApp.*")
    return chem


def canonical_smiles(smiles: str) -> str | None:
    """RDKit's canonical SMILES (isomeric), or None when the string is not a valid molecule."""
    if not smiles or not smiles.strip():
        return None
    chem = _quiet_rdkit()
    mol = chem.MolFromSmiles(smiles.strip())
    if mol is None or mol.GetNumAtoms() == 0:
        return None
    return str(chem.MolToSmiles(mol))


def randomized_smiles(smiles: str, n: int, seed: int) -> list[str]:
    """Up to ``n`` other SMILES of the same molecule (RDKit's random atom orders, seeded), none equal to
    ``smiles``; fewer when the molecule has fewer spellings."""
    chem = _quiet_rdkit()
    mol = chem.MolFromSmiles(smiles)
    if mol is None or n <= 0:
        return []
    # randomSeed 0 means "unseeded" to RDKit: shift by one so every seed, 0 included, repeats.
    found = dict.fromkeys(chem.MolToRandomSmilesVect(mol, 4 * n, randomSeed=seed + 1))
    return [s for s in found if s != smiles][:n]


def murcko_scaffold(smiles: str) -> str:
    """The Bemis-Murcko scaffold (ring systems and their linkers) as canonical SMILES; ``""`` for a
    molecule without rings (all acyclic molecules share that one scaffold)."""
    chem = _quiet_rdkit()
    scaffolds = require("rdkit.Chem.Scaffolds.MurckoScaffold")
    mol = chem.MolFromSmiles(smiles)
    if mol is None:
        return ""
    return str(scaffolds.MurckoScaffoldSmiles(mol=mol, includeChirality=False))


def scaffold_split(smiles: Sequence[str], val: float, test: float) -> list[str]:
    """Assign each molecule to train, val or test so that no scaffold is in two splits.

    Scaffold groups are taken largest first (ties by scaffold text, so the split is deterministic) and
    fill train up to ``1 - val - test`` of the molecules, then val, then test: the held-out splits get
    the rarer scaffolds, as in MoleculeNet's scaffold split. A group never straddles a boundary.

    Returns:
        One of ``"train"``, ``"val"``, ``"test"`` per molecule, in input order.
    """
    groups: dict[str, list[int]] = {}
    for i, s in enumerate(smiles):
        groups.setdefault(murcko_scaffold(s), []).append(i)
    ordered = sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0]))
    n = len(smiles)
    train_cut, val_cut = (1 - val - test) * n, (1 - test) * n
    out = ["train"] * n
    filled = 0
    for _, members in ordered:
        end = filled + len(members)
        split = "train" if end <= train_cut or filled == 0 else "val" if end <= val_cut else "test"
        for i in members:
            out[i] = split
        filled += len(members)
    return out


def descriptors(smiles: str) -> dict[str, float] | None:
    """MW (g/mol), Crippen logP, QED and TPSA of a molecule; None when it does not parse."""
    chem = _quiet_rdkit()
    mol = chem.MolFromSmiles(smiles)
    if mol is None:
        return None
    desc = require("rdkit.Chem.Descriptors")
    qed = require("rdkit.Chem.QED")
    return {
        "MW": float(desc.MolWt(mol)),
        "logP": float(require("rdkit.Chem.Crippen").MolLogP(mol)),
        "QED": float(qed.qed(mol)),
        "TPSA": float(require("rdkit.Chem.rdMolDescriptors").CalcTPSA(mol)),
    }


def morgan_fingerprints(smiles: Sequence[str], bits: int = 2048, radius: int = 2) -> Any:
    """Morgan (ECFP4 at radius 2) bit vectors as a ``(n, bits)`` uint8 numpy array."""
    import numpy as np

    chem = _quiet_rdkit()
    gen = require("rdkit.Chem.rdFingerprintGenerator").GetMorganGenerator(radius=radius, fpSize=bits)
    out = np.zeros((len(smiles), bits), dtype=np.uint8)
    for i, s in enumerate(smiles):
        mol = chem.MolFromSmiles(s)
        if mol is not None:
            out[i] = gen.GetFingerprintAsNumPy(mol)
    return out


@dataclass
class GenerationMetrics:
    """How good a set of generated SMILES is.

    Attributes:
        samples: Strings generated.
        valid: Of them, those RDKit parses into a non-empty molecule.
        unique: Distinct canonical SMILES among the valid ones.
        novel: Of the unique ones, those not in the training set (compared as canonical SMILES).
    """

    samples: int
    valid: int
    unique: int
    novel: int

    @property
    def validity(self) -> float:
        return self.valid / self.samples if self.samples else 0.0

    @property
    def uniqueness(self) -> float:
        return self.unique / self.valid if self.valid else 0.0

    @property
    def novelty(self) -> float:
        return self.novel / self.unique if self.unique else 0.0

    def to_json(self) -> dict[str, Any]:
        return {"samples": self.samples, "valid": self.valid, "unique": self.unique, "novel": self.novel,
                "validity": round(self.validity, 4), "uniqueness": round(self.uniqueness, 4),
                "novelty": round(self.novelty, 4)}


def generation_metrics(generated: Iterable[str], training: Iterable[str]) -> tuple[GenerationMetrics, list[str]]:
    """Validity, uniqueness and novelty of ``generated`` against the (canonical) ``training`` SMILES.

    Returns:
        The metrics, and the unique valid molecules as canonical SMILES in the order first generated.
    """
    train_set = {c for c in (canonical_smiles(s) for s in training) if c}
    samples, valid = 0, 0
    unique: dict[str, None] = {}
    for s in generated:
        samples += 1
        c = canonical_smiles(s)
        if c is None:
            continue
        valid += 1
        unique.setdefault(c)
    novel = sum(1 for c in unique if c not in train_set)
    return GenerationMetrics(samples, valid, len(unique), novel), list(unique)


def descriptor_table(smiles: Iterable[str]) -> dict[str, list[float]]:
    """Each descriptor of ``DESCRIPTORS`` over the molecules that parse."""
    table: dict[str, list[float]] = {name: [] for name in DESCRIPTORS}
    for s in smiles:
        d = descriptors(s)
        if d is not None:
            for name in DESCRIPTORS:
                table[name].append(d[name])
    return table
