"""The two CPU products behind the torch engine's decode speed, measured on a real model's own weights.

    python benchmarks/torch_cpu_products.py --model benchmarks/results/gemma-3-270m-torch

1. **Layers** (``generate/_torch_packed.py``): every ``nn.Linear`` of the model but its LM head, one after
   another, as a decode step reads them: MKL's ``F.linear`` on the row-major weight, on a column-major copy,
   and oneDNN on weights packed once (``torch.ops.mkldnn._reorder_linear_weight``, then
   ``_linear_pointwise``), for 1, 16, 128 and 512 rows: median ms over --repeats passes, and GB/s at one row.
2. **The head's int8 screen** (``generate/_int8_head.py``): the final hidden states of greedy decoding
   (4 prompts x --tokens tokens, captured at the LM head), and how many tokens a step would have to
   recompute in fp32 with one bound per row against one per token, with 0, 8, 16 or 32 channels taken out
   of the int8 product (the channels largest on average in those states); the per-token bound with 16
   channels is what the engine ships. Checks that every bound holds against a float64 product.
Writes benchmarks/results/torch_cpu_products.json (--json NAME).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from _common import machine, median, save

PROMPTS = ["def fibonacci(n):", "The json module", "Explain how a list comprehension works.",
           "import os\nfor root, dirs, files in os.walk("]


def layer_stream(model, repeats: int) -> dict:
    import torch
    import torch.nn.functional as F

    head = model.get_output_embeddings()
    weights = [m.weight.detach() for m in model.modules() if type(m) is torch.nn.Linear and m is not head]
    layouts = {"row_major": weights, "column_major": [w.t().contiguous().t() for w in weights]}
    packed = [torch.ops.mkldnn._reorder_linear_weight(w, 16) for w in weights]
    total = sum(w.numel() * 4 for w in weights)
    out: dict = {"matrices": len(weights), "mb": round(total / 2**20, 1)}
    for rows in (1, 16, 128, 512):
        inputs = {w.shape[1]: torch.randn(rows, w.shape[1]) for w in weights}
        runs = {name: (lambda ws=ws: [F.linear(inputs[w.shape[1]], w) for w in ws]) for name, ws in layouts.items()}
        runs["onednn_packed"] = lambda: [torch.ops.mkldnn._linear_pointwise(inputs[w.shape[1]], p, None, "none", [], "")
                                         for w, p in zip(weights, packed)]
        cell = {}
        for name, run in runs.items():
            run()
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                run()
                times.append(time.perf_counter() - t0)
            cell[f"{name}_ms"] = round(median(times) * 1000, 1)
            if rows == 1:
                cell[f"{name}_gbs"] = round(total / median(times) / 1e9, 1)
        out[str(rows)] = cell
    return out


def decode_states(gen, tokens: int):
    import torch

    states = []
    head = gen.model.get_output_embeddings()
    hook = head.register_forward_hook(lambda mod, inp, out: states.append(inp[0][:, -1].detach().clone()))
    from slmforge.generate import SamplingParams

    try:
        for prompt in PROMPTS:
            gen.complete(prompt, SamplingParams(max_new_tokens=tokens, ignore_eos=True))
    finally:
        hook.remove()
    return torch.cat(states)


def screen_candidates(weight, states) -> dict:
    """Tokens a step would recompute: one bound per row (the largest token's) vs one per token."""
    import torch

    wide = weight.double()
    scales = (weight.abs().amax(1) / 127).float()
    dequant = torch.round(weight / scales[:, None]).clamp(-127, 127).double() * scales.double()[:, None]
    norms, residuals = wide.norm(dim=1), (wide - dequant).norm(dim=1)
    exact = states.double() @ wide.t()
    ranked = states.abs().mean(0).argsort(descending=True)
    out = {}
    for k in (0, 8, 16, 32):
        mask = torch.ones(states.shape[1], dtype=torch.bool)
        mask[ranked[:k]] = False
        rest = states * mask
        step = rest.abs().amax(-1) / 127
        xhat = torch.round(rest / step[:, None]).clamp(-127, 127).double() * step.double()[:, None]
        err, size = (rest.double() - xhat).norm(dim=-1), xhat.norm(dim=-1)
        approx = xhat @ dequant.t() + (states * ~mask).double() @ wide.t()
        per_token = err[:, None] * norms[None] + size[:, None] * residuals[None]
        assert bool(((approx - exact).abs() <= per_token + 1e-9).all()), "a bound failed"
        per_row = per_token.amax(-1)
        rows_count = (approx >= (approx.amax(-1) - 2 * per_row)[:, None]).sum(-1).float()
        token_count = (approx + per_token >= (approx - per_token).amax(-1)[:, None]).sum(-1).float()
        out[str(k)] = {name: {"median": float(c.median()), "mean": round(float(c.mean()), 1), "max": float(c.max())}
                       for name, c in (("per_row", rows_count), ("per_token", token_count))}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, type=Path, help="a model folder")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--tokens", type=int, default=48, help="greedy tokens per prompt for the captured states")
    parser.add_argument("--json", default="torch_cpu_products", help="results file name under benchmarks/results/")
    args = parser.parse_args()

    import torch

    from slmforge.generate import TorchGenerator

    torch.set_num_threads(args.threads)
    gen = TorchGenerator.from_pretrained(args.model, device="cpu")
    layers = layer_stream(gen.model, args.repeats)
    print(f"machine: {machine()['cpu']}, {args.threads} threads; {args.model}")
    print(f"layers: {layers['matrices']} matrices, {layers['mb']} MB fp32, one after another; median ms")
    print(f"{'rows':>5}{'MKL row-major':>15}{'column-major':>14}{'oneDNN packed':>15}")
    for rows in ("1", "16", "128", "512"):
        c = layers[rows]
        print(f"{rows:>5}{c['row_major_ms']:>15}{c['column_major_ms']:>14}{c['onednn_packed_ms']:>15}")
    one = layers["1"]
    print(f"one row, GB/s: {one['row_major_gbs']} / {one['column_major_gbs']} / {one['onednn_packed_gbs']}")
    states = decode_states(gen, args.tokens)
    screen = screen_candidates(gen.model.get_output_embeddings().weight.detach(), states)
    print(f"\nint8 screen, {states.shape[0]} decode states: tokens to recompute a step (median / mean / max)")
    print(f"{'fp32 channels':>14}{'one bound per row':>26}{'one bound per token':>26}")
    for k, c in screen.items():
        row, tok = c["per_row"], c["per_token"]
        print(f"{k:>14}{row['median']:>10.0f} /{row['mean']:>8} /{row['max']:>6.0f}"
              f"{tok['median']:>10.0f} /{tok['mean']:>8} /{tok['max']:>6.0f}")
    path = save(args.json, {"model": str(args.model), "threads": args.threads, "layers": layers,
                            "states": int(states.shape[0]), "screen": screen})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
