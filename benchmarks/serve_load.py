"""Serving throughput and latency under load, continuous batching on vs off, per engine.

    python benchmarks/serve_load.py [--model MODEL] [--engine auto] [--runs 3] [--clients 1,4,16,32] [--max-tokens 64]
    python benchmarks/serve_load.py --quick          # 1 run, 1 and 4 clients, few requests: a smoke test
    python benchmarks/serve_load.py --model benchmarks/results/gemma-onnx-int4 --batch 16 --clients 1,4,16 \
        --runs 1 --max-tokens 32 --json serve_load_gemma_onnx_int4

MODEL is a Hugging Face model folder, an ONNX export (`slmforge export onnx`) or a .gguf file (default
/tmp/demo/quickstart/runs/sft, the quickstart's fine-tuned model; make one with `slmforge quickstart
--out /tmp/demo/quickstart`). ``--engine`` picks what serves it (torch, onnx, llama.cpp; auto: by the
path, as `slmforge serve` does), through a project file with ``serve.models: [{path, engine}]``. For each
setting, batching on (``--max-batch-size --batch``: the torch and ONNX engines' continuous batching,
llama.cpp's slots) and off (``--max-batch-size 1``), one server runs in a
subprocess (one at a time, torch and OpenMP threads left at their defaults), and at each number of
clients ``slmforge.serve.bench.run_load`` sends max(2 x clients, 16) streamed chat completions of
``--max-tokens`` tokens at most, greedy, cycling through the fixed Python questions of
``BENCH_PROMPTS``. One warm-up request per server is not timed. Each cell is the median of ``--runs``.
Prints a markdown table of throughput and P50/P95/P99 latency and time to first token per setting,
the ratio on/off at each number of clients, the ratio of each cell to one client with batching off
(the single stream) and each server's peak resident memory (Linux VmHWM, read after its last cell),
and writes benchmarks/results/serve_load.json (``--json NAME``: NAME.json; ``--quick`` writes
serve_load_quick.json).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from _common import machine, median, save

DEFAULT_MODEL = Path("/tmp/demo/quickstart/runs/sft")
SETTINGS = {"on": 32, "off": 1}  # name -> --max-batch-size ("on" is set by --batch)
ENGINES = ("auto", "torch", "onnx", "llama.cpp")
NAME = "bench"  # the served model's name


def requests_for(clients: int, minimum: int) -> int:
    return max(2 * clients, minimum)


def project_file(model: Path, engine: str, folder: Path) -> Path:
    """A project file that serves ``model`` as ``NAME`` on ``engine`` (the CLI picks engines by path only)."""
    import yaml

    path = folder / "serve_load.yaml"
    path.write_text(yaml.safe_dump({"serve": {"models": [{"name": NAME, "path": str(model.resolve()),
                                                          "engine": engine}]}}), encoding="utf-8")
    return path


def bench_setting(project: Path, max_batch_size: int, clients: list[int], runs: int, max_tokens: int,
                  min_requests: int, extra: dict, completions: bool = False) -> list[dict]:
    """One server at ``max_batch_size``; per number of clients, the median of ``runs`` load tests."""
    from slmforge.serve.bench import BENCH_PROMPTS, run_load, start_server

    name = NAME
    rows = []
    with start_server([], max_batch_size=max_batch_size, extra_args=["--config", str(project)]) as server:
        warm = run_load(server.base_url, name, 1, 1, BENCH_PROMPTS, max_tokens, extra_body=extra,
                        completions=completions)  # warm-up: first-call costs
        if warm.error_count:
            sys.exit(f"the warm-up request to a server at --max-batch-size {max_batch_size} failed: "
                     f"{warm.records[0].error}\nserver log ({server.log_path}):\n{server.log_tail()}")
        for c in clients:
            n = requests_for(c, min_requests)
            results = [run_load(server.base_url, name, c, n, BENCH_PROMPTS, max_tokens, extra_body=extra,
                                completions=completions) for _ in range(runs)]
            dicts = [r.as_dict() for r in results]

            def med(key: str, sub: str | None = None) -> float | None:
                vals = [d[key] if sub is None else d[key][sub] for d in dicts]
                vals = [v for v in vals if v is not None]
                return round(median(vals), 4) if vals else None

            row = {
                "max_batch_size": max_batch_size, "clients": c, "requests": n,
                "tokens_per_s": med("tokens_per_s"), "requests_per_s": med("requests_per_s"),
                "mean_completion_tokens": med("mean_completion_tokens"),
                "errors": sum(d["errors"] for d in dicts),
                **{f"latency_{q}_s": med("latency_s", q) for q in ("p50", "p95", "p99")},
                **{f"ttft_{q}_s": med("ttft_s", q) for q in ("p50", "p95", "p99")},
                "runs": dicts,
            }
            rows.append(row)
            print(f"  batch {max_batch_size:>2}, {c:>2} clients: {row['tokens_per_s']} tok/s, "
                  f"P50 {row['latency_p50_s']} s, errors {row['errors']}", file=sys.stderr, flush=True)
        peak = peak_rss_mb(server.proc.pid)
    print(f"  batch {max_batch_size:>2}: server peak RSS {peak} MB", file=sys.stderr, flush=True)
    for row in rows:
        row["server_peak_rss_mb"] = peak
    server.remove_log()
    return rows


def peak_rss_mb(pid: int) -> float | None:
    """The process's peak resident memory so far (Linux ``VmHWM``), MB; None where /proc has no such line."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1000:.0f}"


def markdown(rows: list[dict], clients: list[int]) -> str:
    """The table of every cell, then the ratios on/off and to the single stream (1 client, batching off)."""
    lines = ["| batching | clients | requests | tokens/s | req/s | tokens/req | latency P50/P95/P99 ms "
             "| TTFT P50/P95/P99 ms | errors |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for setting, size in SETTINGS.items():
        for r in (r for r in rows if r["max_batch_size"] == size):
            lat = "/".join(_ms(r[f"latency_{q}_s"]) for q in ("p50", "p95", "p99"))
            ttft = "/".join(_ms(r[f"ttft_{q}_s"]) for q in ("p50", "p95", "p99"))
            lines.append(f"| {setting} (max batch {size}) | {r['clients']} | {r['requests']} | {r['tokens_per_s']:.1f} "
                         f"| {r['requests_per_s']:.2f} | {r['mean_completion_tokens']:.1f} | {lat} | {ttft} "
                         f"| {r['errors']} |")
    peaks = {setting: next((r["server_peak_rss_mb"] for r in rows if r["max_batch_size"] == size), None)
             for setting, size in SETTINGS.items()}
    lines += ["", "server peak RSS MB: " + ", ".join(f"{k} {v}" for k, v in peaks.items())]
    lines += ["", "| clients | throughput on/off | P50 latency on/off | P50 TTFT on/off | on / single stream |",
              "|---:|---:|---:|---:|---:|"]
    for c in clients:
        on = next(r for r in rows if r["clients"] == c and r["max_batch_size"] == SETTINGS["on"])
        off = next(r for r in rows if r["clients"] == c and r["max_batch_size"] == SETTINGS["off"])

        def ratio(key: str) -> str:
            return f"{on[key] / off[key]:.2f}x" if on[key] and off[key] else "-"

        single = next((r["tokens_per_s"] for r in rows if r["clients"] == 1 and r["max_batch_size"] == 1), None)
        scale = f"{on['tokens_per_s'] / single:.2f}x" if single else "-"
        lines.append(f"| {c} | {ratio('tokens_per_s')} | {ratio('latency_p50_s')} | {ratio('ttft_p50_s')} | {scale} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", nargs="?", type=Path, default=None, help="the same as --model")
    parser.add_argument("--model", dest="model_opt", type=Path, default=None,
                        help="a Hugging Face model folder, an ONNX export or a .gguf file")
    parser.add_argument("--engine", choices=ENGINES, default="auto", help="what serves it (auto: by the path)")
    parser.add_argument("--batch", type=int, default=SETTINGS["on"],
                        help="--max-batch-size with batching on (continuous batching width, llama.cpp slots)")
    parser.add_argument("--settings", default="on,off", help="which of on,off to run")
    parser.add_argument("--completions", action="store_true",
                        help="plain text completions instead of chat (a model without a chat template: the GGUF)")
    parser.add_argument("--json", default=None, help="results file name under benchmarks/results (no .json)")
    parser.add_argument("--runs", type=int, default=3, help="repeats per cell (median)")
    parser.add_argument("--clients", default="1,4,16,32", help="numbers of concurrent clients")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--min-requests", type=int, default=16, help="requests per cell: max(2 x clients, this)")
    parser.add_argument("--stop-at-eos", action="store_true",
                        help="let replies end at end-of-sequence (default: ignore_eos, every reply max_tokens long)")
    parser.add_argument("--quick", action="store_true", help="smoke test: 1 run, 1 and 4 clients, 8 requests")
    args = parser.parse_args()
    if args.quick:
        args.runs, args.clients, args.min_requests = 1, "1,4", 8
    clients = [int(c) for c in args.clients.split(",")]
    args.model = args.model_opt or args.model or DEFAULT_MODEL
    SETTINGS["on"] = args.batch
    settings = {k: SETTINGS[k] for k in args.settings.split(",")}
    from slmforge.generate import engine_for

    engine = engine_for(args.model) if args.engine == "auto" else args.engine
    if not args.model.exists() or (engine == "torch" and not (args.model / "config.json").exists()):
        parser.error(f"{args.model} is neither a model folder, an ONNX export nor a .gguf file; make one with "
                     "`slmforge quickstart --out /tmp/demo/quickstart` or pass one with --model")

    m = machine()
    print(f"machine: {m['cpu']}, {m['cores']} cores, Python {m['python']}, load avg {os.getloadavg()[0]:.2f}",
          file=sys.stderr)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        project = project_file(args.model, engine, Path(tmp))
        for size in settings.values():
            rows += bench_setting(project, size, clients, args.runs, args.max_tokens, args.min_requests,
                                  {} if args.stop_at_eos else {"ignore_eos": True}, args.completions)

    length = "ending at end-of-sequence" if args.stop_at_eos else "ignore_eos (every reply max_tokens long)"
    print(f"\n{args.model} on {engine}: streamed {'text' if args.completions else 'chat'} completions, max_tokens {args.max_tokens}, {length}, greedy, "
          f"median of {args.runs} run(s); machine: {m['cpu']}, {m['cores']} cores, "
          f"load avg {os.getloadavg()[0]:.2f}\n")
    print(markdown(rows, clients) if len(settings) == 2 else "\n".join(
        f"| {r['max_batch_size']} | {r['clients']} | {r['tokens_per_s']:.1f} | {_ms(r['latency_p50_s'])} "
        f"| {_ms(r['ttft_p50_s'])} |" for r in rows))
    path = save(args.json or ("serve_load_quick" if args.quick else "serve_load"), {
        "settings": {"model": str(args.model), "engine": engine, "runs": args.runs, "clients": clients, "max_tokens": args.max_tokens,
                     "ignore_eos": not args.stop_at_eos, "completions": args.completions, "min_requests": args.min_requests, "max_batch_size": settings,
                     "load_average_1min": os.getloadavg()[0]},
        "results": rows,
    })
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
