"""Biomolecular SLMs: the ``smiles`` and ``protein`` recipes (issue 14).

    from slmforge import load_config
    from slmforge.bio import make_bio_data, make_bio_tokenizer, sample_molecules, train_property, train_mlm
    cfg = load_config("slmforge.yaml")   # from `slmforge init DIR --template smiles`
    make_bio_data(cfg)                   # runs/bio-data: canonical SMILES split by scaffold
    make_bio_tokenizer(cfg)              # runs/bio-tokenizer: the SMILES regex tokenizer (tokenizer.json)
    # `slmforge train` pretrains the SMILES GPT on them (train.data / train.tokenizer point there)
    sample_molecules(cfg)                # runs/bio-sample: validity, uniqueness, novelty, property plots
    train_property(cfg)                  # runs/bio-property: encoder head vs fingerprint + ridge vs mean

Every step writes an artifact folder with a manifest, and ``slmforge run`` skips the current ones.
RDKit, Biopython and scikit-learn come with ``pip install slmforge[bio]`` and are imported only
inside the functions that use them.
"""

from __future__ import annotations

from slmforge.bio.chem import (
    DESCRIPTORS,
    GenerationMetrics,
    canonical_smiles,
    descriptors,
    generation_metrics,
    morgan_fingerprints,
    murcko_scaffold,
    scaffold_split,
)
from slmforge.bio.mlm import alphabet_report, mlm_plan, train_mlm
from slmforge.bio.property import property_plan, train_property
from slmforge.bio.sample import sample_molecules, sample_plan
from slmforge.bio.sources import AMINO_ACIDS, Molecule, Protein, clean_protein, read_fasta, read_molecules
from slmforge.bio.stages import BioResult, data_plan, make_bio_data, make_bio_tokenizer, tokenizer_plan
from slmforge.bio.tokenizers import SMILES_PATTERN, protein_tokenizer, smiles_tokenizer, smiles_tokens

__all__ = [
    "AMINO_ACIDS", "DESCRIPTORS", "SMILES_PATTERN", "BioResult", "GenerationMetrics", "Molecule", "Protein",
    "alphabet_report", "canonical_smiles", "clean_protein", "data_plan", "descriptors", "generation_metrics",
    "make_bio_data", "make_bio_tokenizer", "mlm_plan", "morgan_fingerprints", "murcko_scaffold",
    "property_plan", "protein_tokenizer", "read_fasta", "read_molecules", "sample_molecules", "sample_plan",
    "scaffold_split", "smiles_tokenizer", "smiles_tokens", "tokenizer_plan", "train_mlm", "train_property",
]
