"""Serving: an OpenAI-compatible HTTP server over any ``Generator``.

    from slmforge.serve import create_app, serve
    serve(["runs/sft", "base=runs/train"], port=8000, api_keys_file="keys.txt")

Endpoints: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions``
(``stream: true`` sends server-sent events ending with ``data: [DONE]``),
``GET /health`` (the process is up) and ``GET /ready`` (models are loaded).
Errors use OpenAI's body, ``{"error": {"message", "type", "param", "code"}}``,
so the official clients raise their usual exceptions.

Generation runs in a thread pool, one request per model at a time (a lock per
model), so the event loop keeps answering while a model works. fastapi and
uvicorn are imported only when an app is built.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from slmforge.errors import ConfigError
from slmforge.serve._hash import hash_api_key

if TYPE_CHECKING:
    import fastapi

    from slmforge.generate import Generator

__all__ = ["create_app", "serve", "parse_model_ref", "read_api_keys", "hash_api_key"]


def read_api_keys(path: str | Path) -> set[str]:
    """The keys in a file, one per line; blank lines and lines starting with ``#`` are skipped.

    Raises:
        ConfigError: The file cannot be read or holds no key.
    """
    file = Path(path).expanduser()
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ConfigError(f"Could not read the API keys file {file}: {exc.strerror or exc}.") from None
    keys = {line.strip() for line in lines if line.strip() and not line.strip().startswith("#")}
    if not keys:
        raise ConfigError(f"The API keys file {file} holds no key; put one key per line.")
    return keys


def parse_model_ref(ref: str) -> tuple[str, str]:
    """``name=path`` -> (name, path); a bare path is named by its folder (or file stem for a .gguf).

    Raises:
        ConfigError: An empty name or path.
    """
    name, sep, path = ref.partition("=")
    if not sep:
        path = ref
        p = Path(ref.rstrip("/\\"))
        name = p.stem if p.suffix == ".gguf" else p.name
    name, path = name.strip(), path.strip()
    if not name or not path:
        raise ConfigError(f"Bad model {ref!r}: give a model path, or NAME=PATH to choose the name clients use.")
    return name, path


def create_app(models: dict[str, Generator], api_keys: set[str] | None = None) -> fastapi.FastAPI:
    """A FastAPI app serving the models under OpenAI's API.

    Args:
        models: Model name (what clients pass as ``model``) -> engine.
        api_keys: When given, every ``/v1`` request needs ``Authorization: Bearer <one of them>``.
            Keys are kept only as SHA-256 digests and compared in constant time.

    Returns:
        The app; run it with uvicorn.

    Raises:
        ConfigError: No models, or an empty key set.
    """
    if not models:
        raise ConfigError("The server needs at least one model.")
    if api_keys is not None and not api_keys:
        raise ConfigError("api_keys is empty: pass None for no authentication, or at least one key.")
    from slmforge.serve._app import build_app

    digests = {hash_api_key(k) for k in api_keys} if api_keys is not None else None
    return build_app(dict(models), digests)


def serve(
    model_paths: list[str],
    host: str = "127.0.0.1",
    port: int = 8000,
    api_keys_file: str | Path | None = None,
    device: str = "auto",
) -> None:
    """Load the models and serve them until interrupted.

    Args:
        model_paths: Model folders, .gguf files or hub ids, each optionally ``name=path``.
        host: Interface to bind; 127.0.0.1 keeps the server local.
        port: TCP port.
        api_keys_file: A file of accepted API keys, one per line; None serves without authentication.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (torch engine).

    Raises:
        ConfigError: Two models share a name, or the keys file is unusable.
        ModelError: A model cannot be loaded.
    """
    refs = [parse_model_ref(r) for r in model_paths]
    names = [n for n, _ in refs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"Two models are named {', '.join(dupes)}; name them apart with NAME=PATH.")
    keys = read_api_keys(api_keys_file) if api_keys_file is not None else None
    from slmforge.generate import load_generator

    models = {name: load_generator(path, device=device) for name, path in refs}
    app = create_app(models, keys)
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level="info")
