"""`slmforge keys`: API keys for `slmforge serve`, kept as SHA-256 digests in a JSON-lines file.

A typer sub-app; ``cli/main.py`` registers it as ``keys``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from slmforge.cli._options import err, out

keys_app = typer.Typer(no_args_is_help=True, help="API keys for `slmforge serve` (stored hashed, never in clear).")

FileOpt = Annotated[Path, typer.Option("--file", "-f", help="The keys file (JSON lines) that `serve --api-keys` reads.")]
_DEFAULT_FILE = Path("keys.jsonl")


@keys_app.command("add")
def keys_add(
    name: Annotated[str, typer.Argument(help="A name for the key (shown in usage and logs).", show_default=False)],
    file: FileOpt = _DEFAULT_FILE,
    rpm: Annotated[int | None, typer.Option("--rpm", min=1, help="Requests per minute (default: no limit).")] = None,
    tpm: Annotated[int | None, typer.Option("--tpm", min=1, help="Tokens per minute (default: no limit).")] = None,
    quota: Annotated[int | None, typer.Option("--quota", min=1, help="Total tokens while the server runs (default: no limit).")] = None,
) -> None:
    """Create a random key and print it once: only its SHA-256 digest is written to the file."""
    from slmforge.serve import add_key

    key = add_key(file, name, requests_per_min=rpm, tokens_per_min=tpm, quota_tokens=quota)
    err.print(f"added {name} to {file}; the key is shown only now:", style="dim")
    print(key)  # plain print: meant to be copied or piped


@keys_app.command("list")
def keys_list(file: FileOpt = _DEFAULT_FILE) -> None:
    """Key names, creation times and limits (never the keys)."""
    from slmforge.serve import read_keys_file

    def limit(v: int | None) -> str:
        return "-" if v is None else str(v)

    out.print(f"{'name':<20} {'created':<21} {'req/min':>8} {'tok/min':>9} {'quota':>10}")
    for k in read_keys_file(file, allow_empty=True):
        out.print(f"{k.name:<20} {k.created or '-':<21} {limit(k.requests_per_min):>8} "
                  f"{limit(k.tokens_per_min):>9} {limit(k.quota_tokens):>10}")


@keys_app.command("revoke")
def keys_revoke(
    name: Annotated[str, typer.Argument(help="The key's name.", show_default=False)],
    file: FileOpt = _DEFAULT_FILE,
) -> None:
    """Remove a key; a running server keeps it until restarted."""
    from slmforge.serve import revoke_key

    revoke_key(file, name)
    out.print(f"revoked {name} in {file} (restart the server to apply)")


@keys_app.command("usage")
def keys_usage(
    usage_file: Annotated[Path, typer.Argument(help="The file `slmforge serve --usage-file` wrote on shutdown.", show_default=False)],
    fmt: Annotated[str, typer.Option("--format", help="json or csv.")] = "json",
) -> None:
    """Print the usage per key and, within a key, per end user (the requests' `user` field) as JSON or CSV."""
    from slmforge.serve import usage_csv

    if fmt not in ("json", "csv"):
        raise typer.BadParameter("choose json or csv", param_hint="--format")
    try:
        rows = json.loads(usage_file.read_text(encoding="utf-8"))["data"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise typer.BadParameter(f"{usage_file} is not a usage file ({exc})") from None
    print(json.dumps(rows, indent=2) if fmt == "json" else usage_csv(rows), end="\n" if fmt == "json" else "")
