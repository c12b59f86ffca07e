"""`slmforge serve`: an OpenAI-compatible HTTP server over one or more models.

A plain function with typer annotations; ``cli/main.py`` registers it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from slmforge.cli._options import ConfigOpt, SetOpt, err

if TYPE_CHECKING:
    from slmforge.config import ProjectConfig


def serve(
    models: Annotated[
        list[str] | None,
        typer.Argument(
            help="Model folders, .gguf files, ONNX exports or hub ids. Clients name a model by its folder name; "
            "NAME=PATH picks another name. Default: the project file's serve.models, else its sft/train output.",
            show_default=False,
        ),
    ] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    adapter: Annotated[
        list[str] | None,
        typer.Option("--adapter", help="NAME=FOLDER: a LoRA adapter over the first model, served as NAME "
                     "(repeatable; adapters share the base weights and batch together)."),
    ] = None,
    host: Annotated[str | None, typer.Option(help="Interface to bind (default serve.host: 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(min=1, max=65535, help="TCP port (default serve.port: 8000).")] = None,
    api_keys: Annotated[
        Path | None,
        typer.Option(
            "--api-keys",
            help="Keys file from `slmforge keys add` (SHA-256 hashes and per-key limits), or plain keys one "
            "per line. Clients then send 'Authorization: Bearer KEY'; keys are compared by hash. "
            "Default: serve.api_keys; without keys the server runs open, allowed only on a loopback --host.",
        ),
    ] = None,
    device: Annotated[str, typer.Option(help="auto (CUDA when present), cpu, cuda or cuda:N.")] = "auto",
    max_batch_size: Annotated[
        int | None, typer.Option(min=1, max=256, help="Continuous batching: most sequences a torch or ONNX model decodes "
                                 "together (default serve.max_batch_size: 16; 1 = one request at a time).")] = None,
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
    public_metrics: Annotated[
        bool | None, typer.Option("--public-metrics/--no-public-metrics", help="With --api-keys: serve /metrics, "
                                  "/openapi.json and /docs without a key (default serve.public_metrics: off).")
    ] = None,
    knowledge: Annotated[
        list[str] | None,
        typer.Option("--knowledge", help="NAME=FOLDER: a `slmforge rag index` folder chat requests may name as "
                     '{"knowledge": {"base": NAME}} for grounded, cited answers (repeatable; adds to serve.knowledge).'),
    ] = None,
    ui: Annotated[bool, typer.Option("--ui", help="Also serve the project's dashboard (`slmforge ui`) under /ui.")] = False,
) -> None:
    """Serve models with OpenAI's API: /v1/models, /v1/completions, /v1/chat/completions, /v1/embeddings.

    Try it: slmforge serve runs/sft --port 8000, then
    curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json'
    -d '{"model": "sft", "messages": [{"role": "user", "content": "hi"}]}'.
    Streaming, n, logprobs, response_format (json_object / json_schema, enforced while decoding) and tools
    work on torch models and ONNX exports, which batch requests continuously. Also GET /v1/usage (the caller's usage, per end
    user too), GET /metrics (Prometheus) and GET /docs (the OpenAPI schema); with --api-keys these need a key
    too, unless --public-metrics. Several models, LoRA adapters, embedding
    models, upstream proxies and vLLM go under serve.models in the project file. A chat request with
    {"knowledge": {"base": NAME}} (or any request to a model with serve.models[].knowledge) is answered
    from that knowledge base, with citations.
    """
    from slmforge.config import load_config
    from slmforge.serve import parse_model_ref, serve as run_server
    from slmforge.ui import project

    cfg = load_config(config, set_ or [])
    adapters = dict(parse_model_ref(a) for a in adapter or [])
    for what, name, path in [("model", *parse_model_ref(r)) for r in models or []] + [("adapter", *a) for a in adapters.items()]:
        err.print(f"{what} {name} <- {path}", style="dim")
    run_server(models or None, cfg=cfg, host=host, port=port, api_keys_file=keys_file(cfg, host, api_keys),
               device=device, max_prompt_chars=max_prompt_chars, max_prompt_tokens=max_prompt_tokens,
               usage_file=usage_file, request_timeout_s=request_timeout, max_batch_size=max_batch_size,
               adapters=adapters, public_metrics=public_metrics,
               knowledge=dict(parse_model_ref(k) for k in knowledge or []),
               ui=[project(config, set_ or [])] if ui else None)


def keys_file(cfg: ProjectConfig, host: str | None, api_keys: Path | None) -> Path | None:
    """--api-keys, else serve.api_keys; a BadParameter when there is none and the host is not loopback."""
    from slmforge.errors import ConfigError
    from slmforge.serve import check_open_bind

    bind = host or cfg.serve.host
    keys = api_keys if api_keys is not None else (cfg.resolve(cfg.serve.api_keys) if cfg.serve.api_keys else None)
    try:
        check_open_bind(bind, keys)  # the library's rule; the CLI names its own flag
    except ConfigError:
        raise typer.BadParameter(f"serving on {bind} needs --api-keys (make one with `slmforge keys add NAME`); "
                                 "only a loopback host may be served open.", param_hint="--api-keys") from None
    if keys is None:
        err.print("serving without authentication (loopback only)", style="dim")
    return keys


def proxy(
    upstream: Annotated[str, typer.Option("--upstream", help="The upstream API root, e.g. http://127.0.0.1:8000/v1 "
                                          "(slmforge serve, vLLM, llama.cpp's server, a hosted API).")],
    model: Annotated[str | None, typer.Option("--model", "-m", help="The upstream model (default: its first).")] = None,
    name: Annotated[str | None, typer.Option(help="The name clients use (default: the upstream model's).")] = None,
    strategy: Annotated[str, typer.Option(help="Applied to requests that name none: direct, cot, sc, bon, tot, "
                                          "refine, adaptive, auto or none.")] = "auto",
    upstream_key_env: Annotated[str | None, typer.Option(help="Environment variable holding the upstream's key.")
                                ] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    host: Annotated[str | None, typer.Option(help="Interface to bind (default serve.host: 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(min=1, max=65535, help="TCP port (default serve.port: 8000).")] = None,
    api_keys: Annotated[Path | None, typer.Option("--api-keys", help="Keys file, as for `slmforge serve`.")] = None,
) -> None:
    """An OpenAI-compatible server in front of any endpoint that spends test-time compute per request.

    A request picks a strategy by its "strategy" field or a model name such as sc8-NAME (self-consistency
    over 8 samples), else gets --strategy. Its usage counts every internal call; the reply's
    slmforge.trace_id fetches them from GET /v1/traces/ID. Settings: the reason section of the project file.
    """
    from slmforge.config import load_config
    from slmforge.serve import proxy as run_proxy

    cfg = load_config(config, set_ or [])
    keys = keys_file(cfg, host, api_keys)
    err.print(f"proxy -> {upstream} (strategy {strategy})", style="dim")
    run_proxy(upstream, model, name, strategy, cfg=cfg, api_key_env=upstream_key_env, host=host, port=port,
              api_keys_file=keys)
