"""Running a model larger than memory: accelerate offload at shrinking memory budgets.

    python benchmarks/offload.py [--preset small] [--budgets 1,0.5,0.25] [--prompt-tokens 128]
                                 [--new-tokens 32] [--runs 3] [--threads 1]

A randomly initialised model of the preset (vocabulary 8192; ``small`` is ~25M
parameters, ~100 MB in fp32) is saved as safetensors and loaded with
``slmforge.compress.load_offloaded`` once without a budget, then with "fast
memory" limited to each share of its fp32 weights. On a CPU-only machine fast
memory is CPU RAM (``max_memory={"cpu": budget}``) and whatever does not fit is
disk-offloaded (``offload_folder``: accelerate memory-maps the safetensors and
copies each offloaded layer in on every forward pass). On a CUDA machine fast
memory is GPU 0, then CPU RAM, then disk. For each budget: where the weights
went, load time, prefill latency of one ``--prompt-tokens`` prompt, greedy
decode speed for ``--new-tokens`` tokens at batch 1 (medians of ``--runs``), and
the largest logit difference from the unlimited load (must be 0: offload moves
weights, it never changes them). Prints a table and writes
benchmarks/results/offload.json.

Read the disk rows with care: a machine with spare RAM keeps the "offloaded"
file in the OS page cache, so disk offload costs a memory copy per layer per
step, not a disk read. With a model truly larger than RAM every decoded token
rereads every offloaded byte from the drive.

When a smaller quantized model is the better choice
---------------------------------------------------
Offload trades memory for bandwidth on *every* forward pass: decoding one token
moves all offloaded weights across the slow link, so tokens/s is bounded by
(link bandwidth) / (offloaded bytes): ~25 GB/s PCIe moving 10 GB caps decoding
at ~2.5 tokens/s, ~3 GB/s NVMe at ~0.3. A quantized model that fits instead runs
at in-memory speed: int8 stores the linears in a quarter of their fp32 bytes,
int4 in about an eighth (``slmforge quantize`` records ``compression_ratio``),
usually for a perplexity cost under a percent or two, which the quantize gate
measures. So:

- quantize first when the quantized model fits fast memory and passes the gate:
  interactive use, serving, anything latency-bound;
- offload when quality needs the full-precision weights and latency does not
  matter: offline batch jobs, long prompts or large batches (prefill amortizes
  each transfer over many tokens), or evaluating a model before deciding how
  to shrink it;
- combine them when even the quantized model does not fit: fewer bytes to move
  per step makes offload proportionally faster.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from _common import machine, median, save

VOCAB = 8192


def placement(model, weights_file: Path) -> dict[str, int]:
    """Bytes of the saved weights per device (``cpu``, ``disk``, GPU index) of an offloaded model."""
    from safetensors import safe_open

    device_map = getattr(model, "hf_device_map", None) or {"": "memory"}
    out: dict[str, int] = {}
    with safe_open(str(weights_file), "pt") as f:
        for name in f.keys():
            sl = f.get_slice(name)
            n = 1
            for d in sl.get_shape():
                n *= d
            keys = [k for k in device_map if k == "" or name == k or name.startswith(k + ".")]
            where = str(device_map[max(keys, key=len)]) if keys else "memory"
            nbytes = n * {"F32": 4, "BF16": 2, "F16": 2}.get(sl.get_dtype(), 4)
            out[where] = out.get(where, 0) + nbytes
    return out


def bench_budget(path: Path, budget: int | None, work: Path, prompt, new_tokens: int, runs: int, reference):
    import torch

    from slmforge.compress import load_offloaded

    t0 = time.perf_counter()
    model = load_offloaded(path, budget, work / f"offload-{budget}")
    if budget is None and torch.cuda.is_available():
        model.to("cuda")
    load_s = time.perf_counter() - t0
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ids = prompt.to(device)
    with torch.inference_mode():
        logits = model(input_ids=ids).logits.float().cpu()  # also the warm-up
        prefill, decode = [], []
        for _ in range(runs):
            t0 = time.perf_counter()
            model(input_ids=ids)
            prefill.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
            decode.append(time.perf_counter() - t0)
            assert out.shape[1] == ids.shape[1] + new_tokens
    where = placement(model, path / "model.safetensors")
    total = sum(where.values())
    slow = {"disk", "cpu"} if torch.cuda.is_available() else {"disk"}
    offloaded = sum(v for k, v in where.items() if k in slow)
    decode_s = max(median(decode) - median(prefill), 1e-9)  # generate includes one prefill
    diff = 0.0 if reference is None else float((logits - reference).abs().max())
    del model
    return {
        "budget_bytes": budget,
        "placement_bytes": where,
        "offloaded_share": round(offloaded / total, 3),
        "load_s": round(load_s, 3),
        "prefill_ms": round(1000 * median(prefill), 2),
        "decode_tokens_per_s": round(new_tokens / decode_s, 2),
        "max_abs_logit_diff": diff,
    }, logits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--budgets", default="1,0.5,0.25",
                        help="shares of the fp32 weights allowed in fast memory, after an unlimited load")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0 = torch's choice)")
    args = parser.parse_args()

    import torch

    from slmforge.config import ModelConfig
    from slmforge.model import PRESETS, build_model

    if args.preset not in PRESETS:
        parser.error(f"unknown preset {args.preset!r}; choose from {', '.join(PRESETS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="slmforge-offload-"))
    try:
        model = build_model(ModelConfig(preset=args.preset), vocab_size=VOCAB, special_ids=None, seed=0)
        params = sum(p.numel() for p in model.parameters())
        model.save_pretrained(work / "model")
        del model
        weights = (work / "model" / "model.safetensors").stat().st_size
        prompt = torch.randint(5, VOCAB, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(0))
        rows, reference = [], None
        shares = [None] + [float(s) for s in args.budgets.split(",")]
        for share in shares:
            budget = None if share is None else int(share * weights)
            row, logits = bench_budget(work / "model", budget, work, prompt, args.new_tokens, args.runs, reference)
            row["budget"] = "unlimited" if share is None else f"{share:.0%}"
            reference = logits if reference is None else reference
            rows.append(row)
            print(f"  {row['budget']}: offloaded {row['offloaded_share']:.0%}, prefill {row['prefill_ms']} ms, "
                  f"decode {row['decode_tokens_per_s']} tok/s", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    fast = "GPU" if torch.cuda.is_available() else "CPU RAM"
    print(f"\n{args.preset} preset, {params / 1e6:.1f}M parameters, {weights / 1e6:.1f} MB fp32; budget = share of the "
          f"weights allowed in {fast}; prompt {args.prompt_tokens} tokens, {args.new_tokens} new tokens, "
          f"median of {args.runs} (torch threads {torch.get_num_threads()}, load avg {os.getloadavg()[0]:.2f})")
    head = (f"{'budget':<10}{'offloaded':>10}{'load s':>9}{'prefill ms':>12}{'decode tok/s':>14}"
            f"{'vs unlimited':>14}{'max |dlogit|':>14}")
    print(head)
    print("-" * len(head))
    base = rows[0]["decode_tokens_per_s"]
    for r in rows:
        print(f"{r['budget']:<10}{r['offloaded_share']:>10.0%}{r['load_s']:>9.2f}{r['prefill_ms']:>12.1f}"
              f"{r['decode_tokens_per_s']:>14.1f}{r['decode_tokens_per_s'] / base:>14.2f}{r['max_abs_logit_diff']:>14.2g}")
    path = save("offload", {
        "settings": {"preset": args.preset, "params": params, "weights_bytes": weights, "vocab_size": VOCAB,
                     "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "runs": args.runs,
                     "torch_threads": torch.get_num_threads(), "fast_memory": fast,
                     "load_average_1min": os.getloadavg()[0]},
        "results": rows,
    })
    print(f"\nwrote {path}  (machine: {machine()['cpu']}, {machine()['cores']} cores)")


if __name__ == "__main__":
    main()
