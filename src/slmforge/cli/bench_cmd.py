"""`slmforge bench`: load tests. ``bench serve`` measures a server's throughput, latency and cost per token.

A typer sub-app; ``cli/main.py`` registers it as ``bench``.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Annotated, Any

import typer

from slmforge.cli._options import ConfigOpt, SetOpt, err, out

if TYPE_CHECKING:
    from slmforge.config import ProjectConfig
    from slmforge.serve.bench import LoadResult, ServerProcess

bench_app = typer.Typer(no_args_is_help=True, help="Load tests: throughput, latency percentiles, cost per token.")


@bench_app.command("serve")
def bench_serve(
    model_path: Annotated[
        str | None,
        typer.Argument(help="A model folder (or NAME=PATH) to start `slmforge serve` on for the test. "
                       "Default: the project's serve.models, else its sft output, else its train output.",
                       show_default=False, metavar="MODEL"),
    ] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    url: Annotated[
        str | None, typer.Option(help="Bench a server already running here, e.g. http://127.0.0.1:8000.")
    ] = None,
    model: Annotated[
        str | None, typer.Option("--model", "-m", help="Model name to request (default: the server's first model).")
    ] = None,
    concurrency: Annotated[int, typer.Option(min=1, help="Clients sending requests at once.")] = 8,
    requests: Annotated[int, typer.Option(min=1, help="Requests in all.")] = 64,
    max_tokens: Annotated[int, typer.Option(min=1, help="max_tokens of each request.")] = 64,
    max_batch_size: Annotated[
        int | None,
        typer.Option(min=1, help="Passed to the server this command starts (default: the server's own default)."),
    ] = None,
    api_key: Annotated[
        str | None,
        typer.Option(envvar="SLMFORGE_API_KEY", show_envvar=True,
                     help="Key for a server started with --api-keys (prefer the environment variable)."),
    ] = None,
    allow_insecure_http: Annotated[
        bool,
        typer.Option(help="Send --api-key over plain http to a --url that is not this machine (readable on the way)."),
    ] = False,
    completions: Annotated[
        bool, typer.Option(help="Send streamed text completions (/v1/completions), for a base model that has no "
                           "chat template (a pretrained GGUF), instead of chat completions.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Load-test an OpenAI-compatible server with streamed chat (or --completions: text) completions; price its
    tokens against an API.

    Try it: slmforge bench serve runs/sft --concurrency 8 --requests 64. Prices come from serve.cost in
    the project file (--set serve.cost.hardware_usd_per_hour=0.5).
    """
    from slmforge.config import load_config
    from slmforge.serve.bench import check_server, cost_report

    if url is not None and model_path is not None:
        raise typer.BadParameter("give either a MODEL folder to start a server on, or --url of a running one")
    if url is not None and max_batch_size is not None:
        raise typer.BadParameter("--max-batch-size applies only to a server this command starts (give MODEL, "
                                 "not --url)", param_hint="--max-batch-size")
    if url is not None and api_key:
        from slmforge.endpoints import endpoint_key

        # The same rule as every other place that sends a key: never in clear text off this machine.
        api_key = endpoint_key(url, api_key=api_key, allow_insecure_http=allow_insecure_http,
                               where="--url (opt in: --allow-insecure-http)")
    cfg = load_config(config, set_ or [])
    server = None
    if url is None:
        server, model = _start_server(cfg, config, set_, model_path, model, max_batch_size)
        url = server.base_url
    try:
        model = check_server(url, model, api_key)  # a clear error before any progress bar
        result = _run_with_progress(url, model, concurrency, requests, max_tokens, api_key, show=not as_json,
                                    completions=completions)
    finally:
        if server is not None:
            server.stop()
    report: dict[str, Any] = {"url": url, "started_server": server is not None, "max_batch_size": max_batch_size,
                              "endpoint": "completions" if completions else "chat", **result.as_dict(),
                              "cost": cost_report(result, cfg.serve.cost)}
    _finish(result, server, report, as_json)


def _finish(result: LoadResult, server: ServerProcess | None, report: dict[str, Any], as_json: bool) -> None:
    """Keep the started server's log only when requests failed; print the report; exit 1 when all failed."""
    if server is not None:
        if result.error_count:
            err.print(f"{result.error_count} request(s) failed; the server's log: {server.log_path}", style="yellow")
        else:
            server.remove_log()
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        _print_report(report)
    if result.error_count == result.requests:
        err.print(f"every request failed: {result.errors_by_kind}; first error: {result.records[0].error}",
                  style="bold red")
        raise typer.Exit(1)


def _start_server(cfg: ProjectConfig, config, set_: list[str] | None, model_path: str | None, model: str | None,
                  max_batch_size: int | None) -> tuple[ServerProcess, str]:
    """Start `slmforge serve` on MODEL (else the project's serve.models, else its default model folder) with
    the same project file and overrides; the running server and the model name to request."""
    from slmforge.serve import parse_model_ref
    from slmforge.serve.bench import start_server

    # The server gets the same project file and overrides, so serve.* settings apply to it too.
    extra = ["--config", str(config)] if config is not None else []
    extra += [arg for override in set_ or [] for arg in ("--set", override)]
    models: list[str] = []
    if model_path is not None:
        models = [model_path]
        model = model or parse_model_ref(model_path)[0]
    elif cfg.serve.models:  # `slmforge serve` starts the project's serve.models
        model = model or cfg.serve.models[0].name
    else:
        from slmforge.generate import default_model_dir

        models = [str(default_model_dir(cfg))]
        model = model or parse_model_ref(models[0])[0]
    err.print(f"starting slmforge serve {' '.join([*models, *extra])}"
              + (f" --max-batch-size {max_batch_size}" if max_batch_size else ""), style="dim")
    server = start_server(models, max_batch_size=max_batch_size, extra_args=extra)
    return server, model


def _run_with_progress(url: str, model: str | None, concurrency: int, requests: int, max_tokens: int,
                       api_key: str | None, show: bool, completions: bool = False) -> LoadResult:
    """``run_load`` with a progress bar on stderr (none when ``show`` is false or SLMFORGE_NO_PROGRESS is set)."""
    from slmforge._progress import progress_bar
    from slmforge.serve.bench import BENCH_PROMPTS, RequestRecord, run_load

    with progress_bar(show) as bar:
        task = bar.add_task(f"bench c={concurrency}", total=requests, info="")
        tokens, errors = 0, 0

        def on_result(record: RequestRecord) -> None:
            nonlocal tokens, errors
            tokens += record.completion_tokens
            errors += 0 if record.ok else 1
            bar.update(task, advance=1, info=f"{tokens} tokens" + (f", {errors} errors" if errors else ""))

        return run_load(url, model, concurrency, requests, BENCH_PROMPTS, max_tokens, api_key, on_result=on_result,
                        completions=completions)


def _fmt_s(v: float | None) -> str:
    return "-" if v is None else f"{v * 1000:.0f} ms" if v < 1 else f"{v:.2f} s"


def _fmt_usd(v: float | None) -> str:
    return "-" if v is None else f"${v:.6f}" if v < 0.01 else f"${v:.4f}"


def _print_report(r: dict[str, Any]) -> None:
    from rich.table import Table

    lat, ttft, c = r["latency_s"], r["ttft_s"], r["cost"]
    batch = r["max_batch_size"] if r["max_batch_size"] is not None else "server default"
    t = Table(title=f"{r['model']} at {r['url']}: {r['concurrency']} clients, {r['requests']} requests, "
              f"max_tokens {r['max_tokens']}, max batch {batch}", title_justify="left")
    t.add_column("metric")
    t.add_column("value", justify="right")
    t.add_row("succeeded / errors", f"{r['succeeded']} / {r['errors']}"
              + (f" {r['errors_by_kind']}" if r["errors"] else ""))
    t.add_row("wall time", f"{r['wall_s']:.2f} s")
    t.add_row("throughput", f"{r['tokens_per_s']:.1f} tokens/s, {r['requests_per_s']:.2f} requests/s")
    t.add_row("tokens per request", f"{r['mean_completion_tokens']:.1f} out, {r['mean_prompt_tokens']:.1f} prompt")
    t.add_row("latency P50 / P95 / P99", " / ".join(_fmt_s(lat[k]) for k in ("p50", "p95", "p99")))
    t.add_row("TTFT P50 / P95 / P99", " / ".join(_fmt_s(ttft[k]) for k in ("p50", "p95", "p99")))
    t.add_section()
    t.add_row("hardware price", f"${c['hardware_usd_per_hour']:g}/hour (serve.cost.hardware_usd_per_hour)")
    t.add_row("ours per 1K output tokens", _fmt_usd(c["usd_per_1k_output_tokens"]))
    t.add_row(f"{c['api_name']} per 1K output tokens", _fmt_usd(c["api_usd_per_1k_output_tokens"]))
    t.add_row("ours per 1K total tokens", _fmt_usd(c["usd_per_1k_total_tokens"]))
    t.add_row(f"{c['api_name']} per 1K total tokens", _fmt_usd(c["api_usd_per_1k_total_tokens"]))
    ratio = c["cost_ratio"]
    t.add_row("ours / API", "-" if ratio is None else f"{ratio:.3g}x ({'cheaper' if ratio < 1 else 'dearer'})")
    be, cap = c["break_even_requests_per_day"], c["capacity_requests_per_day"]
    t.add_row("break-even requests/day", "-" if be is None else f"{be:,.0f}")
    t.add_row("capacity requests/day", f"{cap:,.0f}"
              + ("" if be is None else " (enough to break even)" if cap >= be else " (below break-even)"))
    out.print(t)
