"""Continuous batching without HTTP: ``BatchEngine.submit`` from Python vs. transformers' ``generate``.

    python benchmarks/batch_engine.py [MODEL] [--runs 3] [--sequences 1,4,32] [--max-tokens 64]

MODEL is a model folder (default quickstart/runs/sft, made by ``make demo``). What the serving
benchmark (serve_load.py) measures over HTTP, here without the server, the event loop and the
load generator: the ceiling the server works against.

For each number of sequences N, one round runs, in this order:

- engine: N requests submitted at once to one ``BatchEngine`` (max batch size = the largest N),
  waiting until all have finished;
- generate: one ``model.generate`` call over the same N prompts, left-padded (N = 1: a plain call).
  Unlike the engine it cannot take new requests until its whole batch ends.

Both decode the quickstart's chat questions (``slmforge.serve.bench.BENCH_PROMPTS`` rendered with
the model's chat template, as the server does), greedy with repetition penalty 1.1 (the quickstart
model's default ``factual`` profile), exactly ``--max-tokens`` new tokens each (``ignore_eos`` /
``min_new_tokens``). tokens/s = N x max-tokens / wall time of the round, median of ``--runs``
rounds after one warm-up round; torch threads are left at torch's default, as in the server.
Prints a table and writes benchmarks/results/batch_engine.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from pathlib import Path

from _common import machine, median, save

DEFAULT_MODEL = Path("quickstart/runs/sft")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", nargs="?", type=Path, default=DEFAULT_MODEL, help="a model folder (torch engine)")
    parser.add_argument("--runs", type=int, default=3, help="timed rounds (median)")
    parser.add_argument("--sequences", default="1,4,32", help="numbers of sequences decoded together")
    parser.add_argument("--max-tokens", type=int, default=64, help="new tokens per sequence")
    parser.add_argument("--repetition-penalty", type=float, default=1.1)
    args = parser.parse_args()
    if not (args.model / "config.json").is_file():
        parser.error(f"{args.model} is not a model folder; make one with `make demo` (quickstart/runs/sft)")
    sizes = [int(n) for n in args.sequences.split(",")]

    import torch

    from slmforge.generate import SamplingParams, TorchGenerator
    from slmforge.serve._batch import BatchEngine, BatchRequest
    from slmforge.serve.bench import BENCH_PROMPTS

    gen = TorchGenerator.from_pretrained(args.model, device="cpu")
    engine = BatchEngine(gen, max_batch_size=max(sizes))
    prompts = [engine.encode(engine.render_chat([{"role": "user", "content": q}]), False) for q in BENCH_PROMPTS]
    params = SamplingParams(max_new_tokens=args.max_tokens, temperature=0.0,
                            repetition_penalty=args.repetition_penalty, ignore_eos=True)
    pad = engine.pad_id

    def batch_of(n: int) -> list[list[int]]:
        return [prompts[i % len(prompts)] for i in range(n)]

    def run_engine(n: int) -> None:
        handles = [engine.submit(BatchRequest(ids, dataclasses.replace(params))) for ids in batch_of(n)]
        for h in handles:
            _, fin, _ = h.wait()
            assert fin.error is None and fin.completion_tokens == args.max_tokens, fin

    def run_generate(n: int) -> None:
        rows = batch_of(n)
        width = max(len(r) for r in rows)
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        with torch.inference_mode():
            out = gen.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.max_tokens,
                                     min_new_tokens=args.max_tokens, do_sample=False,
                                     repetition_penalty=args.repetition_penalty, pad_token_id=pad)
        assert out.shape[1] == width + args.max_tokens

    runners = {"engine": run_engine, "generate": run_generate}
    times: dict[tuple[str, int], list[float]] = {(k, n): [] for n in sizes for k in runners}
    for round_ in range(args.runs + 1):  # round 0 is the warm-up
        for n in sizes:
            for kind, fn in runners.items():
                t0 = time.perf_counter()
                fn(n)
                if round_:
                    times[(kind, n)].append(time.perf_counter() - t0)
    engine.stop()

    rows = []
    for n in sizes:
        row = {"sequences": n, "new_tokens": n * args.max_tokens}
        for kind in runners:
            row[f"{kind}_tokens_per_s"] = round(n * args.max_tokens / median(times[(kind, n)]), 1)
            row[f"{kind}_seconds"] = [round(t, 4) for t in times[(kind, n)]]
        row["engine_over_generate"] = round(row["engine_tokens_per_s"] / row["generate_tokens_per_s"], 3)
        rows.append(row)

    m = machine()
    print(f"\n{args.model}: greedy, repetition penalty {args.repetition_penalty}, {args.max_tokens} new tokens per "
          f"sequence, median of {args.runs}; torch threads {torch.get_num_threads()}; machine: {m['cpu']}, "
          f"{m['cores']} cores, load avg {os.getloadavg()[0]:.2f}\n")
    print("| sequences | BatchEngine tokens/s | model.generate tokens/s | engine / generate |")
    print("|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['sequences']} | {r['engine_tokens_per_s']:.1f} | {r['generate_tokens_per_s']:.1f} "
              f"| {r['engine_over_generate']:.2f}x |")
    path = save("batch_engine", {
        "settings": {"model": str(args.model), "runs": args.runs, "max_tokens": args.max_tokens,
                     "repetition_penalty": args.repetition_penalty, "max_batch_size": max(sizes),
                     "torch_threads": torch.get_num_threads(), "load_average_1min": os.getloadavg()[0]},
        "results": rows,
    })
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
