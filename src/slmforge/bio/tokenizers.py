"""Tokenizers for molecules and proteins, saved as Hugging Face ``tokenizer.json`` folders so that
every model trained on them opens in ``transformers`` like any other.

SMILES: the atom-level regular expression of Schwaller et al., "Molecular Transformer" (ACS Cent.
Sci. 2019), used by MolGPT and most SMILES language models: bracket atoms, two-letter halogens,
organic-subset atoms, bonds, branches and ring closures are one token each. Proteins: one token
per residue over the 20 standard amino acids plus X. Both are word-level vocabularies with a
``Fuse`` decoder, so ``decode(encode(s)) == s`` for every string the vocabulary covers.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from slmforge.bio.sources import AMINO_ACIDS

SMILES_PATTERN = (
    r"(\[[^\]]+]|Br?|Cl?|N|O|S|P|F|I|b|c|n|o|s|p|\(|\)|\.|=|#|-|\+|\\|\/|:|~|@|\?|>|\*|\$|\%[0-9]{2}|[0-9])"
)
_SMILES_RE = re.compile(SMILES_PATTERN)

# Special tokens of both tokenizers, in this order (ids 0-4).
SPECIALS = {"pad": "<pad>", "bos": "<bos>", "eos": "<eos>", "unk": "<unk>", "mask": "<mask>"}


def smiles_tokens(smiles: str) -> list[str] | None:
    """The atom-level tokens of a SMILES string, or None when the pattern does not cover all of it
    (a character no SMILES token explains)."""
    tokens = _SMILES_RE.findall(smiles)
    return tokens if "".join(tokens) == smiles else None


def _build(vocab_tokens: list[str], split_pattern: str, kind: str) -> Any:
    """A fast tokenizer: the specials, then ``vocab_tokens``, word-level, split by ``split_pattern``."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(list(SPECIALS.values()) + vocab_tokens)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIALS["unk"]))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(split_pattern), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=SPECIALS["bos"], eos_token=SPECIALS["eos"], pad_token=SPECIALS["pad"],
        unk_token=SPECIALS["unk"], mask_token=SPECIALS["mask"],
        model_input_names=["input_ids", "attention_mask"], clean_up_tokenization_spaces=False,
    )
    tok.init_kwargs["slmforge_alphabet"] = kind  # saved into tokenizer_config.json
    return tok


def smiles_tokenizer(corpus: Iterable[str], min_frequency: int = 1) -> Any:
    """A SMILES tokenizer whose vocabulary is the regex tokens of ``corpus`` seen ``min_frequency`` times
    (sorted by count, then text); others become ``<unk>``."""
    counts: Counter[str] = Counter()
    for s in corpus:
        counts.update(smiles_tokens(s) or [])
    tokens = [t for t, c in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if c >= min_frequency]
    return _build(tokens, SMILES_PATTERN, "smiles")


def protein_tokenizer() -> Any:
    """One token per residue: the 20 standard amino acids and X."""
    return _build(list(AMINO_ACIDS + "X"), r".", "protein")


def save_tokenizer(tok: Any, folder: Path) -> None:
    """``tokenizer.json`` + ``tokenizer_config.json`` (+ special tokens map) into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(folder))
