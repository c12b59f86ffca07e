"""`slmforge model trim-vocab`: a model whose vocabulary is what the domain uses.

A plain function with typer annotations; ``cli/main.py`` registers it under ``model``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from slmforge.cli._options import ConfigOpt, SetOpt, err, out


def trim_vocab(
    model: Annotated[str, typer.Argument(help="The model: a folder, a .gguf file or a hub id (a BPE tokenizer).")],
    out_dir: Annotated[Path, typer.Option("--out", help="Output folder for the trimmed model.")],
    config: ConfigOpt = None,
    set_: SetOpt = None,
    data: Annotated[
        Path | None, typer.Option(help="Dataset artifact whose training split is the domain text "
                                  "(default: the project's data stage output).")] = None,
    text: Annotated[
        list[Path] | None, typer.Option("--text", help="Plain-text files of domain text instead of a dataset "
                                        "(repeatable).")] = None,
    keep: Annotated[
        list[str] | None, typer.Option("--keep", help="A token to keep even if the text never uses it (repeatable).")
    ] = None,
) -> None:
    """Keep only the tokens the domain text uses (plus specials and bytes): smaller, faster, same tokens
    on the domain text; other text falls back to shorter pieces."""
    from slmforge.artifacts import output_dir, parent_ref
    from slmforge.config import load_config
    from slmforge.model.trim import trim_vocab as run
    from slmforge.tokenizer import heldout_texts
    from slmforge.tokenizer.packing import jsonl_texts

    parents = []
    if text:
        texts = [t.read_text(encoding="utf-8", errors="replace") for t in text]
    else:
        folder = Path(data or output_dir(load_config(config, set_ or []), "data"))
        split = folder / "text" / "train.jsonl"
        # Checked as a dataset artifact (one character read), then read a batch at a time, twice.
        texts = jsonl_texts(split) if heldout_texts(folder, "train", max_chars=1) else []
        parents.append(parent_ref(folder))
    result = run(model, texts, out_dir, keep_tokens=keep or [], command=sys.argv, parents=parents,
                 log=lambda m: err.print(m, style="dim"))
    m = result.metrics
    out.print(f"vocabulary {m['vocab_before']:,} -> {m['vocab_after']:,} tokens, parameters "
              f"{m['params_before']:,} -> {m['params_after']:,} ({m['params_after'] / m['params_before']:.1%})")
    out.print(f"  -> {result.path}")
