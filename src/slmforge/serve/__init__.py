"""Serving: an OpenAI-compatible HTTP server over any ``Generator``.

    from slmforge.serve import create_app, serve
    serve(["runs/sft", "base=runs/train"], port=8000, api_keys_file="keys.jsonl")

Endpoints: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions``
(``stream: true`` sends server-sent events ending with ``data: [DONE]``), ``GET /v1/usage``
(the calling key's requests and tokens), ``GET /health`` (the process is up), ``GET /ready``
(models are loaded) and ``GET /metrics`` (Prometheus text format).
Errors use OpenAI's body, ``{"error": {"message", "type", "param", "code"}}``,
so the official clients raise their usual exceptions: 401 without a valid key, 429 with
``Retry-After`` past a key's requests/tokens per minute, 429 ``insufficient_quota`` once its token
quota is spent, 413 for a prompt over the server's size limit, 400 ``context_length_exceeded``.

Keys live in a JSON-lines file of SHA-256 digests and limits (``slmforge keys add NAME``).

Generation runs in a thread pool, one request per model at a time (a lock per
model), so the event loop keeps answering while a model works. fastapi and
uvicorn are imported only when an app is built.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slmforge.errors import ConfigError
from slmforge.serve._hash import hash_api_key
from slmforge.serve._keys import ApiKey, add_key, read_keys_file, revoke_key

if TYPE_CHECKING:
    import fastapi

    from slmforge.config import ProjectConfig

__all__ = ["create_app", "serve", "parse_model_ref", "read_api_keys", "hash_api_key", "ApiKey", "add_key",
           "read_keys_file", "revoke_key", "usage_csv", "check_open_bind", "proxy"]


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


def create_app(
    models: dict[str, Any],
    api_keys: set[str] | list[ApiKey] | None = None,
    max_prompt_chars: int | None = None,
    max_prompt_tokens: int | None = None,
    request_timeout_s: float | None = None,
    max_batch_size: int = 16,
    closers: list[Any] | None = None,
    shutdown_timeout_s: float = 30.0,
    public_metrics: bool = False,
    knowledge: dict[str, Any] | None = None,
    memory: Any = None,
    reasoning: Any = None,
    shared_state: str | None = None,
    ui: list[Any] | None = None,
) -> fastapi.FastAPI:
    """A FastAPI app serving the models under OpenAI's API.

    Args:
        models: Model name (what clients pass as ``model``) -> a ``Generator`` (torch generators get
            continuous batching), an ``slmforge.embed.Embedder`` (for ``/v1/embeddings``), an upstream
            endpoint (``serve._upstream.Upstream``), or a ready ``ServedModel`` (adapters, profiles).
        api_keys: When given, every ``/v1`` request needs ``Authorization: Bearer <key>``: plain keys
            (no limits), or key records from ``read_keys_file`` with their limits.
            Keys are kept only as SHA-256 digests and compared in constant time.
        max_prompt_chars: Longer prompts (all messages together) are refused with a 413.
        max_prompt_tokens: Prompts of more tokens are refused with a 413.
        request_timeout_s: Seconds a request may generate: past them a request gets a 504 (a stream, an
            error event).
        max_batch_size: Continuous batching: most sequences a torch model decodes together (1: one at a time).
        closers: Things to close when the app shuts down (upstream clients, a managed vLLM).
        shutdown_timeout_s: How long the batching engines may take to finish their sequences at shutdown.
        public_metrics: With keys, still answer ``/metrics``, ``/openapi.json``, ``/docs`` and ``/redoc``
            without one (by default they need a valid key, as ``/v1`` does; ``/health`` and ``/ready``
            are always open).
        knowledge: Knowledge bases chat requests may name: name -> an ``slmforge.rag.Index`` (searched with
            its defaults) or a ``serve._knowledge.KnowledgeBase`` (with its own retrieval settings). A
            model whose ``ServedModel.knowledge`` names one answers every request from it.
        memory: A ``slmforge.memory.MemoryStore`` (or ``serve._memory.ServerMemory``): chat requests get the
            caller's memories (scoped by API key name) and what they state is remembered.
        shared_state: A Redis URL (``redis://host:6379/0``): keys' limits, quotas and usage live there, shared
            by every replica given the same URL (``pip install slmforge[scale]``); None keeps them in memory.
        reasoning: A ``serve._reason.Reasoning`` (or ``slmforge.config.ReasonConfig``): the strategy settings
            of chat requests that ask for one (``strategy`` field, ``sc8-model`` names), and its ``default``
            strategy for those that do not (the proxy). None: strategies on request with the defaults.
        ui: Projects (``slmforge.ui.project(path)`` each) for the dashboard under ``/ui``, behind the same keys
            (``pip install slmforge[ui]``); the server may then start with no model (the dashboard trains one).

    Returns:
        The app; run it with uvicorn. ``app.state.limiter.usage_rows()`` is the usage per key.

    Raises:
        ConfigError: No models, or an empty key set.
    """
    if not models and not ui:
        raise ConfigError("The server needs at least one model.")
    if api_keys is not None and not api_keys:
        raise ConfigError("api_keys is empty: pass None for no authentication, or at least one key.")
    from slmforge.serve._app import build_app
    from slmforge.serve._limits import KeyLimiter, Metrics
    from slmforge.serve._models import wrap_models
    from slmforge.serve._state import PromptLimits

    keys = None
    if api_keys is not None:
        keys = [k if isinstance(k, ApiKey) else ApiKey(name=f"key-{i}", sha256=hash_api_key(k))
                for i, k in enumerate(sorted(api_keys, key=str), start=1)]
    limiter, metrics = _limiter(shared_state, KeyLimiter), Metrics()
    served = wrap_models(dict(models), max_batch_size)
    bases = _knowledge_bases(knowledge or {}, served)
    app = build_app(served, keys, PromptLimits(max_prompt_chars, max_prompt_tokens, request_timeout_s), limiter,
                    metrics, closers=closers, shutdown_timeout_s=shutdown_timeout_s, public_metrics=public_metrics,
                    knowledge=bases, memory=_server_memory(memory), reasoning=_reasoning(reasoning))
    app.state.limiter, app.state.metrics, app.state.models = limiter, metrics, served
    if ui:
        from slmforge.serve._ui import mount_ui

        mount_ui(app, app.state.server, ui)
    return app


def _knowledge_bases(knowledge: dict[str, Any], served: dict[str, Any]) -> dict[str, Any]:
    """Knowledge bases by name (an Index becomes a KnowledgeBase with its defaults); every one a served
    model answers from must be among them."""
    from slmforge.serve._knowledge import KnowledgeBase

    bases = {n: kb if isinstance(kb, KnowledgeBase) else KnowledgeBase(kb) for n, kb in knowledge.items()}
    unknown = sorted({m.knowledge for m in served.values() if m.knowledge and m.knowledge not in bases})
    if unknown:
        raise ConfigError(f"A served model answers from the knowledge base {', '.join(unknown)}, which is not among "
                          f"the server's ({', '.join(sorted(bases)) or 'none'}): add it to serve.knowledge.")
    return bases


def check_open_bind(host: str, keys_file: str | Path | None) -> None:
    """The server runs without API keys only on a loopback interface: anyone who reaches the port could
    otherwise use (and meter against nobody) every model. One rule, for ``serve()`` and the CLI.

    Raises:
        ConfigError: No keys and a host that is not loopback.
    """
    from slmforge.endpoints import is_loopback

    if keys_file is None and not is_loopback(host):
        raise ConfigError(f"Serving on {host} needs API keys (api_keys_file, or serve.api_keys; make one with "
                          "`slmforge keys add NAME`): only a loopback host may be served without authentication.")


def usage_csv(rows: list[dict]) -> str:
    """Usage rows (``KeyLimiter.usage_rows``, or a usage JSON file's ``data``) as CSV text: per key, its
    totals (empty ``user``), then one line per end user (the requests' ``user`` field)."""
    import csv
    import io

    fields = ["name", "user", "requests", "prompt_tokens", "completion_tokens", "total_tokens"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({**row, "user": ""})
        for user, part in (row.get("users") or {}).items():
            writer.writerow({**part, "name": row["name"], "user": user})
    return buf.getvalue()


def serve(
    model_paths: list[str] | None = None,
    cfg: ProjectConfig | None = None,
    host: str | None = None,
    port: int | None = None,
    api_keys_file: str | Path | None = None,
    device: str = "auto",
    max_prompt_chars: int | None = None,
    max_prompt_tokens: int | None = None,
    usage_file: str | Path | None = None,
    request_timeout_s: float | None = None,
    max_batch_size: int | None = None,
    adapters: dict[str, str] | None = None,
    public_metrics: bool | None = None,
    knowledge: dict[str, str] | None = None,
    strategy: str | None = None,
    ui: list[Any] | None = None,
) -> None:
    """Load the models and serve them until interrupted (SIGTERM/Ctrl-C finish in-flight requests first).

    Settings come from ``cfg.serve`` (the project file); arguments that are not None override them.

    Args:
        model_paths: Model folders, .gguf files or hub ids, each optionally ``name=path``; None or empty
            serves the project file's ``serve.models`` (else its sft/train output).
        cfg: The project config (default: built-in defaults).
        host: Interface to bind; 127.0.0.1 keeps the server local.
        port: TCP port.
        api_keys_file: A keys file (JSON lines from ``slmforge keys add``, or plain keys one per line);
            None serves without authentication.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (torch engine).
        max_prompt_chars: Refuse longer prompts with a 413.
        max_prompt_tokens: Refuse prompts of more tokens with a 413.
        usage_file: Where to write the usage per key (JSON) when the server stops.
        request_timeout_s: Seconds of generation per request before a 504.
        max_batch_size: Continuous batching width per torch model (1 = one request at a time).
        adapters: LoRA adapters (served name -> folder) over the first model.
        public_metrics: With keys, serve ``/metrics`` and the OpenAPI schema/docs without a key
            (default ``serve.public_metrics``).
        knowledge: Knowledge bases (name -> ``slmforge rag index`` folder), added to ``serve.knowledge``.
        strategy: A reasoning strategy for chat requests naming none (``slmforge proxy``; see ``cfg.reason``).
        ui: Projects for the dashboard under ``/ui`` (``slmforge ui``); with it, a project that has no model
            yet is served with none.

    Raises:
        ConfigError: Two models share a name, the keys file is unusable, or there are no keys and the
            host is not loopback.
        ModelError: A model cannot be loaded.
    """
    from slmforge.config import ProjectConfig
    from slmforge.serve._models import describe, load_models

    cfg = cfg or ProjectConfig()
    sc = cfg.serve
    table = _served_table(cfg, [parse_model_ref(r) for r in model_paths or []], dict(adapters or {}), bool(ui))
    keys_file = api_keys_file if api_keys_file is not None else (cfg.resolve(sc.api_keys) if sc.api_keys else None)
    check_open_bind(host or sc.host, keys_file)
    keys = read_keys_file(keys_file) if keys_file is not None else None
    _quiet_thread_pools()
    served, closers = load_models(cfg, table, device, max_batch_size or sc.max_batch_size)
    for line in describe(served):
        print(f"serving {line}", file=sys.stderr)
    app = create_app(served, keys,
                     max_prompt_chars=max_prompt_chars if max_prompt_chars is not None else sc.max_prompt_chars,
                     max_prompt_tokens=max_prompt_tokens if max_prompt_tokens is not None else sc.max_prompt_tokens,
                     request_timeout_s=request_timeout_s if request_timeout_s is not None else sc.request_timeout_s,
                     max_batch_size=max_batch_size or sc.max_batch_size, closers=closers,
                     shutdown_timeout_s=sc.shutdown_timeout_s,
                     public_metrics=sc.public_metrics if public_metrics is None else public_metrics,
                     knowledge=open_knowledge(cfg, {**sc.knowledge, **(knowledge or {})}), memory=_open_memory(cfg),
                     reasoning=_reasoning(cfg.reason, strategy), shared_state=sc.shared_state, ui=ui)
    usage = usage_file if usage_file is not None else (cfg.resolve(sc.usage_file) if sc.usage_file else None)
    if usage is not None:
        _write_usage_on_shutdown(app, Path(usage).expanduser())
    import uvicorn

    uvicorn.run(app, host=host or sc.host, port=port or sc.port, log_level="info",
                timeout_graceful_shutdown=sc.shutdown_timeout_s)


def _served_table(cfg: ProjectConfig, refs: list[tuple[str, str]], adapters: dict[str, str], ui: bool) -> list[Any]:
    """``model_configs``; with the dashboard, a project with no model yet is served with none (it can train one).

    Raises:
        ConfigError: Two models share a name, or there is no model to serve (and no dashboard).
    """
    from slmforge.serve._models import model_configs

    names = [n for n, _ in refs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"Two models are named {', '.join(dupes)}; name them apart with NAME=PATH.")
    try:
        return model_configs(cfg, refs, adapters)
    except ConfigError:
        if not ui or refs:
            raise
        return []


def _limiter(shared_state: str | None, in_memory: Any) -> Any:
    """Keys' limits and usage: in Redis, shared by replicas, given a URL; else in this process."""
    if not shared_state:
        return in_memory()
    from slmforge.serve._shared import RedisKeyLimiter

    return RedisKeyLimiter(shared_state)


def _reasoning(settings: Any, default: str | None = None) -> Any:
    """The server's strategy settings from a ``ReasonConfig`` (or as given); ``default`` for every request.

    Raises:
        ConfigError: An unknown default strategy.
    """
    from slmforge.config import ReasonConfig
    from slmforge.reasoning import STRATEGIES
    from slmforge.serve._reason import Reasoning

    if default is not None and default not in (*STRATEGIES, "none"):
        raise ConfigError(f"Unknown reasoning strategy {default!r}; choose one of {', '.join(STRATEGIES)} or none.")
    if settings is None:
        return Reasoning(default)
    if isinstance(settings, ReasonConfig):
        return Reasoning(default, settings.n, settings.temperature, settings.max_tokens, settings.max_seconds,
                         settings.extract)
    return settings


def proxy(upstream: str, model: str | None = None, name: str | None = None, strategy: str = "auto",
          cfg: ProjectConfig | None = None, api_key_env: str | None = None, **serve_args: Any) -> None:
    """Serve an OpenAI-compatible endpoint in front of ``upstream`` that applies a reasoning strategy to
    each chat request (``strategy`` by default; a request's ``strategy`` field or an ``sc8-NAME`` model
    name picks another), with this server's keys, limits, usage and metrics.

    Args:
        upstream: The upstream API root, e.g. ``http://127.0.0.1:8000/v1``.
        model: The upstream model (default: its first).
        name: The name clients use (default: the upstream model's).
        api_key_env: The environment variable holding the upstream's key.
        serve_args: ``serve``'s other arguments (host, port, api_keys_file...).

    Raises:
        ConfigError: An unknown strategy; GenerateError: the upstream cannot be reached to find its model.
    """
    from slmforge.config import ProjectConfig, ServeModelConfig

    cfg = cfg or ProjectConfig()
    _reasoning(None, strategy)  # an unknown strategy fails before anything is reached
    if model is None:
        from slmforge.generate import OpenAIGenerator

        model = OpenAIGenerator(upstream, None, api_key_env=api_key_env).model
    entry = ServeModelConfig(name=name or str(model), engine="openai", base_url=upstream, upstream_model=model,
                             api_key_env=api_key_env)
    cfg = cfg.model_copy(update={"serve": cfg.serve.model_copy(update={"models": [entry]})})
    serve(None, cfg=cfg, strategy=strategy, **serve_args)


def _server_memory(memory: Any) -> Any:
    from slmforge.serve._memory import ServerMemory

    return memory if memory is None or isinstance(memory, ServerMemory) else ServerMemory(memory)


def open_knowledge(cfg: ProjectConfig, folders: dict[str, str]) -> dict[str, Any]:
    """The knowledge bases (name -> index folder) opened with the project's embedder and retrieval settings.

    Raises:
        RagError: A folder without an index, or an index built with another embedder.
    """
    if not folders:
        return {}
    from slmforge.errors import RagError
    from slmforge.graphrag import load_graph
    from slmforge.rag import load_embedder
    from slmforge.rag.index import Index, recorded
    from slmforge.serve._knowledge import KnowledgeBase

    embedder = load_embedder(cfg.rag.embedder, cfg.rag.embedder_model, cfg.resolve)
    out = {}
    for name, folder in folders.items():
        path = cfg.resolve(folder)
        store = recorded(path, "store")
        if store is None:
            raise RagError(f"serve.knowledge {name}: no index at {path}; build it with `slmforge rag index`.")
        index = Index.open(path, embedder, store, cfg.rag.store_url)
        graph = load_graph(path / "graph") if (path / "graph" / "graph.json").is_file() else None
        out[name] = KnowledgeBase(index, cfg.rag.mode, cfg.rag.top_k, cfg.rag.min_score, cfg.rag.mmr, graph)
    return out


def _open_memory(cfg: ProjectConfig) -> Any:
    if not cfg.serve.memory:
        return None
    from slmforge.memory import open_store
    from slmforge.serve._memory import ServerMemory

    return ServerMemory(open_store(cfg), cfg.memory.recall_k, cfg.memory.extract, cfg.memory.window_tokens)


def _quiet_thread_pools() -> None:
    """Several engines in one process starve each other when idle thread pools keep spinning
    (docs/BENCHMARKS.md, runtime comparison): ONNX Runtime sessions made by this process stop spinning.

    Not OpenMP's passive waiting (OMP_WAIT_POLICY=PASSIVE): measured here it made PyTorch's decoding
    1.3-2x slower and llama.cpp's 12x slower, since both wait between every small operation.
    """
    import os

    os.environ.setdefault("SLMFORGE_ORT_SPINNING", "0")


def _write_usage_on_shutdown(app: fastapi.FastAPI, file: Path) -> None:
    # In the app's lifespan, not after uvicorn.run: uvicorn re-raises SIGTERM/SIGINT once it has
    # shut down, so code after run() never runs when the server is stopped by a signal.
    from contextlib import asynccontextmanager

    inner = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(_app):
        try:
            async with inner(_app):
                yield
        finally:
            rows = app.state.limiter.usage_rows()
            file.write_text(json.dumps({"object": "list", "data": rows}, indent=2) + "\n", encoding="utf-8")

    app.router.lifespan_context = lifespan
