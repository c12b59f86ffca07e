"""One model, every runtime: tokens/s at batch 1, size, and held-out perplexity.

    python benchmarks/runtime_compare.py --model quickstart/runs/sft --data quickstart/runs/data

Rows: PyTorch fp32 eager, PyTorch int8 (slmforge int8_dynamic), ONNX Runtime
fp32/int8/int4 (slmforge export onnx), llama.cpp F16/Q8_0/Q4_0 (slmforge export
gguf, run by xllamacpp). Each engine greedily continues the same prompts for
exactly 128 new tokens (``ignore_eos``), batch 1, median tokens/s over the
prompts (prompt processing and per-call overhead included); perplexity is
from each engine's own log-likelihoods on the same held-out documents (n/a
where the engine exposes no token log-probabilities): each document alone
(its first 2,000 characters), so it is not the packed test-split perplexity
that ``slmforge quantize`` and the report measure. Size is the bytes of the
weights files each runtime loads, as saved (safetensors, ONNX + external data,
GGUF; the int8 row is the folder ``slmforge quantize`` would write), so a tied
embedding counts once where the format stores it once. The last column relates
the speed to the memory-bandwidth bound: bytes of weights read per token vs.
the machine's measured bandwidth (a STREAM-like numpy triad, one thread).
Writes benchmarks/results/runtime_compare.json.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

from _common import bandwidth_gbs, machine, median, save

# Plain-text continuations: this domain model writes docstring prose after them until it emits <|eos|>.
PROMPTS = ["def fibonacci(n):", "The json module", "Return the number of", "class Queue:"]


def decode_speed(gen, params, rounds: int = 3) -> tuple[float, float]:
    """Generated tokens per second of wall time per call (prompt processing and call overhead
    included), median over prompts and rounds; and the mean tokens generated per call."""
    rates, counts = [], []
    for _ in range(rounds):
        for p in PROMPTS:
            t0 = time.perf_counter()
            out = gen.complete(p, params)[0]
            dt = time.perf_counter() - t0
            rates.append(max(out.tokens, 1) / dt)
            counts.append(out.tokens)
    return median(rates), sum(counts) / len(counts)


def held_out_ppl(gen, texts: list[str]) -> float | None:
    if not hasattr(gen, "loglikelihood"):
        return None
    lls = gen.loglikelihood([("", t) for t in texts], batch_size=4)
    tokens = sum(len(gen.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)
    return math.exp(-sum(lls) / tokens)


def folder_bytes(path: Path, suffixes=(".safetensors", ".onnx", ".data", ".gguf")) -> int:
    files = [path] if path.is_file() else [f for f in path.glob("*") if f.suffix in suffixes or f.name.endswith(".onnx.data")]
    return sum(f.stat().st_size for f in files)


def measure(kind: str, path: Path, data: Path, docs: int, threads: int) -> dict:
    """One runtime, measured in its own process (engines keep thread pools spinning after
    they are done, which would slow whichever engine is measured next in the same process)."""
    import torch

    from slmforge.generate import LlamaCppGenerator, OnnxGenerator, SamplingParams, TorchGenerator

    torch.set_num_threads(threads)
    texts = [json.loads(line)["text"][:2000] for line in (data / "text" / "test.jsonl").read_text().splitlines()][:docs]
    if kind == "torch":
        gen, size = TorchGenerator.from_pretrained(path, device="cpu"), folder_bytes(path)
    elif kind == "torch-int8":
        from slmforge.compress import quantize_model, save_quantized

        gen = TorchGenerator.from_pretrained(path, device="cpu")
        layers = quantize_model(gen.model, "int8_dynamic")
        # The size on disk of what `slmforge quantize` writes: the tied embedding / lm_head is one
        # tensor there (summing the state dict counted it twice).
        with tempfile.TemporaryDirectory() as tmp:
            size = save_quantized(gen.model, gen.tokenizer, Path(tmp), layers).stat().st_size
    elif kind == "onnx":
        gen, size = OnnxGenerator(path, threads=threads), folder_bytes(path)
    else:
        gen, size = LlamaCppGenerator(path, n_threads=threads), path.stat().st_size
    gen.complete(PROMPTS[0], SamplingParams(max_new_tokens=8))  # warm-up
    tps, new_tokens = decode_speed(gen, SamplingParams(max_new_tokens=128, temperature=0.0, ignore_eos=True))
    ppl = held_out_ppl(gen, texts)
    return {"bytes": size, "tokens_per_s": round(tps, 1), "new_tokens": round(new_tokens, 1),
            "ppl": round(ppl, 3) if ppl else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, type=Path, help="a model folder (e.g. quickstart/runs/sft)")
    parser.add_argument("--data", required=True, type=Path, help="its data artifact (held-out text/test.jsonl)")
    parser.add_argument("--docs", type=int, default=40, help="held-out documents for perplexity")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--worker", nargs=2, metavar=("KIND", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(measure(args.worker[0], Path(args.worker[1]), args.data, args.docs, args.threads)))
        return

    import subprocess
    import sys

    from slmforge.export.gguf import export_gguf
    from slmforge.export.onnx import export_onnx

    bw = bandwidth_gbs()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        runs = [("PyTorch fp32 eager", "torch", args.model), ("PyTorch int8 (dynamic)", "torch-int8", args.model)]
        for precision in ("fp32", "int8", "int4"):
            out = tmp / f"onnx-{precision}"
            export_onnx(args.model, out, precision=precision)
            runs.append((f"ONNX Runtime {precision}", "onnx", out))
        for gtype in ("F16", "Q8_0", "Q4_0"):
            runs.append((f"llama.cpp {gtype}", "gguf", export_gguf(args.model, tmp / f"model-{gtype}.gguf", type=gtype)))
        for name, kind, path in runs:
            cmd = [sys.executable, __file__, "--model", str(args.model), "--data", str(args.data), "--docs",
                   str(args.docs), "--threads", str(args.threads), "--worker", kind, str(path)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"{name} failed:\n{proc.stderr[-2000:]}")
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            bound = bw * 1e9 / r["bytes"]
            rows.append({"runtime": name, **r, "bandwidth_bound_tps": round(bound, 1),
                         "share_of_bound": round(r["tokens_per_s"] / bound, 3)})
    print(f"machine: {machine()['cpu']}, {machine()['cores']} cores, {args.threads} threads; "
          f"measured bandwidth {bw:.1f} GB/s (one thread, numpy triad); each runtime in its own process")
    print(f"{'runtime':<26}{'size MB':>9}{'tok/s':>9}{'tokens':>8}{'ppl':>10}{'bound tok/s':>13}{'of bound':>10}")
    for r in rows:
        ppl = f"{r['ppl']:.2f}" if r["ppl"] else "n/a"
        print(f"{r['runtime']:<26}{r['bytes'] / 1e6:>9.1f}{r['tokens_per_s']:>9.1f}{r['new_tokens']:>8.1f}{ppl:>10}"
              f"{r['bandwidth_bound_tps']:>13.0f}{r['share_of_bound'] * 100:>9.1f}%")
    path = save("runtime_compare", {"model": str(args.model), "bandwidth_gbs": bw, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
