"""`slmforge tokenizer`: train a domain byte-level BPE tokenizer (or extend an
existing one with domain terms), and compare tokenizers on held-out text.

The artifact folder is a Hugging Face tokenizer folder (``tokenizer.json``,
``tokenizer_config.json``, ``chat_template.jinja``) plus ``analysis.json`` and
the slmforge ``manifest.json``; ``transformers.AutoTokenizer.from_pretrained``
loads it directly.

tokenizers and transformers are imported only inside the functions, so
importing this package stays cheap.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from slmforge.artifacts import Plan, output_dir, parent_ref
from slmforge.config import ProjectConfig
from slmforge.errors import TokenizerError
from slmforge.tokenizer._bpe import read_merges
from slmforge.tokenizer._chat import chatml_template
from slmforge.tokenizer._corpus import SPLITS, dataset_folder, iter_texts

__all__ = [
    "TokenizerResult",
    "TokenizerStats",
    "train_tokenizer",
    "tokenizer_plan",
    "load_tokenizer",
    "heldout_texts",
    "analyze_tokenizers",
    "format_stats_table",
    "chatml_template",
    "read_merges",
]

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


@dataclass
class TokenizerResult:
    """What ``train_tokenizer`` made."""

    path: Path  # the artifact folder
    vocab_size: int  # final vocabulary size, len(tokenizer)
    domain_terms: list[str]  # terms that are now single tokens
    metrics: dict[str, Any]  # what went into the manifest


@dataclass
class TokenizerStats:
    """One tokenizer measured on a set of texts (special tokens not counted)."""

    name: str
    documents: int
    words: int  # whitespace-separated
    chars: int
    bytes: int  # UTF-8
    tokens: int
    fertility: float  # tokens per word: lower is better
    chars_per_token: float
    bytes_per_token: float
    byte_fallback_rate: float  # share of tokens that are bare bytes (byte-level BPE) or unknown (others)
    unk_rate: float  # share of unknown tokens (always 0 for byte-level BPE)


def _dataset_dir(cfg: ProjectConfig) -> Path:
    """The dataset the tokenizer learns from: ``tokenizer.data``, else the data stage's output."""
    return cfg.resolve(cfg.tokenizer.data) if cfg.tokenizer.data else output_dir(cfg, "data")


def tokenizer_plan(cfg: ProjectConfig) -> Plan:
    """What ``train_tokenizer`` would write: what decides whether an existing tokenizer is current.

    Raises:
        ArtifactError: The dataset artifact is missing.
    """
    return Plan("tokenizer", cfg.tokenizer.model_dump(mode="json"), [parent_ref(_dataset_dir(cfg), "dataset")])


def train_tokenizer(
    cfg: ProjectConfig,
    data: str | Path | None = None,
    out: str | Path | None = None,
    command: list[str] | None = None,
    progress: bool = True,
) -> TokenizerResult:
    """Make the tokenizer artifact: ``tokenizer.method`` train (a new byte-level BPE)
    or extend (add domain terms to ``tokenizer.base``).

    Args:
        cfg: The project config; its ``tokenizer`` section decides everything.
        data: The dataset artifact (default: ``tokenizer.data``, else ``<out_dir>/data``).
        out: The output folder (default: ``tokenizer.out``, else ``<out_dir>/tokenizer``).
        command: Recorded in the manifest (default: ``sys.argv``).
        progress: Show progress bars on stderr.

    Returns:
        The artifact's path, final vocabulary size, domain terms and metrics.

    Raises:
        TokenizerError: No dataset artifact or no training text, a bad base tokenizer,
            or a vocabulary too small for the domain terms.
    """
    from slmforge.tokenizer import _stage

    return _stage.run(cfg, data=data, out=out, command=command, progress=progress)


def load_tokenizer(path: str | Path) -> Any:
    """Load a Hugging Face tokenizer folder (or a hub id when online).

    Returns:
        A ``transformers`` fast tokenizer (``PreTrainedTokenizerFast``).

    Raises:
        TokenizerError: The folder is missing or holds no loadable tokenizer, or a
            hub id was given while ``HF_HUB_OFFLINE`` is set.
    """
    folder = Path(path).expanduser()
    if folder.is_dir():
        if not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
            raise TokenizerError(
                f"{folder} holds no tokenizer (no tokenizer.json or tokenizer_config.json). Point to the "
                "folder written by `slmforge tokenizer train` or to a Hugging Face tokenizer folder."
            )
        return _from_pretrained(str(folder), str(folder))
    name = str(path)
    if folder.exists():
        raise TokenizerError(f"{folder} is a file; give the folder that holds tokenizer.json instead.")
    if not _HUB_ID.fullmatch(name) or name.startswith("."):
        raise TokenizerError(
            f"Tokenizer folder {folder} does not exist. Run `slmforge tokenizer train` first, or give the "
            "path of a Hugging Face tokenizer folder."
        )
    if _offline():
        raise TokenizerError(
            f"Tokenizer {name!r} is not a local folder, and it cannot be fetched from the Hugging Face hub "
            "because HF_HUB_OFFLINE is set. Download it while online (or copy its folder here) and pass the "
            "folder's path instead."
        )
    return _from_pretrained(name, f"hub model {name!r}")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _from_pretrained(name: str, where: str) -> Any:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(name)
    except Exception as exc:  # transformers raises many kinds; all mean "not a usable tokenizer"
        raise TokenizerError(
            f"Could not load a tokenizer from {where}: {type(exc).__name__}: {exc}. Check that it is a "
            "Hugging Face tokenizer folder (tokenizer.json + tokenizer_config.json) or a valid hub id."
        ) from None
    if not getattr(tok, "is_fast", False):
        raise TokenizerError(
            f"{where} loads as a slow (Python) tokenizer; slmforge needs a fast one with a tokenizer.json."
        )
    return tok


def heldout_texts(data: str | Path, split: str = "val", max_chars: int | None = None) -> list[str]:
    """The texts of one split of a dataset artifact (``text/<split>.jsonl``).

    Args:
        data: The dataset artifact folder.
        split: ``train``, ``val`` or ``test``.
        max_chars: Stop after this many characters in all (the last text is cut).

    Returns:
        The texts, in file order; empty when the split has no file or no documents.

    Raises:
        TokenizerError: Not a dataset artifact, an unknown split, or a malformed line.
    """
    if split not in SPLITS:
        raise TokenizerError(f"Unknown split {split!r}; choose one of: {', '.join(SPLITS)}.")
    folder = dataset_folder(data)
    texts, total = [], 0
    for text in iter_texts(folder / "text" / f"{split}.jsonl"):
        if max_chars is not None and total + len(text) > max_chars:
            if max_chars - total > 0:
                texts.append(text[: max_chars - total])
            break
        texts.append(text)
        total += len(text)
    return texts


def analyze_tokenizers(tokenizers: list[str | Path], texts: list[str]) -> list[TokenizerStats]:
    """Measure each tokenizer on the same texts.

    Args:
        tokenizers: Hugging Face tokenizer folders (or hub ids when online).
        texts: The texts, e.g. ``heldout_texts(data_dir)``.

    Returns:
        One ``TokenizerStats`` per tokenizer, in the given order; ``name`` is the folder name.

    Raises:
        TokenizerError: No tokenizers or no texts, or a tokenizer that does not load.
    """
    if not tokenizers:
        raise TokenizerError("No tokenizers to analyze: give at least one tokenizer folder.")
    if not any(t.strip() for t in texts):
        raise TokenizerError(
            "No text to analyze the tokenizers on (the split is empty). Use another split or a dataset with "
            "held-out documents (data.split.val > 0)."
        )
    from slmforge.tokenizer._analyze import text_stats

    out = []
    for ref in tokenizers:
        name = Path(ref).name if Path(ref).expanduser().is_dir() else str(ref)
        out.append(TokenizerStats(**text_stats(name, load_tokenizer(ref), texts)))
    return out


_ROWS = [
    ("documents", "documents", "{:,}"),
    ("words", "words", "{:,}"),
    ("characters", "chars", "{:,}"),
    ("UTF-8 bytes", "bytes", "{:,}"),
    ("tokens", "tokens", "{:,}"),
    ("fertility (tokens/word, lower is better)", "fertility", "{:.3f}"),
    ("characters/token", "chars_per_token", "{:.3f}"),
    ("bytes/token", "bytes_per_token", "{:.3f}"),
    ("byte-fallback rate", "byte_fallback_rate", "{:.4%}"),
    ("unknown-token rate", "unk_rate", "{:.4%}"),
]


def format_stats_table(stats: list[TokenizerStats]) -> str:
    """A markdown table with one column per tokenizer and one row per measure."""
    assert {f.name for f in fields(TokenizerStats)} >= {key for _, key, _ in _ROWS}
    header = "| measure | " + " | ".join(s.name.replace("|", "\\|") for s in stats) + " |"
    rule = "|---|" + "---:|" * len(stats)
    rows = [
        f"| {label} | " + " | ".join(fmt.format(getattr(s, key)) for s in stats) + " |" for label, key, fmt in _ROWS
    ]
    return "\n".join([header, rule, *rows])
