"""Where continuous batching spends its time, without HTTP: the model's prefill and decode runs vs. the
engine's own token choice and emission, per number of sequences.

    python benchmarks/batch_step_profile.py benchmarks/results/gemma-onnx-int4 --sequences 1,16 --max-tokens 32

MODEL is an ONNX export (``slmforge export onnx``; served by ``OnnxGenerator``) or a model folder (the
torch engine). N plain-text prompts (``slmforge.serve.bench.BENCH_PROMPTS``, as ``serve_load.py
--completions`` sends them) are submitted at once to one ``BatchEngine``, greedy (or sampled: --temperature,
--top-p, seeded), exactly --max-tokens new tokens each (``ignore_eos``); a round ends when all have finished. The engine's methods are wrapped
with timers: ``backend.prefill`` (prompts joining), ``backend.decode`` (one step of every running row)
and ``_sample_and_emit`` (choosing each row's token, detokenizing, stop strings, events). Prints the
median over --runs rounds (after one warm-up round) of tokens/s and of each phase's seconds, and the
decode step's milliseconds, and writes benchmarks/results/batch_step_profile.json (--json NAME). With
--ort-ops (ONNX), ONNX Runtime's own profile splits a decode step of each size by op type, the output
layer (``lm_head``) apart.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from collections import Counter
from pathlib import Path

from _common import machine, median, save

PHASES = {"prefill": ("backend", "prefill"), "decode": ("backend", "decode"), "choose+emit": (None, "_sample_and_emit")}


def timed(engine, clock: Counter) -> None:
    """Wrap the engine's phases so that each call adds its wall time (and a count) to ``clock``."""
    for phase, (owner, name) in PHASES.items():
        target = engine.backend if owner == "backend" else engine
        inner = getattr(target, name)

        def wrapper(*args, _inner=inner, _phase=phase, **kwargs):
            t0 = time.perf_counter()
            try:
                return _inner(*args, **kwargs)
            finally:
                clock[_phase] += time.perf_counter() - t0
                clock[f"{_phase}_calls"] += 1

        setattr(target, name, wrapper)


def ort_op_split(trace: Path) -> dict[int, dict[str, float]]:
    """ONNX Runtime's profile of the batching session: per decode step (one new token per row), ms by op
    type (the output layer apart), keyed by the step's number of rows. A run is a decode step when its
    embedding node's token ids are (rows, 1)."""
    import bisect
    import json

    events = json.loads(trace.read_text())
    nodes = sorted((e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")),
                   key=lambda e: e["ts"])
    split: dict[int, Counter] = {}
    steps: Counter = Counter()
    starts = [e["ts"] for e in nodes]
    for run in (e for e in events if e.get("name") == "model_run"):
        inside = nodes[bisect.bisect_left(starts, run["ts"]):bisect.bisect_right(starts, run["ts"] + run["dur"])]
        embed = next((e for e in inside if "embed_tokens" in e["name"]), None)
        typed = (embed or {}).get("args", {}).get("input_type_shape", [])
        ids = next((shape for x in typed for kind, shape in x.items() if kind == "int64" and len(shape) == 2), None)
        if ids is None or ids[1] != 1:
            continue  # a prompt, not a decode step
        rows = ids[0]
        steps[rows] += 1
        ops = split.setdefault(rows, Counter())
        ops["step (model_run)"] += run["dur"]
        for e in inside:
            ops["output layer" if "lm_head" in e["name"] else e["args"]["op_name"]] += e["dur"]
    return {rows: {op: round(us / steps[rows] / 1000, 2) for op, us in ops.most_common()} for rows, ops in split.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", type=Path, help="an ONNX export folder or a model folder")
    parser.add_argument("--sequences", default="1,16", help="numbers of sequences decoded together")
    parser.add_argument("--max-tokens", type=int, default=32, help="new tokens per sequence")
    parser.add_argument("--runs", type=int, default=3, help="timed rounds (median)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--json", default="batch_step_profile", help="results file name under benchmarks/results/")
    parser.add_argument("--ort-ops", action="store_true",
                        help="ONNX: also ONNX Runtime's profile of the decode steps, ms by op type")
    args = parser.parse_args()
    sizes = [int(n) for n in args.sequences.split(",")]

    import torch

    from slmforge.generate import SamplingParams
    from slmforge.serve._batch import BatchEngine, BatchRequest
    from slmforge.serve.bench import BENCH_PROMPTS

    torch.set_num_threads(args.threads)
    trace_dir = None
    if args.ort_ops:  # the batching session's options come from _options_like: switch its profiler on
        import tempfile

        import slmforge.serve._batch_onnx as backend

        trace_dir, options_like = Path(tempfile.mkdtemp()), backend._options_like

        def profiled(source):
            options = options_like(source)
            options.enable_profiling, options.profile_file_prefix = True, str(trace_dir / "ort")
            return options

        backend._options_like = profiled
    if (args.model / "genai_config.json").is_file():
        from slmforge.generate import OnnxGenerator

        gen = OnnxGenerator(args.model, threads=args.threads)
    else:
        from slmforge.generate import TorchGenerator

        gen = TorchGenerator.from_pretrained(args.model, device="cpu")
    engine = BatchEngine(gen, max_batch_size=max(sizes))
    clock: Counter = Counter()
    timed(engine, clock)
    params = SamplingParams(max_new_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            seed=0 if args.temperature else None, ignore_eos=True)
    prompts = [engine.encode(q, True) for q in BENCH_PROMPTS]

    def round_(n: int) -> dict[str, float]:
        clock.clear()
        t0 = time.perf_counter()
        handles = [engine.submit(BatchRequest(prompts[i % len(prompts)], dataclasses.replace(params)))
                   for i in range(n)]
        for h in handles:
            _, fin, _ = h.wait()
            assert fin.error is None and fin.completion_tokens == args.max_tokens, fin
        wall = time.perf_counter() - t0
        return {"tokens_per_s": n * args.max_tokens / wall, "wall_s": wall, **clock}

    rows = []
    for n in sizes:
        rounds = [round_(n) for _ in range(args.runs + 1)][1:]  # the first is the warm-up
        row: dict = {"sequences": n}
        for key in rounds[0]:
            row[key] = round(median([r.get(key, 0.0) for r in rounds]), 4)
        row["decode_step_ms"] = round(1000 * row["decode"] / max(row["decode_calls"], 1), 1)
        row["choose_emit_ms_per_step"] = round(1000 * row["choose+emit"] / max(row["choose+emit_calls"], 1), 1)
        rows.append(row)
    engine.stop()
    ops = ort_op_split(Path(engine.backend.session.end_profiling())) if trace_dir else {}

    m = machine()
    how = f"temperature {args.temperature}, top_p {args.top_p}" if args.temperature else "greedy"
    print(f"\n{args.model} ({gen.engine}): {how}, {args.max_tokens} new tokens per sequence, median of {args.runs}; "
          f"{args.threads} threads; machine: {m['cpu']}, {m['cores']} cores, load avg {os.getloadavg()[0]:.2f}\n")
    print("| sequences | tokens/s | wall s | prefill s | decode s | choose+emit s | decode step ms | choose+emit ms/step |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['sequences']} | {r['tokens_per_s']:.1f} | {r['wall_s']:.2f} | {r['prefill']:.2f} | {r['decode']:.2f} "
              f"| {r['choose+emit']:.3f} | {r['decode_step_ms']:.1f} | {r['choose_emit_ms_per_step']:.1f} |")
    for n, split in sorted(ops.items()):
        print(f"\nONNX Runtime, a decode step of {n} rows, ms: " + ", ".join(f"{k} {v}" for k, v in split.items()))
    path = save(args.json, {"settings": {"model": str(args.model), "engine": gen.engine, "runs": args.runs,
                                         "max_tokens": args.max_tokens, "threads": args.threads,
                                         "temperature": args.temperature, "top_p": args.top_p,
                                         "load_average_1min": os.getloadavg()[0]}, "results": rows,
                            "ort_decode_ms_by_op": ops})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
