"""`slmforge ui`: the web dashboard (runs, lineage, comparisons, live runs, playground) of one or more projects.

A plain function with typer annotations; ``cli/main.py`` registers it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from slmforge.cli._options import SetOpt, err


def ui(
    config: Annotated[
        list[Path] | None,
        typer.Option("--config", "-c", help="Project file (repeatable: several projects on one page; "
                     "default: ./slmforge.yaml if present)."),
    ] = None,
    set_: SetOpt = None,
    model: Annotated[
        list[str] | None,
        typer.Option("--model", "-m", help="A model the playground chats with (folder, .gguf, ONNX export; NAME=PATH; "
                     "repeatable). Default: the first project's serve.models, else its sft/train output, if any."),
    ] = None,
    host: Annotated[str | None, typer.Option(help="Interface to bind (default serve.host: 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(min=1, max=65535, help="TCP port (default serve.port: 8000).")] = None,
    api_keys: Annotated[
        Path | None,
        typer.Option("--api-keys", help="Keys file (`slmforge keys add`): the dashboard and the API then need a key; "
                     "required off loopback. Default: serve.api_keys."),
    ] = None,
) -> None:
    """Open the dashboard at http://HOST:PORT/ui/ (the OpenAI-compatible API runs beside it under /v1).

    It shows every artifact of the projects with its status, size, metrics, integrity and lineage;
    loss curves and evaluation rows; starts runs, single stages and A/B comparisons with live progress
    (they keep running when the page closes); and chats with the served models. Needs
    pip install slmforge[ui].
    """
    from slmforge.cli.serve_cmd import keys_file
    from slmforge.config import load_config
    from slmforge.serve import serve as run_server
    from slmforge.ui import project

    paths: list[Path | None] = list(config or [None])
    projects = [project(p, set_ or []) for p in paths]
    cfg = load_config(paths[0], set_ or [])
    keys = keys_file(cfg, host, api_keys)
    bind, at = host or cfg.serve.host, port or cfg.serve.port
    err.print(f"dashboard: http://{bind}:{at}/ui/", style="bold")
    run_server(model or None, cfg=cfg, host=host, port=port, api_keys_file=keys, ui=projects)
