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
decode step's milliseconds, and writes benchmarks/results/batch_step_profile.json (--json NAME).
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
    args = parser.parse_args()
    sizes = [int(n) for n in args.sequences.split(",")]

    import torch

    from slmforge.generate import SamplingParams
    from slmforge.serve._batch import BatchEngine, BatchRequest
    from slmforge.serve.bench import BENCH_PROMPTS

    torch.set_num_threads(args.threads)
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

    m = machine()
    how = f"temperature {args.temperature}, top_p {args.top_p}" if args.temperature else "greedy"
    print(f"\n{args.model} ({gen.engine}): {how}, {args.max_tokens} new tokens per sequence, median of {args.runs}; "
          f"{args.threads} threads; machine: {m['cpu']}, {m['cores']} cores, load avg {os.getloadavg()[0]:.2f}\n")
    print("| sequences | tokens/s | wall s | prefill s | decode s | choose+emit s | decode step ms | choose+emit ms/step |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['sequences']} | {r['tokens_per_s']:.1f} | {r['wall_s']:.2f} | {r['prefill']:.2f} | {r['decode']:.2f} "
              f"| {r['choose+emit']:.3f} | {r['decode_step_ms']:.1f} | {r['choose_emit_ms_per_step']:.1f} |")
    path = save(args.json, {"settings": {"model": str(args.model), "engine": gen.engine, "runs": args.runs,
                                         "max_tokens": args.max_tokens, "threads": args.threads,
                                         "temperature": args.temperature, "top_p": args.top_p,
                                         "load_average_1min": os.getloadavg()[0]}, "results": rows})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
