"""ONNX export at fp32, int8 and int4: size, parity with PyTorch, and what I/O binding buys.

    python benchmarks/onnx_export.py [MODEL] [--precisions fp32,int8,int4] [--runs 5] [--threads 2]

MODEL is a model folder (default quickstart/runs/sft, made by ``make demo``). Each precision is
exported with ``slmforge.export.onnx.export_onnx`` (int8/int4: weight-only block quantization of
every MatMul) into a temporary folder, then:

- parity: ``parity_report`` against the PyTorch model it came from, on the prompts below, 32 greedy
  tokens each: the largest logit difference (and the largest logit, for scale), top-1 agreement
  over every position and greedy agreement over the generated ones;
- decode speed: ``OnnxGenerator.complete`` greedily decoding exactly ``--new-tokens`` tokens
  (``ignore_eos``) with I/O binding (pre-allocated, in-place KV cache; the engine's default) and
  without (plain ``session.run``, the KV cache copied in and out every step), one session, the two
  modes alternating in every round (the first mode of a round alternates too), after one warm-up
  call of each; tokens/s from the median of ``--runs`` rounds over the prompts, and in how many
  rounds I/O binding was the faster (on a busy machine the ratio of medians alone can mislead).
  The logits of both modes are compared once (they must be equal).

Prints a table and writes benchmarks/results/onnx_export.json.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from _common import machine, median, save

DEFAULT_MODEL = Path("quickstart/runs/sft")
PROMPTS = ["def fibonacci(n):", "The json module", "Return the number of", "class Queue:"]


def decode_speeds(onnx_dir: Path, new_tokens: int, runs: int, threads: int) -> dict:
    """Tokens/s with and without I/O binding, alternating, and the largest logit difference between them."""
    import numpy as np

    from slmforge.generate import SamplingParams
    from slmforge.generate._onnx import OnnxGenerator

    gen = OnnxGenerator(onnx_dir, threads=threads)
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    ids = list(gen.tokenizer(PROMPTS[0])["input_ids"])
    follow = list(range(5, 5 + 16))  # any fixed tokens: both modes must score them identically
    logits = {}
    for mode in (False, True):
        gen.io_binding = mode
        logits[mode] = gen.decode_logits(ids, follow)
        gen.complete(PROMPTS[0], params)  # warm-up
    seconds: dict[bool, list[float]] = {False: [], True: []}
    tokens: dict[bool, int] = {False: 0, True: 0}
    for r in range(runs):
        for mode in ((False, True) if r % 2 == 0 else (True, False)):
            gen.io_binding = mode
            t0, made = time.perf_counter(), 0
            for p in PROMPTS:
                made += gen.complete(p, params)[0].tokens
            seconds[mode].append(time.perf_counter() - t0)
            tokens[mode] = made
    plain = tokens[False] / median(seconds[False])
    bound = tokens[True] / median(seconds[True])
    return {"plain_tokens_per_s": round(plain, 1), "io_binding_tokens_per_s": round(bound, 1),
            "io_binding_speedup": round(bound / plain, 3),
            "io_binding_faster_rounds": sum(b < p for p, b in zip(seconds[False], seconds[True])),
            "io_binding_max_abs_logit_diff": float(np.abs(logits[False] - logits[True]).max()),
            "seconds": {"plain": [round(s, 4) for s in seconds[False]],
                        "io_binding": [round(s, 4) for s in seconds[True]]}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", nargs="?", type=Path, default=DEFAULT_MODEL, help="a model folder")
    parser.add_argument("--precisions", default="fp32,int8,int4")
    parser.add_argument("--new-tokens", type=int, default=128, help="tokens decoded per prompt for the speed")
    parser.add_argument("--runs", type=int, default=5, help="timed rounds (median)")
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    args = parser.parse_args()
    if not (args.model / "config.json").is_file():
        parser.error(f"{args.model} is not a model folder; make one with `make demo` (quickstart/runs/sft)")

    from slmforge.export.onnx import export_onnx, parity_report

    pytorch_bytes = sum(f.stat().st_size for f in args.model.glob("*.safetensors"))
    rows = []
    with tempfile.TemporaryDirectory(prefix="slmforge-onnx-bench-") as tmp:
        for precision in args.precisions.split(","):
            out = Path(tmp) / precision
            export_onnx(args.model, out, precision=precision)
            size = sum(f.stat().st_size for f in out.iterdir() if f.name.startswith("model.onnx"))
            parity = parity_report(args.model, out, PROMPTS, max_new_tokens=32)
            speed = decode_speeds(out, args.new_tokens, args.runs, args.threads)
            rows.append({"precision": precision, "bytes": size, **parity, **speed})
            print(f"  {precision}: top-1 {parity['top1_agreement']:.3f}, greedy {parity['greedy_agreement']:.3f}, "
                  f"I/O binding {speed['io_binding_speedup']:.2f}x", flush=True)

    m = machine()
    print(f"\n{args.model} (PyTorch safetensors {pytorch_bytes / 1e6:.1f} MB): {len(PROMPTS)} prompts x 32 greedy "
          f"tokens for parity; {args.new_tokens} tokens per prompt for speed, median of {args.runs}, "
          f"{args.threads} threads; machine: {m['cpu']}, {m['cores']} cores, load avg {os.getloadavg()[0]:.2f}\n")
    print("| precision | size MB | max logit diff (max logit) | top-1 agreement | greedy agreement "
          "| greedy identical | plain tok/s | I/O binding tok/s | speed-up | faster rounds | logits equal |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['precision']} | {r['bytes'] / 1e6:.1f} | {r['max_abs_diff']:.2g} ({r['max_abs_logit']:.1f}) "
              f"| {r['top1_agreement']:.3f} | {r['greedy_agreement']:.3f} | {r['greedy_identical']}/{r['prompts']} "
              f"| {r['plain_tokens_per_s']:.1f} | {r['io_binding_tokens_per_s']:.1f} | {r['io_binding_speedup']:.2f}x "
              f"| {r['io_binding_faster_rounds']}/{args.runs} "
              f"| {'yes' if r['io_binding_max_abs_logit_diff'] == 0 else r['io_binding_max_abs_logit_diff']} |")
    path = save("onnx_export", {
        "settings": {"model": str(args.model), "pytorch_bytes": pytorch_bytes, "prompts": PROMPTS,
                     "parity_new_tokens": 32, "new_tokens": args.new_tokens, "runs": args.runs,
                     "threads": args.threads, "load_average_1min": os.getloadavg()[0]},
        "results": rows,
    })
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
