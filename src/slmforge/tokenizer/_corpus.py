"""Reading the text of a dataset artifact (light: no heavy imports)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from slmforge.errors import ArtifactError, TokenizerError

SPLITS = ("train", "val", "test")


def dataset_folder(data: str | Path) -> Path:
    """Check that ``data`` is a dataset artifact; return it as a Path."""
    from slmforge.artifacts import read_manifest

    folder = Path(data)
    hint = (
        "The tokenizer learns from text/train.jsonl of the folder written by `slmforge data`: run that first, "
        "or point tokenizer.data (or --data) at a dataset folder."
    )
    if not folder.exists():
        raise TokenizerError(f"No dataset artifact at {folder} (the folder does not exist). {hint}")
    try:
        read_manifest(folder, kind="dataset")
    except ArtifactError as exc:
        raise TokenizerError(f"{exc} {hint}") from None
    return folder


def iter_texts(file: Path) -> Iterator[str]:
    """Yield the ``text`` of each JSON line of ``file`` (nothing if the file does not exist)."""
    if not file.is_file():
        return
    with open(file, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)["text"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise TokenizerError(
                    f"{file}, line {n}: not a JSON object with a \"text\" field. The dataset artifact is damaged; "
                    "re-run `slmforge data`."
                ) from None
            if isinstance(text, str) and text:
                yield text
