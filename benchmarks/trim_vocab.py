"""Vocabulary trimming on a real model: Gemma 3 270M trimmed to the python-docs domain, before vs after.

    python benchmarks/trim_vocab.py [--data quickstart/runs/data] [--rounds 3] [--tokens 64] [--threads 2]

Trims Gemma 3 270M (the offline package, dequantised once by benchmarks/agent_tools.py) to the tokens
the quickstart dataset's training split uses (``slmforge model trim-vocab``), then measures both models
in the same run, rounds alternating between them: weights on disk and parameters; held-out perplexity and
bits per byte on the validation split (``slmforge.evaluate.perplexity``: the trimmed tokenizer splits
text outside the training split into a few more pieces, so bits per byte is the comparable number);
training throughput (one full-parameter AdamW step, forward and backward, on 4 x 256 tokens of domain
text; median of ``--rounds``); greedy decoding with the torch engine (``--tokens`` new tokens, batch 1;
median of ``--rounds``) and whether the two decode the same text. Writes
benchmarks/results/trim_vocab.json.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from _common import save

PROMPTS = ["What does json.dumps do?", "Explain list comprehensions in Python.", "How do I open a file?"]


def train_step_tokens_per_s(model, batch) -> float:
    import torch

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    model.train()
    t0 = time.perf_counter()
    loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - t0
    model.eval()
    return batch.numel() / seconds


def decode(gen, tokens: int) -> tuple[float, str]:
    from slmforge.generate import SamplingParams

    params = SamplingParams(max_new_tokens=tokens, temperature=0.0, repetition_penalty=1.0)
    t0 = time.perf_counter()
    texts, n = [], 0
    for prompt in PROMPTS:
        out = gen.chat([{"role": "user", "content": prompt}], params)[0]
        texts.append(out.text)
        n += out.tokens
    return n / (time.perf_counter() - t0), "\n".join(texts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="quickstart/runs/data")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import torch
    from agent_tools import gemma_folder

    from slmforge.evaluate import perplexity
    from slmforge.generate import TorchGenerator
    from slmforge.model.trim import trim_vocab
    from slmforge.tokenizer import heldout_texts

    torch.set_num_threads(args.threads)
    base = gemma_folder()
    train_texts, val = heldout_texts(args.data, "train"), heldout_texts(args.data, "val")
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        trimmed = trim_vocab(base, train_texts, Path(tmp) / "trimmed", progress=False).path
        trim_s = time.perf_counter() - t0
        gens = {"base": TorchGenerator.from_pretrained(base, device="cpu"),
                "trimmed": TorchGenerator.from_pretrained(trimmed, device="cpu")}
        rows = {name: {"weights_bytes": (folder / "model.safetensors").stat().st_size,
                       "params": sum(p.numel() for p in gens[name].model.parameters()),
                       "vocab": len(gens[name].tokenizer)}
                for name, folder in (("base", base), ("trimmed", trimmed))}
        for name, gen in gens.items():
            p = perplexity(gen.model, gen.tokenizer, val, seq_len=256, batch_size=4, max_tokens=12_000)
            rows[name].update({"val_ppl": round(p.ppl, 3), "val_bits_per_byte": round(p.bits_per_byte, 4),
                               "val_tokens": p.tokens})
        text = " ".join(train_texts)[:20_000]
        batches = {n: torch.tensor(g.tokenizer(text)["input_ids"][: 4 * 256]).view(4, 256) for n, g in gens.items()}
        samples: dict[str, dict[str, list[float]]] = {n: {"train": [], "decode": []} for n in gens}
        outputs = {}
        for _ in range(args.rounds):
            for name, gen in gens.items():
                samples[name]["train"].append(train_step_tokens_per_s(gen.model, batches[name]))
        gens = {"base": TorchGenerator.from_pretrained(base, device="cpu"),  # reloaded: training moved the weights
                "trimmed": TorchGenerator.from_pretrained(trimmed, device="cpu")}
        for _ in range(args.rounds):
            for name, gen in gens.items():
                rate, outputs[name] = decode(gen, args.tokens)
                samples[name]["decode"].append(rate)
        for name in gens:
            rows[name]["train_tokens_per_s"] = round(statistics.median(samples[name]["train"]), 1)
            rows[name]["decode_tokens_per_s"] = round(statistics.median(samples[name]["decode"]), 2)
    ratio = {k: round(rows["trimmed"][k] / rows["base"][k], 3) for k in
             ("weights_bytes", "params", "vocab", "train_tokens_per_s", "decode_tokens_per_s", "val_bits_per_byte")}
    result = {"args": vars(args), "trim_seconds": round(trim_s, 1), "rows": rows,
              "trimmed_over_base": ratio, "same_greedy_text": outputs["base"] == outputs["trimmed"]}
    for name, r in rows.items():
        print(f"{name:8} vocab {r['vocab']:>7,}  params {r['params'] / 1e6:6.1f} M  weights {r['weights_bytes'] / 1e6:7.1f} MB  "
              f"val ppl {r['val_ppl']:7.2f}  bits/byte {r['val_bits_per_byte']:.4f}  train {r['train_tokens_per_s']:7.1f} tok/s  "
              f"decode {r['decode_tokens_per_s']:6.2f} tok/s")
    print(f"trimmed / base: {ratio}; same greedy text: {result['same_greedy_text']}; trimming took {trim_s:.1f} s")
    save("trim_vocab", result)


if __name__ == "__main__":
    main()
