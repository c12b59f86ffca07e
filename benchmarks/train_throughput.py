"""Training throughput and peak memory: slmforge's loop vs. a plain transformers Trainer.

    python benchmarks/train_throughput.py [--preset micro] [--steps 40] [--seq-len 256] [--batch-size 16]

Same model (a Llama preset, random init, vocab 8192), same data (random token
chunks; throughput does not depend on the text), same batch, optimizer (AdamW)
and schedule, full fine-tuning and LoRA (r=16 on every projection). Each
configuration runs in its own process so peak RSS is its own. Tokens/s comes
from the median step time after warm-up (robust to a shared, noisy machine);
compile time is reported separately. Writes benchmarks/results/train_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import machine, median, save

CONFIGS = [
    ("slmforge", "full", "fp32", False),
    ("slmforge", "full", "bf16", False),
    ("slmforge", "full", "bf16", True),
    ("trainer", "full", "fp32", False),
    ("trainer", "full", "bf16", False),
    ("slmforge", "lora", "bf16", False),
    ("trainer", "lora", "bf16", False),
]


def _model_and_data(preset: str, seq_len: int, n_chunks: int):
    import torch

    from slmforge.config import ModelConfig
    from slmforge.model import build_model

    model = build_model(ModelConfig(preset=preset), 8192, {"bos": 0, "eos": 1, "pad": 2}, seed=0)
    g = torch.Generator().manual_seed(0)
    chunks = torch.randint(5, 8192, (n_chunks, seq_len), generator=g)  # (N, T)
    return model, chunks


def _lora(model):
    from peft import LoraConfig, get_peft_model

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    return get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=targets,
                                            task_type="CAUSAL_LM"))


def worker(args) -> dict:
    import torch

    torch.manual_seed(0)
    engine, method, precision, compile_ = args.worker.split(",")
    compile_ = compile_ == "1"
    steps, warm = args.steps, args.warmup
    model, chunks = _model_and_data(args.preset, args.seq_len, (steps + 1) * args.batch_size)
    if method == "lora":
        model = _lora(model)
    step_times: list[float] = []
    t0 = time.perf_counter()
    if engine == "slmforge":
        from slmforge.config import LoopConfig
        from slmforge.tokenizer.packing import PackedTokens
        from slmforge.train import run_loop

        cfg = LoopConfig(seq_len=args.seq_len, batch_size=args.batch_size, max_steps=steps, lr=1e-3,
                         warmup_steps=5, eval_every=10**6, save_every=10**6, precision=precision, compile=compile_)
        source = PackedTokens(chunks.flatten().numpy(), args.seq_len)
        with tempfile.TemporaryDirectory() as tmp:
            res = run_loop(model, source, None, cfg, Path(tmp), 0, {"bench": True}, progress=False)
        step_times = [r["step_s"] for r in res.log]
    else:
        from transformers import Trainer, TrainerCallback, TrainingArguments

        class Timer(TrainerCallback):
            def __init__(self):
                self.last = None

            def on_step_begin(self, a, state, control, **kw):
                self.last = time.perf_counter()

            def on_step_end(self, a, state, control, **kw):
                step_times.append(time.perf_counter() - self.last)

        dataset = [{"input_ids": c, "labels": c} for c in chunks]
        with tempfile.TemporaryDirectory() as tmp:
            targs = TrainingArguments(
                output_dir=tmp, per_device_train_batch_size=args.batch_size, max_steps=steps, learning_rate=1e-3,
                warmup_steps=5, lr_scheduler_type="cosine", weight_decay=0.1, adam_beta2=0.95, max_grad_norm=1.0,
                logging_steps=10**6, save_strategy="no", report_to=[], use_cpu=not torch.cuda.is_available(),
                bf16=precision == "bf16", dataloader_num_workers=0, disable_tqdm=True, seed=0,
                gradient_checkpointing=False,
            )
            Trainer(model=model, args=targs, train_dataset=dataset, callbacks=[Timer()]).train()
    total = time.perf_counter() - t0
    timed = step_times[warm:]
    tokens_per_step = args.batch_size * args.seq_len
    return {
        "engine": engine, "method": method, "precision": precision, "compile": compile_,
        "median_step_s": median(timed), "tokens_per_s": tokens_per_step / median(timed),
        "first_steps_s": round(sum(step_times[:warm]), 2), "total_s": round(total, 2),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="micro")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    rows = []
    for engine, method, precision, compile_ in CONFIGS:
        cmd = [sys.executable, __file__, "--worker", f"{engine},{method},{precision},{int(compile_)}",
               "--preset", args.preset, "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stderr[-2000:], file=sys.stderr)
            raise SystemExit(f"worker {cmd[3]} failed")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(f"machine: {machine()['cpu']}, {machine()['cores']} cores; preset {args.preset}, seq {args.seq_len}, "
          f"batch {args.batch_size}, median step after {args.warmup} warm-up steps of {args.steps}")
    print(f"{'engine':<10}{'method':<7}{'precision':<10}{'compile':<9}{'tokens/s':>10}{'vs Trainer':>11}"
          f"{'peak RSS MB':>13}{'warm-up s':>11}")
    ref = {(r["method"], r["precision"]): r["tokens_per_s"] for r in rows if r["engine"] == "trainer"}
    for r in rows:
        base = ref.get((r["method"], r["precision"])) or ref.get((r["method"], "bf16"))
        ratio = f"{r['tokens_per_s'] / base:.2f}x" if base else ""
        print(f"{r['engine']:<10}{r['method']:<7}{r['precision']:<10}{str(r['compile']):<9}{r['tokens_per_s']:>10.0f}"
              f"{ratio:>11}{r['peak_rss_mb']:>13.0f}{r['first_steps_s']:>11.1f}")
    path = save("train_throughput", {"args": vars(args), "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
