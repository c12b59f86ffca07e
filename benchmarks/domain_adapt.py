"""The adapt recipe on a real base: Gemma 3 270M specialised on python-docs, against its base.

    python benchmarks/domain_adapt.py [--out benchmarks/results/domain-adapt] [--minutes 25] [--qa 48]

Runs ``slmforge quickstart --recipe adapt`` (the offline Gemma 3 270M; its vocabulary trimmed to the domain;
continued pretraining for at most ``--minutes``, then a LoRA on the Q/A pairs for at most ``--sft-minutes``;
the eval stage measures the model and the untrimmed base on held-out perplexity and the python-docs-qa
suite), then ``slmforge eval compare`` base vs specialised on the QA suite (paired bootstrap CI and p-value; the answers come from the eval cache). Prints and writes
benchmarks/results/domain_adapt.json: minutes of training, held-out perplexity and bits per byte of both
(the trimmed tokenizer splits held-out text into about 1% more tokens, so bits per byte is the
tokenizer-independent number), their relative change, and the QA comparison.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from _common import RESULTS, save


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(RESULTS / "domain-adapt"))
    ap.add_argument("--minutes", type=float, default=25.0)
    ap.add_argument("--sft-minutes", type=float, default=4.0)
    ap.add_argument("--qa", type=int, default=48)
    args = ap.parse_args()

    from slmforge.config import load_config
    from slmforge.evaluate.run import compare_models

    out = Path(args.out)
    sets = [f"train.max_minutes={args.minutes}", f"sft.max_minutes={args.sft_minutes}", f"eval.limit={args.qa}"]
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "slmforge", "quickstart", "--recipe", "adapt", "--out", str(out),
                    *[x for s in sets for x in ("--set", s)]], check=True)
    wall = time.perf_counter() - t0
    cfg = load_config(out / "slmforge.yaml", sets)
    train = json.loads((out / "runs" / "train" / "manifest.json").read_text())["metrics"]
    sft = json.loads((out / "runs" / "sft" / "manifest.json").read_text())["metrics"]
    results = json.loads((out / "runs" / "eval" / "results.json").read_text())
    mine, base = results["metrics"], results["baseline"]
    qa = compare_models(cfg, cfg.resolve(cfg.model.base), out / "runs" / "sft", ["python-docs-qa"],
                        out / "runs" / "compare-base", limit=args.qa, progress=False).suites["python-docs-qa"]
    rel = {k: round(mine[k] / base[k] - 1, 4) for k in ("perplexity.ppl", "perplexity.bits_per_byte",
                                                       "python-docs-qa.token_f1", "python-docs-qa.rougeL") if base.get(k)}
    result = {"args": vars(args), "wall_minutes": round(wall / 60, 1),
              "train_minutes": round((train["seconds"] + sft["seconds"]) / 60, 1),
              "train": {k: train.get(k) for k in ("steps", "tokens", "tokens_per_s", "val_ppl", "params")},
              "sft": {k: sft.get(k) for k in ("steps", "tokens", "tokens_per_s", "val_ppl", "val_loss")},
              "base": {k: base[k] for k in sorted(base)}, "specialised": {k: mine[k] for k in sorted(mine)},
              "relative_change": rel, "qa_compare": qa}
    print(json.dumps(result, indent=2))
    save("domain_adapt", result)


if __name__ == "__main__":
    main()
