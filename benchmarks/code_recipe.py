"""The code recipe on a real base: Gemma 3 270M adapted to Python source with fill-in-the-middle, against its base.

    python benchmarks/code_recipe.py [--out benchmarks/results/code-recipe] [--steps 40] [--minutes 45] [--limit 32]
                                     [--sampled 8] [--fim-lines 32] [--sources FOLDER,...] [--set KEY=VALUE ...]
                                     [--json code_recipe]

Runs ``slmforge quickstart --recipe code``: the standard library's source curated (licence headers,
function-level dedup, HumanEval decontamination), Gemma 3 270M's vocabulary trimmed to it, continued
pretraining with half the pieces as FIM examples for ``--steps`` optimizer steps (at most ``--minutes``: steps
make runs on a shared machine comparable); the eval stage measures the
model and the untrimmed base on held-out code perplexity, next-line completion (``--limit`` lines of the
held-out modules) and HumanEval pass@1 (greedy, the first ``--limit`` problems, in the sandbox). Then
``slmforge eval compare`` base vs adapted on next-line and HumanEval (paired bootstrap CI and p-value;
answers from the eval cache), and fill-in-the-middle on ``--fim-lines`` held-out lines: the base and the
adapted model completing each line from the code before it, against the adapted model given the code after
it too (the base has no FIM tokens), with paired p-values; and
``humaneval-sampled`` (10 samples at temperature 0.8: pass@1 and pass@10) on the first ``--sampled`` problems.
``--sources`` adapts to folders of your own code instead of the standard library (``data.sources``), which
the base cannot have seen in pretraining. Writes benchmarks/results/code_recipe.json (--json NAME).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from _common import RESULTS, save


def _short(prefix: str, suffix: str, chars: int = 700) -> tuple[str, str]:
    """The last ``chars`` of ``prefix`` from a line start, and the first ``chars // 2`` of ``suffix``: a FIM
    prompt of about one training window (256 tokens)."""
    head = prefix[-chars:]
    return (head[head.index("\n") + 1:] if "\n" in head and len(prefix) > chars else head), suffix[: chars // 2]


def fim_table(base: Path, model: Path, data: Path, lines: int) -> dict:
    """Held-out lines (seed 1 of the next-line items) completed four ways on the same lines: the base and the
    adapted model from the 2,000 characters of code before the line (a plain completion; the base has no FIM
    tokens), and the adapted model as a FIM prompt with the 1,000 characters after the line too, or with a
    shorter context of about one training window (700 before, 350 after). Edit similarity and exact match of
    each, and paired permutation tests of the FIM rows against the base and against the adapted model's own
    plain completion."""
    from slmforge.data import read_jsonl
    from slmforge.evaluate.metrics import code_exact, edit_similarity
    from slmforge.evaluate.stats import paired_permutation_test
    from slmforge.evaluate.suites import next_line_items
    from slmforge.generate import SamplingParams, TorchGenerator

    docs = [(r["id"], r["text"]) for r in read_jsonl(data / "text" / "test.jsonl")]
    items = next_line_items(docs, lines, 1, 2000)
    texts = dict(docs)
    params = SamplingParams(max_new_tokens=48, temperature=0.0, stop=["\n"])
    scores: dict[str, list[tuple[float, float]]] = {}
    for name, folder in (("adapted", model), ("base", base)):
        gen = TorchGenerator.from_pretrained(folder, device="cpu")
        for item in items:
            doc_id, line_no = item["id"].rsplit(":", 1)
            after = "\n" + "".join(texts[doc_id].splitlines(keepends=True)[int(line_no):])[:1000]
            prompts = {f"{name}, prefix": item["input"]}
            if name == "adapted":
                prompts["adapted, FIM 2000+1000"] = gen.fim_prompt(item["input"], after)
                prompts["adapted, FIM 700+350"] = gen.fim_prompt(*_short(item["input"], after))
            for row, prompt in prompts.items():
                answer = gen.complete(prompt, params)[0].text
                scores.setdefault(row, []).append((edit_similarity(answer, item["target"]),
                                                   code_exact(answer, item["target"])))
        del gen
    table: dict = {row: {"edit_sim": round(sum(s[0] for s in rows) / len(rows), 4),
                         "code_exact": round(sum(s[1] for s in rows) / len(rows), 4), "lines": len(rows)}
                   for row, rows in scores.items()}
    for row in ("adapted, FIM 2000+1000", "adapted, FIM 700+350"):
        for against in ("base, prefix", "adapted, prefix"):
            a, b = [s[0] for s in scores[against]], [s[0] for s in scores[row]]
            table[row][f"p_vs_{against.replace(', ', '_')}"] = round(paired_permutation_test(a, b), 4)
    return table


def sampled_metrics(out: Path) -> dict:
    """pass@1 and pass@10 of both models on humaneval-sampled, from the eval cache the comparison filled."""
    found = {}
    for file in sorted((out / "runs" / "eval-cache").glob("humaneval-sampled-*.json")):
        result = json.loads(file.read_text())
        found["base" if "base" in Path(result["model"]).parts else "adapted"] = result["metrics"]
    return found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(RESULTS / "code-recipe"))
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--minutes", type=float, default=45.0)
    ap.add_argument("--limit", type=int, default=32)
    ap.add_argument("--sampled", type=int, default=8, help="HumanEval problems sampled 10 times each (0: none)")
    ap.add_argument("--fim-lines", type=int, default=32, help="held-out lines for the fill-in-the-middle table")
    ap.add_argument("--sources", default=None,
                    help="comma-separated folders of your own code to adapt to instead of the standard library")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="more config overrides, as slmforge's --set (e.g. train.lr=2e-4)")
    ap.add_argument("--json", default="code_recipe", help="results file name under benchmarks/results/")
    args = ap.parse_args()

    from slmforge.config import load_config
    from slmforge.evaluate.run import compare_models

    out = Path(args.out)
    sets = [f"train.max_steps={args.steps}", f"train.max_minutes={args.minutes}", f"eval.limit={args.limit}"]
    if args.sources:  # code the base has not seen: your repositories, without the stdlib
        folders = [str(Path(f).resolve()) for f in args.sources.split(",")]
        sets += [f"data.sources={json.dumps(folders)}", "data.python_docs.module_source=false"]
    sets += args.set
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "slmforge", "quickstart", "--recipe", "code", "--out", str(out),
                    *[x for s in sets for x in ("--set", s)]], check=True)
    wall = time.perf_counter() - t0
    cfg = load_config(out / "slmforge.yaml", sets)
    data = json.loads((out / "runs" / "data" / "stats.json").read_text())
    train = json.loads((out / "runs" / "train" / "manifest.json").read_text())["metrics"]
    results = json.loads((out / "runs" / "eval" / "results.json").read_text())
    mine, base = results["metrics"], results["baseline"]
    compared = compare_models(cfg, cfg.resolve(cfg.model.base), out / "runs" / "train", ["next-line", "humaneval"],
                              out / "runs" / "compare-base", limit=args.limit, progress=False).suites
    sampled = None
    if args.sampled:
        sampled = compare_models(cfg, cfg.resolve(cfg.model.base), out / "runs" / "train", ["humaneval-sampled"],
                                 out / "runs" / "compare-sampled", limit=args.sampled, progress=False)
    rel = {k: round(mine[k] / base[k] - 1, 4) for k in sorted(mine) if base.get(k)}
    result = {"args": vars(args), "wall_minutes": round(wall / 60, 1),
              "train_minutes": round(train["seconds"] / 60, 1),
              "data": {k: data.get(k) for k in ("documents_in", "documents_out", "dropped", "cleaning")},
              "train": {k: train.get(k) for k in ("steps", "tokens", "tokens_per_s", "val_ppl", "params")},
              "base": {k: base[k] for k in sorted(base)}, "adapted": {k: mine[k] for k in sorted(mine)},
              "relative_change": rel, "compare": compared,
              "sampled": {"compare": sampled.suites["humaneval-sampled"], **sampled_metrics(out)} if sampled else None,
              "fim": fim_table(cfg.resolve(cfg.model.base), out / "runs" / "train", out / "runs" / "data",
                               args.fim_lines)}
    print(json.dumps(result, indent=2))
    save(args.json, result)


if __name__ == "__main__":
    main()
