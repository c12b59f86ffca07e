"""`slmforge serve`: an OpenAI-compatible HTTP server over one or more models.

A plain function with typer annotations; ``cli/main.py`` registers it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from slmforge.cli._options import err


def serve(
    models: Annotated[
        list[str],
        typer.Argument(
            help="Model folders, .gguf files or hub ids. Clients name a model by its folder name; "
            "NAME=PATH picks another name.",
            show_default=False,
        ),
    ],
    host: Annotated[str, typer.Option(help="Interface to bind (0.0.0.0 for every interface).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="TCP port.")] = 8000,
    api_keys: Annotated[
        Path | None,
        typer.Option(
            "--api-keys",
            help="File of accepted API keys, one per line (# comments allowed). Clients then send "
            "'Authorization: Bearer KEY'. Keys are kept in memory only as SHA-256 hashes and compared by hash. "
            "Default: no authentication.",
        ),
    ] = None,
    device: Annotated[str, typer.Option(help="auto (CUDA when present), cpu, cuda or cuda:N.")] = "auto",
) -> None:
    """Serve models with OpenAI's API: /v1/models, /v1/completions, /v1/chat/completions (streaming too).

    Try it: slmforge serve runs/sft --port 8000, then
    curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json'
    -d '{"model": "sft", "messages": [{"role": "user", "content": "hi"}]}'
    """
    from slmforge.serve import parse_model_ref, serve as run_server

    for ref in models:
        name, path = parse_model_ref(ref)
        err.print(f"model {name} <- {path}", style="dim")
    if api_keys is None and host not in ("127.0.0.1", "localhost", "::1"):
        err.print(f"warning: serving on {host} without --api-keys; anyone who can reach it can use it.",
                  style="yellow")
    run_server(models, host=host, port=port, api_keys_file=api_keys, device=device)
