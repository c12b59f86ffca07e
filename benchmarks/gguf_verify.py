"""What checking a GGUF export in llama.cpp costs (``export.gguf.verify``), and what it records.

    python benchmarks/gguf_verify.py [MODEL] [--types F32,F16,Q8_0,Q4_0] [--threads 2]
    python benchmarks/gguf_verify.py --random tiny,nano,micro   # random models, no trained model needed

MODEL is a model folder (default quickstart/runs/sft, made by ``make demo``). ``--random`` builds the
tests' models instead (tests/conftest.py: a byte-level BPE of 500 tokens and a random Llama whose output
layer is sharpened, so greedy choices have clear margins): ``tiny`` is the test model (64 wide, 2 layers),
``nano`` and ``micro`` are the presets of those names.

For each type: the seconds ``export_gguf`` takes, then the seconds ``gguf_parity_report`` adds (what
``slmforge export gguf`` runs after writing: load the source model in PyTorch and the file in llama.cpp,
compare tokenization, then 5 prompts x 16 greedy tokens, teacher-forced and free-running), and what it
recorded. Prints a table and writes benchmarks/results/gguf_verify.json.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from _common import save

DEFAULT_MODEL = Path("quickstart/runs/sft")
TESTS = Path(__file__).resolve().parent.parent / "tests"
RANDOM = {"tiny": dict(preset="custom", hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                       intermediate_size=128), "nano": dict(preset="nano"), "micro": dict(preset="micro")}


def random_model(name: str, work: Path) -> Path:
    sys.path.insert(0, str(TESTS))
    from slmforge.config import ModelConfig

    from conftest import build_peaky_model, build_tiny_tokenizer

    tokenizer = work / "tokenizer"
    if not tokenizer.exists():
        tokenizer = build_tiny_tokenizer(work, vocab_size=500)
    return build_peaky_model(tokenizer, work / name, ModelConfig(**RANDOM[name], tie_embeddings=False))


def measure(model: Path, types: list[str], threads: int, work: Path) -> list[dict]:
    from slmforge.export.gguf import export_gguf, gguf_parity_report, read_gguf_info

    rows = []
    for t in types:
        start = time.perf_counter()
        file = export_gguf(model, work / f"{model.name}-{t}.gguf", type=t)
        exported = time.perf_counter() - start
        start = time.perf_counter()
        report = gguf_parity_report(model, file, n_threads=threads)
        checked = time.perf_counter() - start
        rows.append({"model": model.name, "type": t, "params": read_gguf_info(file).params,
                     "bytes": file.stat().st_size, "export_s": exported,
                     "verify_s": checked, **{k: report[k] for k in (
                         "positions", "top1_agreement", "greedy_agreement", "greedy_identical", "prompts",
                         "max_abs_logprob_diff")},
                     "tokenization_agreement": report["tokenization"]["agreement"],
                     "tokenization_texts": report["tokenization"]["texts"]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", type=Path, default=None)
    parser.add_argument("--random", default=None, help="comma-separated: tiny, nano, micro")
    parser.add_argument("--types", default="F32,F16,Q8_0,Q4_0")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    types = args.types.split(",")
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.random:
            models = [random_model(name, work) for name in args.random.split(",")]
        else:
            model = args.model or DEFAULT_MODEL
            if not (model / "config.json").exists():
                sys.exit(f"{model} is not a model folder; pass one, run `make demo`, or use --random tiny")
            models = [model]
        for model in models:
            rows += measure(model, types, args.threads, work)
    print(f"{'model':<8} {'params':>8} {'type':<5} {'MB':>7} {'export s':>9} {'verify s':>9} {'tokens':>7} {'top-1':>7} "
          f"{'greedy':>7} {'same':>5} {'|dlogp|':>8}")
    for r in rows:
        print(f"{r['model']:<8} {r['params'] / 1e6:>7.2f}M {r['type']:<5} {r['bytes'] / 1e6:>7.2f} "
              f"{r['export_s']:>9.2f} {r['verify_s']:>9.2f} "
              f"{r['tokenization_agreement']:>7.1%} {r['top1_agreement']:>7.1%} {r['greedy_agreement']:>7.1%} "
              f"{r['greedy_identical']:>2}/{r['prompts']:<2} {r['max_abs_logprob_diff']:>8.2g}")
    path = save("gguf_verify", {"threads": args.threads, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
