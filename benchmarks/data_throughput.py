"""Throughput of the data stage on the built-in python-docs source.

    python benchmarks/data_throughput.py [--runs 3] [--module-source]

Runs the whole stage (read, clean, PII, filters, exact + near dedup, split,
text + chat + classification + NER outputs, report) several times, and the same
with single steps turned off, so the cost of each step shows as a ratio. The
baseline a user would otherwise write is "read the files and write JSONL":
that is the `read + write only` row (every cleaning step off). Prints a table
and writes benchmarks/results/data_throughput.json.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from _common import machine, median, save

os.environ.setdefault("SLMFORGE_NO_PROGRESS", "1")


def make_files_corpus(folder: Path) -> Path:
    """The python-docs documents written out as one .md file each: a folder of files,
    the way most users' domain corpora arrive."""
    from slmforge.config import ProjectConfig
    from slmforge.data import sources

    cfg = ProjectConfig()
    root = folder / "corpus"
    root.mkdir()
    n = 0
    for rec in sources.read_python_docs(cfg.data):
        if isinstance(rec, sources.Document):
            sub = root / rec.id.split(":")[1]
            sub.mkdir(exist_ok=True)
            (sub / f"{n:05d}.md").write_text(f"# {rec.title}\n\n{rec.text}\n", encoding="utf-8")
            n += 1
    return root


def variants(module_source: bool, source: str = "python-docs"):
    from slmforge.config import ProjectConfig

    def base():
        cfg = ProjectConfig()
        cfg.data.sources = [source]
        cfg.data.python_docs.module_source = module_source
        cfg.data.formats = ["text", "chat", "classification", "ner"]
        cfg.data.classification.label_from = "source"
        cfg.data.ner.builtin_gazetteer = "python"
        return cfg

    full = base()
    no_near = base()
    no_near.data.dedup.near = False
    no_pii = base()
    no_pii.data.pii.enabled = False
    text_only = base()
    text_only.data.formats = ["text"]
    bare = base()
    bare.data.formats = ["text"]
    bare.data.pii.enabled = False
    bare.data.dedup.near = False
    bare.data.dedup.exact = False
    bare.data.clean.strip_boilerplate = False
    for key in ("min_chars", "max_chars", "max_symbol_ratio", "min_alpha_word_ratio", "max_repeated_line_ratio",
                "max_repeated_ngram_ratio", "languages"):
        setattr(bare.data.filters, key, None)
    return {
        "full stage (4 formats)": full,
        "without near-dedup": no_near,
        "without PII scrubbing": no_pii,
        "text format only": text_only,
        "read + write only": bare,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--module-source", action="store_true", help="also read stdlib module source (12 MB)")
    args = parser.parse_args()
    from slmforge.data import run_data_stage

    rows = []
    files_dir = tempfile.TemporaryDirectory()
    corpus = make_files_corpus(Path(files_dir.name))
    runs = list(variants(args.module_source).items())
    runs.append(("files: same docs as .md", variants(False, str(corpus))["full stage (4 formats)"]))
    for name, cfg in runs:
        secs, docs, mb = [], 0, 0.0
        for _ in range(args.runs):
            with tempfile.TemporaryDirectory() as tmp:
                rooted = cfg.rooted_at(tmp)
                t0 = time.perf_counter()
                result = run_data_stage(rooted, progress=False, command=["benchmark"])
                secs.append(time.perf_counter() - t0)
                docs, mb = result.stats["documents_in"], result.stats["mb_in"]
                kept = result.stats["documents_out"]
        t = median(secs)
        rows.append({"variant": name, "seconds": round(t, 2), "documents_in": docs, "documents_out": kept,
                     "mb_in": mb, "documents_per_s": round(docs / t, 1), "mb_per_s": round(mb / t, 3),
                     "runs": [round(s, 2) for s in secs]})
    files_dir.cleanup()
    full = rows[0]["seconds"]
    print(f"machine: {machine()['cpu']}, {machine()['cores']} cores; median of {args.runs} runs")
    print(f"{'variant':<26} {'s':>6} {'docs in':>8} {'kept':>6} {'MB':>6} {'docs/s':>8} {'MB/s':>6} {'x full':>6}")
    for r in rows:
        print(f"{r['variant']:<26} {r['seconds']:>6.2f} {r['documents_in']:>8} {r['documents_out']:>6} "
              f"{r['mb_in']:>6.2f} {r['documents_per_s']:>8.0f} {r['mb_per_s']:>6.3f} {full / r['seconds']:>6.2f}")
    path = save("data_throughput", {"runs": args.runs, "module_source": args.module_source, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
