"""The data stage: sources -> cleaned, deduplicated, filtered, PII-scrubbed
documents, split by document, written as training sets for GPT-style (text,
chat) and BERT-style (classification, NER) models, with a stats report.

    from slmforge import load_config, run_data_stage
    result = run_data_stage(load_config("slmforge.yaml"))
    print(result.path, result.stats["documents_out"])

Output folder (an artifact with ``manifest.json``)::

    text/{train,val,test}.jsonl            {"id", "text", "source"}
    chat/{train,val,test}.jsonl            {"id", "messages": [...], "source_id", "method"}
    classification/{train,val,test}.jsonl  {"id", "text", "label"}   + classification/labels.json
    ner/{train,val,test}.jsonl             {"id", "tokens", "tags"}  + ner/labels.json
    stats.json  report.md  lengths.png  skipped.jsonl  dropped.jsonl
"""

from __future__ import annotations

import contextlib
import functools
import json
import random
import re
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slmforge.artifacts import ArtifactWriter
from slmforge.config import DataConfig, ProjectConfig
from slmforge.data.code import CodeCurator
from slmforge.data.sources import BUILTIN_SOURCES, Document, Skipped

__all__ = ["DataResult", "run_data_stage", "source_refs", "read_jsonl", "iter_jsonl", "SPLITS"]

SPLITS = ("train", "val", "test")
_PRETOKEN = re.compile(r"\w+|[^\w\s]")


@dataclass
class DataResult:
    """What the data stage made."""

    path: Path
    stats: dict[str, Any]

    def split_file(self, fmt: str, split: str) -> Path:
        return self.path / fmt / f"{split}.jsonl"


def _write_jsonl(path: Path, records) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
            n += 1
    return n


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a JSONL file the data stage wrote (blank lines skipped); ``[]`` when the
    file does not exist, so callers decide whether a missing split is an error.

    Every stage that reads the datasets reads them with this or, where a split may not fit in memory, with
    ``iter_jsonl``."""
    return list(iter_jsonl(path))


def iter_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    """``read_jsonl`` one record at a time: the same records, never more than one line in memory. Lines end at
    ``\\n`` only: ``json.dumps(..., ensure_ascii=False)`` writes U+2028 and U+0085 as they are, and
    ``str.splitlines`` would cut a record there."""
    if path.is_file():
        with open(path, encoding="utf-8") as f:
            yield from (json.loads(line) for line in f if line.strip())


def _resolve_sources(cfg: ProjectConfig) -> list[tuple[str, Path | None]]:
    from slmforge.errors import DataError

    if not cfg.data.sources:
        raise DataError(
            "No data sources configured. Set data.sources in the project file to files or folders of "
            ".txt .md .rst .html .jsonl .csv .py .pdf, or to the built-in source python-docs "
            "(for example: --set 'data.sources=[python-docs]')."
        )
    out: list[tuple[str, Path | None]] = []
    for entry in cfg.data.sources:
        if entry in BUILTIN_SOURCES:
            out.append((entry, None))
            continue
        path = cfg.resolve(entry)
        if not path.exists():
            raise DataError(
                f"Data source {entry!r} does not exist (looked for {path}). Fix data.sources in "
                f"{cfg.source}; built-in sources are: {', '.join(BUILTIN_SOURCES)}."
            )
        out.append((entry, path))
    return out


def source_refs(cfg: ProjectConfig) -> list[dict[str, str]]:
    """Lineage entries for the data sources: a fingerprint of each source's file names,
    sizes and modification times (python-docs: the interpreter version), so that
    ``slmforge run`` re-runs the data stage when a source changes."""
    import hashlib
    import sys

    from slmforge.data.sources import list_files

    refs = []
    for entry, path in _resolve_sources(cfg):
        h = hashlib.sha256()
        if path is None:
            h.update(f"{entry}:{sys.version}".encode())
        else:
            for f in list_files(path):
                st = f.stat()
                h.update(f"{f.relative_to(path) if path.is_dir() else f.name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
        refs.append({"path": str(path) if path else entry, "kind": "source", "fingerprint": h.hexdigest()})
    return refs


def _split(n: int, val: float, test: float, seed: int) -> list[str]:
    """A split name per document: exact proportions, seeded shuffle, at least one
    validation/test document whenever that share is non-zero and there are 3+ documents."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_val = round(n * val) if val else 0
    n_test = round(n * test) if test else 0
    if n >= 3:
        n_val = max(n_val, 1 if val else 0)
        n_test = max(n_test, 1 if test else 0)
    names = ["train"] * n
    for rank, i in enumerate(order):
        if rank < n_val:
            names[i] = "val"
        elif rank < n_val + n_test:
            names[i] = "test"
    return names


def run_data_stage(
    cfg: ProjectConfig,
    out: str | Path | None = None,
    command: list[str] | None = None,
    progress: bool = True,
) -> DataResult:
    """Run the data stage described by ``cfg.data``.

    The corpus may be larger than memory: documents are spilled to a scratch folder beside the output between
    passes (``data/spill.py``), and only fixed-size facts per document stay in memory.

    Args:
        cfg: The project config (``load_config``).
        out: Output folder; default ``data.out`` or ``<project.out_dir>/data``.
        command: The command line recorded in the manifest (default ``sys.argv``).
        progress: Show progress bars on stderr.

    Returns:
        The artifact folder and its statistics.

    Raises:
        DataError: No sources, a source path that does not exist, no document left
            after filtering, or an unreachable teacher endpoint. Bad files never raise:
            they are skipped and listed in ``skipped.jsonl`` with the reason.
    """
    from slmforge.data.spill import make_spill_dir, remove_spill_dir

    target = Path(out) if out else cfg.stage_dir("data", cfg.data.out)
    entries = _resolve_sources(cfg)
    parents = source_refs(cfg)  # before reading: a source edited mid-run makes the next run re-read it
    t0 = time.monotonic()
    work = make_spill_dir(target)
    try:
        passed = _read_filter(cfg, entries, progress, work)
        stats = _stats(cfg, entries, passed)
        _write_dataset(target, cfg, parents, command, progress, stats, passed, t0)
    finally:
        remove_spill_dir(work)
    return DataResult(path=target.resolve(), stats=stats)


def read_documents(
    cfg: ProjectConfig, sources: list[str] | None = None, progress: bool = True
) -> tuple[list[Document], list[Skipped], Counter[str]]:
    """The documents of ``sources`` (default: ``data.sources``), read, cleaned, boilerplate-stripped,
    PII-scrubbed, filtered and deduplicated exactly as the data stage does, without writing a dataset:
    what ``slmforge rag index`` indexes.

    Returns:
        (documents kept, inputs skipped with their reason, documents dropped per reason).

    Raises:
        DataError: No sources, or a source that does not exist.
    """
    import tempfile

    if sources is not None:
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"sources": sources})})
    entries = _resolve_sources(cfg)
    with tempfile.TemporaryDirectory(prefix="slmforge-data-") as work:
        passed = _read_filter(cfg, entries, progress, Path(work), require=False)
        return [d for d, _ in passed.kept()], passed.skipped, passed.dropped


@dataclass
class _Read:
    """What reading and cleaning the sources gave: the documents' spill, skipped inputs, counts for the stats."""

    docs: Path
    skipped: list[Skipped]
    count: int = 0
    bytes_in: int = 0
    long_lines: int = 0
    boilerplate: Any = None  # spill.BoilerplateCounter when data.clean.strip_boilerplate


@dataclass
class _Passed:
    """The documents that passed every filter (in a spill file), and what the stage counted on the way.

    In memory per document: the split name and the length of each kept one, a ``dropped.jsonl`` row per dropped
    one, and the deduplicator's state (see README, "Corpora larger than memory")."""

    read: _Read
    spill: Path
    n_kept: int
    late_drops: set[str]  # engine ray: ids found to be duplicates after the documents were spilled
    dropped: Counter[str]
    dropped_rows: list[dict[str, Any]]
    pii_counts: Counter[str]
    cleaning: dict[str, int]
    split_of: list[str]

    @property
    def skipped(self) -> list[Skipped]:
        return self.read.skipped

    def kept(self) -> Iterator[tuple[Document, str]]:
        """The kept documents in order, each with its split: read back from disk on every call."""
        from slmforge.data.spill import read_spill

        i = 0
        for d in read_spill(self.spill):
            if d.id in self.late_drops:
                continue
            yield d, (self.split_of[i] if self.split_of else "train")
            i += 1

    def split_sizes(self) -> dict[str, int]:
        sizes = Counter(self.split_of)
        return {s: sizes.get(s, 0) for s in SPLITS}


def _read_filter(cfg: ProjectConfig, entries: list[tuple[str, Path | None]], progress: bool, work: Path, require: bool = True) -> _Passed:
    """Passes 1 and 2: read and clean every source into a spill, then strip boilerplate, scrub, filter and
    deduplicate into another; the kept documents' split drawn. ``require``: no document left is an error."""
    from slmforge.data.spill import read_spill
    from slmforge.errors import DataError

    dcfg = cfg.data
    curator = CodeCurator(dcfg.code, cfg.base_dir)
    read = _read_and_clean(cfg, entries, progress, curator, work)
    docs = read_spill(read.docs)
    boiler_removed = [0]
    if read.boilerplate is not None:
        docs = _strip_boilerplate(docs, read.boilerplate.lines(), boiler_removed)
    passed = _scrub_filter_dedup(docs, read, dcfg, progress, curator, work)
    passed.cleaning = {"long_lines_removed": read.long_lines, "boilerplate_lines_removed": boiler_removed[0],
                       **curator.counts}
    if require and not passed.n_kept:
        raise DataError(
            f"No documents left: {read.count} read, {sum(passed.dropped.values())} dropped "
            f"({', '.join(f'{k}: {v}' for k, v in passed.dropped.most_common()) or 'none'}), "
            f"{len(read.skipped)} inputs skipped. Check data.sources and relax data.filters."
        )
    passed.split_of = _split(passed.n_kept, dcfg.split.val, dcfg.split.test, cfg.project.seed)
    return passed


def _stats(cfg: ProjectConfig, entries: list[tuple[str, Path | None]], passed: _Passed) -> dict[str, Any]:
    """stats.json without the timings and formats (filled in as the dataset is written)."""
    dcfg = cfg.data
    stats: dict[str, Any] = {
        "sources": {e: (str(p) if p else "built-in") for e, p in entries},
        "documents_in": passed.read.count,
        "documents_out": passed.n_kept,
        "inputs_skipped": dict(Counter(s.reason.split(" (")[0] for s in passed.skipped).most_common()),
        "dropped": dict(passed.dropped.most_common()),
        "cleaning": passed.cleaning,
        "pii": {t: passed.pii_counts.get(t, 0) for t in dcfg.pii.types} if dcfg.pii.enabled else {},
        "splits": {s: {"documents": 0, "chars": 0, "pretokens": 0} for s in SPLITS},
        "formats": {},
    }
    for d, s in passed.kept():
        row = stats["splits"][s]
        row["documents"] += 1
        row["chars"] += len(d.text)
        row["pretokens"] += len(_PRETOKEN.findall(d.text))
    stats["chars"] = sum(v["chars"] for v in stats["splits"].values())
    stats["pretokens"] = sum(v["pretokens"] for v in stats["splits"].values())
    return stats


def _read_and_clean(
    cfg: ProjectConfig, entries: list[tuple[str, Path | None]], progress: bool, curator: CodeCurator, work: Path
) -> _Read:
    """Every document of every source, cleaned, with ids made unique, spilled to ``work``; bad inputs become
    ``Skipped``. Boilerplate candidate lines are counted on the way (``spill.BoilerplateCounter``)."""
    from slmforge._progress import progress_bar
    from slmforge.data import clean, sources
    from slmforge.data.spill import BoilerplateCounter, SpillWriter

    dcfg = cfg.data
    read = _Read(docs=work / "read.pkl", skipped=[])
    if dcfg.clean.strip_boilerplate:
        read.boilerplate = BoilerplateCounter(work / "lines.bin", clean.PROSE_KINDS)
    spill = SpillWriter(read.docs)
    # One count per distinct id: ids repeat only within a source's file (e.g. a name defined twice in one
    # module), so this is per document, like the dedup state.
    ids: Counter[str] = Counter()

    def take(record) -> None:
        if isinstance(record, Skipped):
            read.skipped.append(record)
            return
        read.bytes_in += len(record.text.encode("utf-8", "surrogatepass"))
        record.text, n_long = clean.clean_text(curator.clean(record.text, record.is_code), dcfg.clean)
        read.long_lines += n_long
        ids[record.id] += 1
        if ids[record.id] > 1:  # ids must stay unique
            record.id = f"{record.id}#{ids[record.id]}"
        if read.boilerplate is not None:
            read.boilerplate.add(record.source, record.kind, record.text)
        spill.write(record)

    jobs: list[tuple[str, Any]] = []
    for entry, path in entries:
        if path is None:  # python-docs
            if dcfg.python_docs.topics:
                jobs.append((entry, ("topics",)))
            if dcfg.python_docs.docstrings or dcfg.python_docs.module_source:
                for mod, mpath in sources.python_docs_modules()[: dcfg.python_docs.max_modules]:
                    jobs.append((entry, ("module", mod, mpath)))
        else:
            jobs.extend((entry, ("file", f)) for f in sources.list_files(path))

    with progress_bar(progress) as bar:
        task = bar.add_task("reading sources", total=len(jobs), info="")
        for entry, job in jobs:
            if job[0] == "topics":
                records = sources.read_topics()
            elif job[0] == "module":
                records = sources.read_module(
                    job[1], job[2], dcfg.python_docs.docstrings, dcfg.python_docs.module_source
                )
            else:
                records = sources.read_file(job[1], entry, dcfg)
            for record in records:
                take(record)
            bar.update(task, advance=1, info=f"{spill.count} docs")
    spill.close()
    read.count = spill.count
    return read


def _strip_boilerplate(docs: Iterable[Document], lines: dict[tuple[str, str], set[int]],
                       removed: list[int]) -> Iterator[Document]:
    """The documents without the lines repeated across their source's documents of one kind (hashed, see
    ``spill.BoilerplateCounter``); ``removed[0]`` counts the lines removed."""
    from slmforge.data import clean
    from slmforge.data.spill import line_hash

    for d in docs:
        group = (d.source, d.kind)
        if group in lines:
            d.text, n = clean.strip_lines(d.text, lines[group], key=functools.partial(line_hash, group))
            removed[0] += n
        yield d


def _scrub_filter_dedup(
    docs: Iterable[Document], read: _Read, dcfg: DataConfig, progress: bool, curator: CodeCurator, work: Path
) -> _Passed:
    """PII scrubbing, quality filters, decontamination, deduplication and function dedup (``data.code``),
    in that order per document; the kept documents spilled to ``work``, the dropped ones listed."""
    from slmforge._progress import progress_bar
    from slmforge.data import dedup, filters, pii
    from slmforge.data.spill import SpillWriter

    dropped: Counter[str] = Counter()
    dropped_rows: list[dict[str, Any]] = []
    pii_counts: Counter[str] = Counter()
    kept = SpillWriter(work / "kept.pkl")
    dd = dedup.make_deduplicator(dcfg.dedup, dcfg.engine, dcfg.ray_workers, dcfg.ray_address)
    with progress_bar(progress) as bar:
        task = bar.add_task("filtering", total=read.count, info="")
        for d in docs:
            reason, extra = None, {}
            if not d.text.strip():
                reason = "empty_after_cleaning"
            else:
                if dcfg.pii.enabled:
                    d.text, found = pii.scrub_pii(d.text, dcfg.pii.types)
                    pii_counts.update(found)
                    if "doc" in d.meta and found:
                        d.meta["doc"], _ = pii.scrub_pii(d.meta["doc"], dcfg.pii.types)
                    if "ner" in d.meta:  # records that bring their own tokens
                        d.meta["ner"]["tokens"] = [pii.scrub_pii(t, dcfg.pii.types)[0] for t in d.meta["ner"]["tokens"]]
                reason = filters.quality_reason(d.text, dcfg.filters, code=d.is_code)
                if reason is None and (item := curator.contaminated_by(d.text)):
                    reason, extra = "contaminated", {"overlaps": item}
                if reason is None:
                    reason = dd.check(d.id, d.text)
            if reason:
                dropped[reason] += 1
                row = {"id": d.id, "reason": reason}
                if d.id in dd.duplicate_of:
                    row["duplicate_of"] = dd.duplicate_of[d.id]
                dropped_rows.append(row | extra)
            else:
                d.text = curator.dedup_functions(d.text, d.is_code)
                kept.write(d)
            bar.update(task, advance=1, info=f"{kept.count} kept")
    kept.close()
    late = dd.settle(dropped, dropped_rows)  # engine ray: duplicates across shards found now
    return _Passed(read=read, spill=kept.path, n_kept=kept.count - len(late), late_drops=late, dropped=dropped,
                   dropped_rows=dropped_rows, pii_counts=pii_counts, cleaning={}, split_of=[])


def _write_dataset(target: Path, cfg: ProjectConfig, parents, command: list[str] | None, progress: bool,
                   stats: dict[str, Any], passed: _Passed, t0: float) -> None:
    """The artifact: skipped/dropped lists, every format, stats.json (timings added here), the report and
    the manifest's metrics."""
    from slmforge.data import report

    dcfg = cfg.data
    read = passed.read
    with ArtifactWriter(target, kind="dataset", config=dcfg.fingerprint_config(), parents=parents, command=command) as w:
        _write_jsonl(w.path / "skipped.jsonl", ({"where": s.where, "reason": s.reason} for s in read.skipped))
        _write_jsonl(w.path / "dropped.jsonl", passed.dropped_rows)
        for fmt in dcfg.formats:
            stats["formats"][fmt] = _write_format(fmt, w.path, passed, cfg, progress)
        stats["seconds"] = round(time.monotonic() - t0, 3)
        stats["documents_per_s"] = round(stats["documents_in"] / max(stats["seconds"], 1e-9), 1)
        stats["mb_per_s"] = round(read.bytes_in / 1e6 / max(stats["seconds"], 1e-9), 3)
        stats["mb_in"] = round(read.bytes_in / 1e6, 3)
        (w.path / "stats.json").write_text(json.dumps(stats, indent=2) + "\n", encoding="utf-8")
        report.write_report(w.path, stats, [len(d.text) for d, _ in passed.kept()], cfg.project.name)
        w.metrics.update(
            {
                "documents_in": stats["documents_in"],
                "documents_out": stats["documents_out"],
                "train_documents": stats["splits"]["train"]["documents"],
                "val_documents": stats["splits"]["val"]["documents"],
                "test_documents": stats["splits"]["test"]["documents"],
                "chars": stats["chars"],
                "pii": stats["pii"],
                "dropped": stats["dropped"],
                "inputs_skipped": stats["inputs_skipped"],
            }
        )


def _write_splits(folder: Path, rows: Iterable[tuple[str, dict[str, Any]]]) -> dict[str, int]:
    """``(split, record)`` pairs written to ``folder/{train,val,test}.jsonl`` as they come; rows per split."""
    folder.mkdir(parents=True, exist_ok=True)
    counts = dict.fromkeys(SPLITS, 0)
    with contextlib.ExitStack() as stack:
        files = {s: stack.enter_context(open(folder / f"{s}.jsonl", "w", encoding="utf-8")) for s in SPLITS}
        for s, r in rows:
            files[s].write(json.dumps(r, ensure_ascii=False) + "\n")
            counts[s] += 1
    return counts


def _write_format(fmt: str, folder: Path, passed: _Passed, cfg: ProjectConfig, progress: bool) -> dict[str, Any]:
    """One format's three split files, streamed from the kept documents."""
    from slmforge.data import formats

    dcfg = cfg.data
    out: dict[str, Any] = {}
    if fmt == "text":
        out.update(_write_splits(folder / "text", ((s, {"id": d.id, "text": d.text, "source": d.source})
                                                   for d, s in passed.kept())))
    elif fmt == "chat":
        out.update(_write_chat(folder, passed, cfg, progress))
    elif fmt == "classification":
        labels: Counter[str] = Counter()
        unlabelled = 0

        def labelled() -> Iterator[tuple[str, dict[str, Any]]]:
            nonlocal unlabelled
            for d, s in passed.kept():
                label = formats.classification_label(d, dcfg.classification.label_from)
                if label is None:
                    unlabelled += 1
                    continue
                labels[label] += 1
                yield s, {"id": d.id, "text": d.text, "label": label}

        out.update(_write_splits(folder / "classification", labelled()))
        (folder / "classification" / "labels.json").write_text(json.dumps(sorted(labels), indent=1) + "\n")
        out["labels"] = dict(labels.most_common())
        out["without_label"] = unlabelled
    elif fmt == "ner":
        tagger = formats.make_tagger(dcfg)
        entity_counts: Counter[str] = Counter()
        label_set: set[str] = set()

        def tagged() -> Iterator[tuple[str, dict[str, Any]]]:
            for d, s in passed.kept():
                for r in formats.ner_examples(d, dcfg, tagger):
                    label_set.update(r["tags"])
                    entity_counts.update(t[2:] for t in r["tags"] if t.startswith("B-"))
                    yield s, r

        out.update(_write_splits(folder / "ner", tagged()))
        # O first, then B-/I- pairs per entity type: the label order a token-classification head uses.
        types = sorted({t[2:] for t in label_set if t != "O"})
        label_list = ["O"] + [f"{p}-{t}" for t in types for p in ("B", "I")]
        (folder / "ner" / "labels.json").write_text(json.dumps(label_list, indent=1) + "\n")
        out["entities"] = dict(entity_counts.most_common())
    return out


def _write_chat(folder: Path, passed: _Passed, cfg: ProjectConfig, progress: bool) -> dict[str, Any]:
    """Question/answer pairs from the kept documents (``data.synth``), streamed: the documents are read back from
    the spill, the pairs filtered (``synth.filter_pairs``) and written as they are made, the held-out 8-grams
    held as sorted 64-bit hashes on disk. The teacher method holds the documents it asks about and their pairs
    (``synth.max_documents`` bounds them)."""
    from slmforge._progress import progress_bar
    from slmforge.data import synth

    scfg = cfg.data.synth
    limit = passed.split_sizes()
    if scfg.max_documents is not None:  # spread the budget over the splits by their size
        total = sum(limit.values())
        for s in SPLITS:
            share = round(scfg.max_documents * limit[s] / max(total, 1))
            limit[s] = min(limit[s], max(share, 1 if limit[s] else 0))

    def chosen(split: str) -> Iterator[Document]:
        n = 0
        for d, s in passed.kept():
            if s == split and n < limit[split]:
                n += 1
                yield d

    pairs_of: dict[str, Iterable[synth.QAPair]] = {}
    errors: Counter[str] = Counter()
    if scfg.method == "template":
        for s in SPLITS:
            pairs_of[s] = (p for d in chosen(s) for p in synth.template_pairs(d, scfg.max_pairs_per_document))
    else:
        all_docs = [d for s in SPLITS for d in chosen(s)]
        split_of = {d.id: s for s in SPLITS for d in chosen(s)}
        with progress_bar(progress) as bar:
            task = bar.add_task("asking the teacher", total=len(all_docs), info="")
            pairs, errors = synth.teacher_pairs(all_docs, scfg, on_done=lambda: bar.update(task, advance=1))
        for s in SPLITS:
            pairs_of[s] = [p for p in pairs if split_of[p.doc_id] == s]
    out: dict[str, Any] = {}
    dropped: Counter[str] = Counter()
    for s in SPLITS:
        heldout = None
        if s == "train":
            heldout = synth.heldout_ngrams((d.text for d, s in passed.kept() if s != "train"),
                                           passed.spill.parent / "heldout-8grams.bin")
        kept = synth.filter_pairs(pairs_of[s], heldout, scfg.max_heldout_overlap if heldout else 1.0, dropped)

        def rows(kept: Iterator[synth.QAPair] = kept) -> Iterator[dict[str, Any]]:
            # A document's pairs come one after another (template: per document; teacher: per answer), so
            # numbering them needs only the current document's id, not a count per document.
            doc_id, n = None, 0
            for p in kept:
                doc_id, n = p.doc_id, (n + 1 if p.doc_id == doc_id else 1)
                yield synth.to_chat(p, n, scfg.system_prompt)

        out[s] = _write_jsonl(folder / "chat" / f"{s}.jsonl", rows())
    out["method"] = scfg.method
    out["pairs_dropped"] = dict(dropped)
    if errors:
        out["teacher_errors"] = dict(errors)
    return out
