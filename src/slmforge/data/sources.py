"""Where documents come from: files and folders of many formats, and the built-in
``python-docs`` source (the documentation and standard library of the running
interpreter, so every machine has a domain corpus offline).

Readers never raise for bad input: a file that cannot be read becomes a
``Skipped`` record with the reason, and the run goes on.
"""

from __future__ import annotations

import ast
import csv
import io
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slmforge.config import DataConfig

BUILTIN_SOURCES = ("python-docs",)
TEXT_SUFFIXES = {".txt", ".md", ".markdown", ".rst"}
HTML_SUFFIXES = {".html", ".htm"}
SUPPORTED_SUFFIXES = TEXT_SUFFIXES | HTML_SUFFIXES | {".jsonl", ".parquet", ".csv", ".py", ".pdf"}
CODE_KINDS = {"py", "module_source"}
_KIND_OF_SUFFIX = {".markdown": "md", ".htm": "html"}


@dataclass
class Document:
    """One document on its way through the data stage."""

    id: str
    text: str
    source: str  # the configured source entry it came from
    kind: str  # txt, md, rst, html, jsonl, parquet, csv, py, pdf, docstring, topic, module_source
    path: str = ""  # file it came from ("" for built-in sources)
    title: str = ""
    label: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def is_code(self) -> bool:
        return self.kind in CODE_KINDS


@dataclass
class Skipped:
    """Input that was not turned into a document, and why."""

    where: str
    reason: str


Record = Document | Skipped


# --------------------------------------------------------------------------- files


def list_files(root: Path) -> list[Path]:
    """Every file under ``root`` (or ``root`` itself), sorted, hidden entries excluded."""
    if root.is_file():
        return [root]
    out = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).parts
        if p.is_file() and not any(part.startswith(".") or part == "__pycache__" for part in rel):
            out.append(p)
    return out


def decode_bytes(raw: bytes) -> tuple[str | None, str | None]:
    """Decode file bytes as UTF-8 text.

    Returns:
        ``(text, None)`` on success, ``(None, reason)`` for binary or undecodable input.
        Up to 1% broken bytes are repaired with U+FFFD; more means the file is not UTF-8.
    """
    head = raw[:8192]
    if b"\x00" in head:
        return None, "binary file"
    controls = sum(1 for b in head if b < 9 or 13 < b < 32)
    if head and controls / len(head) > 0.05:
        return None, "binary file"
    try:
        return raw.decode("utf-8-sig"), None
    except UnicodeDecodeError:
        text = raw.decode("utf-8", errors="replace")
        if text.count("\ufffd") > 0.01 * max(len(text), 1):
            return None, "undecodable bytes (not UTF-8)"
        return text, None


def read_file(path: Path, source: str, cfg: DataConfig) -> Iterator[Record]:
    """Documents from one file, dispatched on its suffix."""
    suffix = path.suffix.lower()
    where = str(path)
    if suffix not in SUPPORTED_SUFFIXES:
        yield Skipped(where, f"unsupported file type ({suffix or 'no suffix'})")
        return
    try:
        size = path.stat().st_size
    except OSError as exc:
        yield Skipped(where, f"unreadable file ({exc.strerror})")
        return
    if size == 0:
        yield Skipped(where, "empty file")
        return
    if suffix in (".jsonl", ".parquet"):  # corpus shards: read record by record, whatever their size
        from slmforge.data.shards import shard_records

        yield from _shard_documents(shard_records(path), path, source, cfg, suffix.lstrip("."))
        return
    if size > cfg.clean.max_file_mb * 1e6:
        yield Skipped(where, f"file larger than clean.max_file_mb ({size / 1e6:.1f} MB)")
        return
    if suffix == ".pdf":
        yield from _read_pdf(path, source)
        return
    try:
        raw = path.read_bytes()
    except OSError as exc:
        yield Skipped(where, f"unreadable file ({exc.strerror})")
        return
    text, reason = decode_bytes(raw)
    if text is None:
        yield Skipped(where, reason or "unreadable")
        return
    if not text.strip():
        yield Skipped(where, "empty file")
        return
    kind = _KIND_OF_SUFFIX.get(suffix, suffix.lstrip("."))
    if suffix in TEXT_SUFFIXES:
        yield Document(id=where, text=text, source=source, kind=kind, path=where, title=_text_title(text, path))
    elif suffix in HTML_SUFFIXES:
        yield _read_html(text, path, source, cfg)
    elif suffix == ".py":
        yield Document(id=where, text=text, source=source, kind="py", path=where, title=path.stem)
    elif suffix == ".csv":
        yield from _read_csv(text, path, source, cfg)


def _text_title(text: str, path: Path) -> str:
    lines = text.lstrip().splitlines()[:3]
    if lines and lines[0].startswith("#"):
        return lines[0].lstrip("#").strip()
    if len(lines) > 1 and lines[1].strip() and set(lines[1].strip()) <= set("=-~^*#"):
        return lines[0].strip()
    return path.stem


def _read_html(html: str, path: Path, source: str, cfg: DataConfig) -> Document:
    from bs4 import BeautifulSoup  # heavy-ish; only when HTML is present

    soup = BeautifulSoup(html, "html.parser")
    title = soup.title.get_text(strip=True) if soup.title else ""
    for tag in soup(["script", "style", "noscript", "template", "svg"]):
        tag.decompose()
    if cfg.clean.strip_boilerplate:
        for tag in soup(["nav", "header", "footer", "aside", "form"]):
            tag.decompose()
        for tag in soup.select('[role="navigation"], [role="banner"], [role="contentinfo"], .cookie, #cookie'):
            tag.decompose()
    # Keep headings recognisable (as Markdown) so synthesis can find sections.
    for level in range(1, 7):
        for h in soup.find_all(f"h{level}"):
            h.insert_before("\n\n" + "#" * level + " ")
            h.insert_after("\n\n")
    for br in soup.find_all("br"):
        br.replace_with("\n")
    body = soup.body or soup
    text = body.get_text("\n")
    if not title:
        h1 = soup.find("h1")
        title = h1.get_text(strip=True) if h1 else path.stem
    where = str(path)
    return Document(id=where, text=text, source=source, kind="html", path=where, title=title)


def _pick_text(record: dict[str, Any], fields: list[str]) -> str | None:
    for name in fields:
        value = record.get(name)
        if isinstance(value, str) and value.strip():
            return value
    return None


def _shard_documents(records: Iterator[tuple[str, dict[str, Any] | str]], path: Path, source: str,
                     cfg: DataConfig, kind: str) -> Iterator[Record]:
    """Documents of a JSONL or Parquet shard's records (``data.shards`` reads them incrementally)."""
    for where, record in records:
        if isinstance(record, str):
            yield Skipped(where, record)
            continue
        meta: dict[str, Any] = {}
        tokens, tags = record.get("tokens"), record.get("tags")
        if isinstance(tokens, list) and isinstance(tags, list) and len(tokens) == len(tags) and tokens:
            meta["ner"] = {"tokens": [str(t) for t in tokens], "tags": [str(t) for t in tags]}
        body = _pick_text(record, cfg.text_fields)
        if body is None and "ner" in meta:
            body = " ".join(meta["ner"]["tokens"])
        if body is None:
            yield Skipped(where, f"{kind.upper()} record has none of the text fields {cfg.text_fields}")
            continue
        label = record.get(cfg.label_field)
        yield Document(
            id=where,
            text=body,
            source=source,
            kind=kind,
            path=str(path),
            title=str(record.get("title") or ""),
            label=None if label is None else str(label),
            meta=meta,
        )


def _read_csv(text: str, path: Path, source: str, cfg: DataConfig) -> Iterator[Record]:
    csv.field_size_limit(int(cfg.clean.max_file_mb * 1e6))
    try:
        reader = csv.DictReader(io.StringIO(text))
        header = reader.fieldnames or []
    except csv.Error as exc:
        yield Skipped(str(path), f"malformed CSV ({exc})")
        return
    if not any(f in header for f in cfg.text_fields):
        yield Skipped(str(path), f"CSV has none of the text columns {cfg.text_fields} (columns: {header})")
        return
    rowno = 1
    try:
        for rowno, row in enumerate(reader, 2):
            body = _pick_text(row, cfg.text_fields)
            if body is None:
                yield Skipped(f"{path}:{rowno}", "empty CSV text cell")
                continue
            label = row.get(cfg.label_field)
            yield Document(
                id=f"{path}:{rowno}",
                text=body,
                source=source,
                kind="csv",
                path=str(path),
                label=label or None,
            )
    except csv.Error as exc:
        yield Skipped(f"{path}:{rowno}", f"malformed CSV row ({exc})")


def _read_pdf(path: Path, source: str) -> Iterator[Record]:
    import logging

    from pypdf import PdfReader

    logging.getLogger("pypdf").setLevel(logging.ERROR)  # it logs every broken xref it repairs
    where = str(path)
    try:
        reader = PdfReader(str(path))
        pages = [page.extract_text() or "" for page in reader.pages]
    except Exception as exc:  # pypdf raises many unrelated types for damaged files
        yield Skipped(where, f"unreadable PDF ({type(exc).__name__}: {str(exc)[:80]})")
        return
    text = "\n\n".join(p.strip() for p in pages if p.strip())
    if not text.strip():
        yield Skipped(where, "PDF has no extractable text (scanned images?)")
        return
    title = ""
    try:
        title = (reader.metadata.title if reader.metadata else "") or ""
    except Exception:
        title = ""
    yield Document(id=where, text=text, source=source, kind="pdf", path=where, title=title or path.stem)


# --------------------------------------------------------------------------- python-docs

_SKIP_PARTS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "turtledemo", "_bundled"}


def python_docs_modules() -> list[tuple[str, Path]]:
    """(module name, file) for every standard-library module of this interpreter, sorted."""
    import os

    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    # os.walk with pruning: the stdlib folder also holds site-packages, which can be huge.
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_PARTS and not d.startswith(("test_", ".")))
        for name in files:
            if not name.endswith(".py") or name.startswith(("test_", ".")):
                continue
            p = Path(folder) / name
            parts = list(p.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            if parts and all(part.isidentifier() for part in parts):
                out.append((".".join(parts), p))
    return sorted(out)


def _signature(node: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    try:
        return f"({ast.unparse(node.args)})"
    except Exception:  # unparse of odd defaults; the signature is a nicety
        return "(...)"


def _docstrings(module: str, tree: ast.Module) -> Iterator[tuple[str, str, str, str]]:
    """(qualified name, kind, header line, docstring) for a module and its public members."""
    doc = ast.get_docstring(tree)
    if doc:
        yield module, "module", f"Module {module}", doc

    def walk(body: list[ast.stmt], prefix: str) -> Iterator[tuple[str, str, str, str]]:
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                if node.name.startswith("_") and not (node.name.startswith("__") and node.name.endswith("__")):
                    continue
                qual = f"{prefix}.{node.name}"
                doc = ast.get_docstring(node)
                if isinstance(node, ast.ClassDef):
                    bases = ", ".join(ast.unparse(b) for b in node.bases)
                    header = f"class {qual}({bases})" if bases else f"class {qual}"
                    if doc:
                        yield qual, "class", header, doc
                    yield from walk(node.body, qual)
                elif doc:
                    prefix_kw = "async def" if isinstance(node, ast.AsyncFunctionDef) else "def"
                    yield qual, "function", f"{prefix_kw} {qual}{_signature(node)}", doc

    yield from walk(tree.body, module)


def read_topics() -> Iterator[Record]:
    """The language reference topics of ``pydoc_data.topics`` (the text of ``help('with')``)."""
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield Document(
            id=f"python-docs:topic:{name}",
            text=topics[name],
            source="python-docs",
            kind="topic",
            title=name,
            meta={"name": name, "object": "topic"},
        )


def read_module(module: str, path: Path, docstrings: bool = True, module_source: bool = False) -> Iterator[Record]:
    """Docstring documents (and optionally the source) of one standard-library module."""
    source = "python-docs"
    try:
        code = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        yield Skipped(str(path), f"unreadable stdlib module ({type(exc).__name__})")
        return
    if module_source and code.strip():
        yield Document(
            id=f"python-docs:source:{module}",
            text=code,
            source=source,
            kind="module_source",
            path=str(path),
            title=module,
            meta={"name": module, "object": "source"},
        )
    if not docstrings:
        return
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError):
        yield Skipped(str(path), "stdlib module does not parse")
        return
    for qual, kind, header, doc in _docstrings(module, tree):
        yield Document(
            id=f"python-docs:{kind}:{qual}",
            text=f"{header}\n\n{doc}",
            source=source,
            kind="docstring",
            path=str(path),
            title=qual,
            meta={"name": qual, "object": kind, "header": header, "doc": doc},
        )


def read_python_docs(cfg: DataConfig) -> Iterator[Record]:
    """The built-in ``python-docs`` source: reference topics, stdlib docstrings, optionally module source."""
    opts = cfg.python_docs
    if opts.topics:
        yield from read_topics()
    if opts.docstrings or opts.module_source:
        for module, path in python_docs_modules()[: opts.max_modules]:
            yield from read_module(module, path, opts.docstrings, opts.module_source)


def python_version_tag() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"
