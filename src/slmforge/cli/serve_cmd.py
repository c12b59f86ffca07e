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
            help="Keys file from `slmforge keys add` (SHA-256 hashes and per-key limits), or plain keys one "
            "per line. Clients then send 'Authorization: Bearer KEY'; keys are compared by hash. "
            "Default: no authentication, allowed only on a loopback --host.",
        ),
    ] = None,
    device: Annotated[str, typer.Option(help="auto (CUDA when present), cpu, cuda or cuda:N.")] = "auto",
    max_prompt_chars: Annotated[
        int | None, typer.Option(min=1, help="Refuse longer prompts with a 413 (default: no limit).")] = None,
    max_prompt_tokens: Annotated[
        int | None, typer.Option(min=1, help="Refuse prompts of more tokens with a 413 (default: the context length).")
    ] = None,
    request_timeout: Annotated[
        float | None, typer.Option(min=0.001, help="Seconds of generation per request before a 504 (default: none).")
    ] = None,
    usage_file: Annotated[
        Path | None, typer.Option(help="Write the usage per key here (JSON) on shutdown; read it with `slmforge keys usage`.")
    ] = None,
) -> None:
    """Serve models with OpenAI's API: /v1/models, /v1/completions, /v1/chat/completions (streaming too).

    Try it: slmforge serve runs/sft --port 8000, then
    curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json'
    -d '{"model": "sft", "messages": [{"role": "user", "content": "hi"}]}'.
    Also GET /v1/usage (the caller's usage) and GET /metrics (Prometheus).
    """
    from slmforge.serve import parse_model_ref, serve as run_server

    for ref in models:
        name, path = parse_model_ref(ref)
        err.print(f"model {name} <- {path}", style="dim")
    if api_keys is None and host not in ("127.0.0.1", "localhost", "::1"):
        raise typer.BadParameter(f"serving on {host} needs --api-keys (make one with `slmforge keys add NAME`); "
                                 "only a loopback host may be served open.", param_hint="--api-keys")
    if api_keys is None:
        err.print("serving without authentication (loopback only)", style="dim")
    run_server(models, host=host, port=port, api_keys_file=api_keys, device=device,
               max_prompt_chars=max_prompt_chars, max_prompt_tokens=max_prompt_tokens, usage_file=usage_file,
               request_timeout_s=request_timeout)
