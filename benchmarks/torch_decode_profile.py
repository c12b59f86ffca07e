"""Where a batch-1 decode step of the torch engine spends its time, and the LM head's layouts.

    python benchmarks/torch_decode_profile.py --model benchmarks/results/gemma-3-270m-torch

Two parts, in one process, 2 threads by default:
1. ``torch.profiler`` over one greedy ``TorchGenerator.complete`` of --tokens tokens (ignore_eos),
   with the engine as shipped (greedy steps: the certified head, int8-screened where oneDNN allows),
   with the fp32 column-major head twin for greedy steps too, and with the plain row-major head (the
   other layers oneDNN-packed in all three): self CPU time per generated token, split into the LM
   head's products (the ops whose weight has the vocabulary's rows, and the int8 screen's), the
   other matrix products, attention, and everything else; and, as shipped, how many tokens a step
   recomputed in fp32.
2. The LM head's product alone (``F.linear`` on random rows, the model's own weight), row-major,
   column-major and bf16 row-major, and the int8 screen (product, bound and candidates), for 1, 4
   and 16 rows: median ms over 10 calls.
Writes benchmarks/results/torch_decode_profile.json (--json names another file).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from _common import machine, median, save


def profile_decode(gen, tokens: int) -> dict:
    """Self CPU ms per generated token by kind of op, from one profiled greedy completion."""
    from torch.profiler import ProfilerActivity, profile

    from slmforge.generate import SamplingParams

    params = SamplingParams(max_new_tokens=tokens, ignore_eos=True)
    gen.complete("The json module", SamplingParams(max_new_tokens=4))  # warm-up (and the twin, if any)
    vocab = gen.model.get_output_embeddings().weight.shape[0]
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        t0 = time.perf_counter()
        gen.complete("The json module", params)
        wall = time.perf_counter() - t0
    split = {"lm_head_mm": 0.0, "other_mm": 0.0, "attention": 0.0, "rest": 0.0}
    for event in prof.key_averages(group_by_input_shape=True):
        ms = event.self_cpu_time_total / 1000
        if event.key in ("aten::mm", "aten::addmm", "aten::addmm_", "mkldnn::_linear_pointwise"):
            head = any(vocab in shape for shape in event.input_shapes if isinstance(shape, list))
            split["lm_head_mm" if head else "other_mm"] += ms
        elif event.key == "onednn::qlinear_pointwise":  # the certified head's int8 screen
            split["lm_head_mm"] += ms
        elif "attention" in event.key:
            split["attention"] += ms
        else:
            split["rest"] += ms
    out = {k: round(v / tokens, 1) for k, v in split.items()}
    out["wall_ms_per_token_profiled"] = round(wall * 1000 / tokens, 1)
    return out


def head_layouts(weight) -> dict:
    import torch
    import torch.nn.functional as F

    from slmforge.generate._int8_head import Int8Screen

    col = weight.detach().t().contiguous().t()
    half = weight.detach().to(torch.bfloat16)
    screen = Int8Screen.build(weight.detach(), torch.randn(1, weight.shape[1]))
    rows = {}
    for m in (1, 4, 16):
        x = torch.randn(m, weight.shape[1])
        timing = {}
        products = {name: (lambda w=w, x=x.to(w.dtype): F.linear(x, w))
                    for name, w in (("row_major", weight.detach()), ("column_major", col), ("bf16", half))}
        if screen is not None:  # the int8 screen: its product, bound and candidates
            products["int8_screen"] = lambda x=x: screen.candidates(x, torch.tensor([], dtype=torch.long))
        for name, product in products.items():
            product()
            times = []
            for _ in range(10):
                t0 = time.perf_counter()
                product()
                times.append(time.perf_counter() - t0)
            timing[name] = round(median(times) * 1000, 1)
        rows[str(m)] = timing
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, type=Path, help="a model folder")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default="torch_decode_profile", help="results file name under benchmarks/results/")
    args = parser.parse_args()

    import contextlib

    import torch

    import slmforge.generate._torch as engine
    from slmforge.generate import TorchGenerator

    torch.set_num_threads(args.threads)
    gen = TorchGenerator.from_pretrained(args.model, device="cpu")
    head = gen.model.get_output_embeddings()
    shipped = profile_decode(gen, args.tokens)
    steps, recomputed = head.forward.certified_steps, head.forward.recomputed
    certified = engine.exact_argmax_only
    engine.exact_argmax_only = lambda *_: contextlib.nullcontext()  # greedy steps through the fp32 twin
    twin_only = profile_decode(gen, args.tokens)
    twin = head.__dict__.pop("forward")
    plain = profile_decode(gen, args.tokens)
    head.forward, engine.exact_argmax_only = twin, certified
    layouts = head_layouts(head.weight)
    print(f"machine: {machine()['cpu']}, {args.threads} threads; {args.model}, {args.tokens} greedy tokens, batch 1")
    print(f"{'self CPU ms per token':<28}{'certified (shipped)':>21}{'fp32 twin':>11}{'row-major head':>16}")
    for key in shipped:
        print(f"{key:<28}{shipped[key]:>21}{twin_only[key]:>11}{plain[key]:>16}")
    per_step = recomputed / max(steps, 1)
    print(f"certified steps {steps}, tokens recomputed in fp32 per step {per_step:.2f} (EOS ids included)")
    print(f"LM head {tuple(head.weight.shape)} alone, median ms: rows, row-major, column-major, bf16, int8 screen")
    for m, t in layouts.items():
        print(f"  {m:>3} {t['row_major']:>8} {t['column_major']:>8} {t['bf16']:>8} {t.get('int8_screen', 'n/a'):>8}")
    path = save(args.json, {"model": str(args.model), "threads": args.threads, "tokens": args.tokens,
                            "shipped": shipped, "fp32_twin": twin_only, "row_major_head": plain,
                            "recomputed_per_step": round(per_step, 2), "head_layouts_ms": layouts})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
