"""Options and consoles shared by the CLI modules."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

# markup off: paths and user text may contain [brackets]; colour goes through style=.
out = Console(markup=False, highlight=False, soft_wrap=True)
err = Console(stderr=True, markup=False, highlight=False, soft_wrap=True, emoji=False)

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="Project file (default: ./slmforge.yaml if present).")
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a config key: section.key=value (repeatable; value parsed as YAML)."),
]


def load_project(config: Path | None, overrides: list[str] | None):  # type: ignore[no-untyped-def]
    """The project config from ``-c`` (or ./slmforge.yaml) with ``--set`` overrides."""
    from slmforge.config import load_config

    return load_config(config, overrides or [])
