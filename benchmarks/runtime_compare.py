"""One model, every runtime: tokens/s at batch 1, size, and held-out perplexity.

    python benchmarks/runtime_compare.py --model quickstart/runs/sft --data quickstart/runs/data
    python benchmarks/runtime_compare.py --model benchmarks/results/gemma-3-270m-torch \
        --runtimes transformers,onnx-fp32,onnx-int4 --rounds 1 --json runtime_compare_gemma

Rows: PyTorch fp32 eager (slmforge's torch engine), PyTorch int8 (slmforge
int8_dynamic), ONNX Runtime fp32/int8/int4 (slmforge export onnx), llama.cpp
F16/Q8_0/Q4_0 (slmforge export gguf, run by xllamacpp); on request (--runtimes)
transformers' own ``model.generate``, the baseline other tools quote, and the torch
engine without its column-major LM head twin (``torch-row-head``, what it was before
issue 15), without the certified head of greedy steps (``torch-fp32-head``, the
twin for every step) or with its bf16 screen instead of int8 (``torch-bf16-screen``). --model is
any Hugging Face model folder, or a .gguf file (then its one llama.cpp row).
Each engine greedily continues the same prompts for
exactly --tokens new tokens (128, ``ignore_eos``), batch 1, median tokens/s over the
prompts (prompt processing and per-call overhead included); perplexity is
from each engine's own log-likelihoods on the same held-out documents (n/a
where the engine exposes no token log-probabilities): each document alone
(its first 2,000 characters), so it is not the packed test-split perplexity
that ``slmforge quantize`` and the report measure. Size is the bytes of the
weights files each runtime loads, as saved (safetensors, ONNX + external data,
GGUF; the int8 row is the folder ``slmforge quantize`` would write), so a tied
embedding counts once where the format stores it once. The last column relates
the speed to the memory-bandwidth bound: bytes of weights read per token vs.
the machine's measured bandwidth (a STREAM-like numpy triad, one thread);
"vs transformers" is the speed over the transformers row's, measured in the same run.
Writes benchmarks/results/runtime_compare.json (--json names another file).
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

from _common import bandwidth_gbs, machine, median, save

# --runtimes names: what each row runs. ONNX and GGUF rows export the model first (slmforge's own exporters).
RUNTIMES = {
    "torch": ("PyTorch fp32 eager", "torch", None),
    "torch-row-head": ("PyTorch fp32, row-major head", "torch-row-head", None),
    "torch-fp32-head": ("PyTorch fp32, fp32 greedy head", "torch-fp32-head", None),
    "torch-bf16-screen": ("PyTorch fp32, bf16-screened head", "torch-bf16-screen", None),
    "torch-int8": ("PyTorch int8 (dynamic)", "torch-int8", None),
    "transformers": ("transformers generate fp32", "transformers", None),
    "onnx-fp32": ("ONNX Runtime fp32", "onnx", "fp32"),
    "onnx-int8": ("ONNX Runtime int8", "onnx", "int8"),
    "onnx-int4": ("ONNX Runtime int4", "onnx", "int4"),
    "gguf-F16": ("llama.cpp F16", "gguf", "F16"),
    "gguf-Q8_0": ("llama.cpp Q8_0", "gguf", "Q8_0"),
    "gguf-Q4_0": ("llama.cpp Q4_0", "gguf", "Q4_0"),
}
DEFAULT_RUNTIMES = "torch,torch-int8,onnx-fp32,onnx-int8,onnx-int4,gguf-F16,gguf-Q8_0,gguf-Q4_0"

# Plain-text continuations: this domain model writes docstring prose after them until it emits <|eos|>.
PROMPTS = ["def fibonacci(n):", "The json module", "Return the number of", "class Queue:"]


def decode_speed(gen, params, rounds: int = 3) -> tuple[float, float, list[str]]:
    """Generated tokens per second of wall time per call (prompt processing and call overhead
    included), median over prompts and rounds; the mean tokens generated per call; the first round's texts."""
    rates, counts, texts = [], [], []
    for _ in range(rounds):
        for p in PROMPTS:
            t0 = time.perf_counter()
            out = gen.complete(p, params)[0]
            dt = time.perf_counter() - t0
            rates.append(max(out.tokens, 1) / dt)
            counts.append(out.tokens)
            texts.append(out.text)
    return median(rates), sum(counts) / len(counts), texts[: len(PROMPTS)]


class TransformersGenerate:
    """``model.generate`` itself, greedy, exactly ``max_new_tokens`` (the ``complete`` that decode_speed calls)."""

    def __init__(self, path: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model = AutoModelForCausalLM.from_pretrained(path).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(path)

    def complete(self, prompt, params):
        from types import SimpleNamespace

        import torch

        ids = self.tokenizer(prompt, return_tensors="pt")
        n = params.max_new_tokens
        with torch.inference_mode():
            out = self.model.generate(**ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        new = out[0, ids["input_ids"].shape[1]:].tolist()
        return [SimpleNamespace(tokens=len(new), text=self.tokenizer.decode(new, skip_special_tokens=True))]


def held_out_ppl(gen, texts: list[str]) -> float | None:
    if not hasattr(gen, "loglikelihood") or not texts:
        return None
    lls = gen.loglikelihood([("", t) for t in texts], batch_size=4)
    tokens = sum(len(gen.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)
    return math.exp(-sum(lls) / tokens)


def folder_bytes(path: Path, suffixes=(".safetensors", ".onnx", ".data", ".gguf")) -> int:
    files = [path] if path.is_file() else [f for f in path.glob("*") if f.suffix in suffixes or f.name.endswith(".onnx.data")]
    return sum(f.stat().st_size for f in files)


def measure(kind: str, path: Path, data: Path | None, docs: int, threads: int, rounds: int, tokens: int) -> dict:
    """One runtime, measured in its own process (engines keep thread pools spinning after
    they are done, which would slow whichever engine is measured next in the same process)."""
    import torch

    from slmforge.generate import LlamaCppGenerator, OnnxGenerator, SamplingParams, TorchGenerator

    torch.set_num_threads(threads)
    lines = (data / "text" / "test.jsonl").read_text().splitlines() if data else []
    texts = [json.loads(line)["text"][:2000] for line in lines][:docs]
    if kind == "transformers":
        gen, size = TransformersGenerate(path), folder_bytes(path)
    elif kind in ("torch", "torch-row-head", "torch-fp32-head", "torch-bf16-screen"):
        gen, size = TorchGenerator.from_pretrained(path, device="cpu"), folder_bytes(path)
        if kind == "torch-bf16-screen":  # the certified head's fallback screen where oneDNN int8 is unusable
            from slmforge.generate._int8_head import Int8Screen

            Int8Screen.build = classmethod(lambda cls, weight, rows: None)  # type: ignore[method-assign,assignment]
        elif kind == "torch-row-head":
            gen.model.get_output_embeddings().__dict__.pop("forward", None)  # back to the plain nn.Linear
        if kind in ("torch-row-head", "torch-fp32-head"):  # greedy steps through the fp32 twin (or weight), as before the certified head
            import contextlib

            import slmforge.generate._torch as engine

            engine.exact_argmax_only = lambda *_: contextlib.nullcontext()
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
    params = SamplingParams(max_new_tokens=tokens, temperature=0.0, ignore_eos=True)
    tps, new_tokens, outputs = decode_speed(gen, params, rounds)
    ppl = held_out_ppl(gen, texts)
    return {"bytes": size, "tokens_per_s": round(tps, 1), "new_tokens": round(new_tokens, 1),
            "ppl": round(ppl, 3) if ppl else None, "texts": outputs}


def plan(model: Path, names: list[str], tmp: Path) -> list[tuple[str, str, Path]]:
    """(row name, worker kind, path) per runtime asked for, exporting ONNX/GGUF files into ``tmp``."""
    from slmforge.export.gguf import export_gguf
    from slmforge.export.onnx import export_onnx

    if model.suffix == ".gguf":
        return [(f"llama.cpp {model.name}", "gguf", model)]
    runs = []
    for key in names:
        name, kind, variant = RUNTIMES[key]
        if kind == "onnx":
            path = export_onnx(model, tmp / f"onnx-{variant}", precision=variant).parent
        elif kind == "gguf":
            path = export_gguf(model, tmp / f"model-{variant}.gguf", type=variant)
        else:
            path = model
        runs.append((name, kind, path))
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, type=Path, help="a model folder (e.g. quickstart/runs/sft) or a .gguf")
    parser.add_argument("--data", type=Path, help="its data artifact (held-out text/test.jsonl); none: no perplexity")
    parser.add_argument("--docs", type=int, default=40, help="held-out documents for perplexity")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runtimes", default=DEFAULT_RUNTIMES, help=f"comma-separated, of: {', '.join(RUNTIMES)}")
    parser.add_argument("--rounds", type=int, default=3, help="times each prompt is decoded (the median is reported)")
    parser.add_argument("--tokens", type=int, default=128, help="new tokens per prompt (greedy, ignore_eos)")
    parser.add_argument("--json", default="runtime_compare", help="results file name under benchmarks/results/")
    parser.add_argument("--worker", nargs=2, metavar=("KIND", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(measure(args.worker[0], Path(args.worker[1]), args.data, args.docs, args.threads,
                                 args.rounds, args.tokens)))
        return
    names = [n.strip() for n in args.runtimes.split(",") if n.strip()]
    unknown = [n for n in names if n not in RUNTIMES]
    if unknown:
        raise SystemExit(f"unknown --runtimes {', '.join(unknown)}; choose from {', '.join(RUNTIMES)}")

    import subprocess
    import sys

    bw = bandwidth_gbs()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, kind, path in plan(args.model, names, Path(tmp)):
            cmd = [sys.executable, __file__, "--model", str(args.model), "--docs", str(args.docs), "--threads",
                   str(args.threads), "--rounds", str(args.rounds), "--tokens", str(args.tokens), "--worker", kind, str(path)]
            if args.data:
                cmd += ["--data", str(args.data)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"{name} failed:\n{proc.stderr[-2000:]}")
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            bound = bw * 1e9 / r["bytes"]
            rows.append({"runtime": name, **r, "bandwidth_bound_tps": round(bound, 1),
                         "share_of_bound": round(r["tokens_per_s"] / bound, 3)})
    print(f"machine: {machine()['cpu']}, {machine()['cores']} cores, {args.threads} threads; "
          f"measured bandwidth {bw:.1f} GB/s (one thread, numpy triad); each runtime in its own process")
    ref = next((r for r in rows if r["runtime"] == RUNTIMES["transformers"][0]), None)
    print(f"{'runtime':<32}{'size MB':>9}{'tok/s':>9}{'tokens':>8}{'ppl':>10}{'bound tok/s':>13}{'of bound':>10}"
          f"{'vs transformers':>17}{'same text':>11}")
    for r in rows:
        ppl = f"{r['ppl']:.2f}" if r["ppl"] else "n/a"
        r["vs_transformers"] = round(r["tokens_per_s"] / ref["tokens_per_s"], 2) if ref else None
        # Greedy texts equal to model.generate's, per prompt (the first round's).
        r["same_text_as_transformers"] = sum(a == b for a, b in zip(r["texts"], ref["texts"])) if ref else None
        ratio = f"{r['vs_transformers']:.2f}x" if ref else "n/a"
        same = f"{r['same_text_as_transformers']}/{len(PROMPTS)}" if ref else "n/a"
        print(f"{r['runtime']:<32}{r['bytes'] / 1e6:>9.1f}{r['tokens_per_s']:>9.1f}{r['new_tokens']:>8.1f}{ppl:>10}"
              f"{r['bandwidth_bound_tps']:>13.0f}{r['share_of_bound'] * 100:>9.1f}%{ratio:>17}{same:>11}")
    path = save(args.json, {"model": str(args.model), "bandwidth_gbs": bw, "rounds": args.rounds,
                            "threads": args.threads, "tokens": args.tokens, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
