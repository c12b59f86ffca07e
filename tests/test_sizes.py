"""Issue 11: no source file over ~600 lines, no function over ~80 lines, except where the code says why.

Every module under src/slmforge is parsed with ``ast`` (nothing is imported). A file longer than
MAX_FILE_LINES fails unless one of its first 20 lines carries ``# long-file: <reason>``; a function or
method whose definition (decorators to last line) spans more than MAX_FUNCTION_LINES fails unless its
``def`` line, or the line above it, carries ``# long: <reason>``. Reasons must be written out: an
exception is a statement about the code ("its length is the option declarations"), not a permission.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "slmforge"

MAX_FILE_LINES = 600
MAX_FUNCTION_LINES = 80

_LONG_FILE = re.compile(r"#\s*long-file:\s*\S")
_LONG_FUNCTION = re.compile(r"#\s*long:\s*\S")

# Files exempt without a marker, each with its reason. Keep this short.
EXEMPT_FILES: dict[str, str] = {
    # pydantic declarations only (one model per config section); to be split into a config/ package
    # whose __init__ re-exports every model, so `from slmforge.config import X` keeps working.
    "config.py": "pydantic declarations; split into a package later",
}

# Offenders being shortened right now by whoever owns their files (issue 11). Entries are
# "relative/path.py" for a file or "relative/path.py::qualname" for a function. This set must only
# shrink: test_pending_entries_still_offend fails when an entry no longer offends, so it leaves at once.
# (compress `quantize`/`sensitivity` and evaluate/report `write_report` were shortened by their owners
# while this test was written, so they are not listed.)
PENDING: set[str] = set()


def _functions(tree: ast.AST, prefix: str = "") -> list[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    """(qualified name, node) for every function and method, nested ones included."""
    found: list[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]] = []
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            name = f"{prefix}{node.name}"
            found.append((name, node))
            found += _functions(node, f"{name}.<locals>.")
        elif isinstance(node, ast.ClassDef):
            found += _functions(node, f"{prefix}{node.name}.")
        else:
            found += _functions(node, prefix)
    return found


def _offenders(src: Path = SRC) -> dict[str, str]:
    """key ("file" or "file::qualname") -> what is wrong and how to fix it."""
    problems: dict[str, str] = {}
    for path in sorted(src.rglob("*.py")):
        rel = path.relative_to(src).as_posix()
        text = path.read_text(encoding="utf-8")
        lines = text.splitlines()
        if (len(lines) > MAX_FILE_LINES and rel not in EXEMPT_FILES
                and not any(_LONG_FILE.search(line) for line in lines[:20])):
            problems[rel] = (
                f"src/slmforge/{rel} has {len(lines)} lines (limit {MAX_FILE_LINES}): split it along its "
                f"seams into private sibling modules re-exported from it, or say why not with a "
                f"`# long-file: <reason>` comment in its first 20 lines")
        for name, node in _functions(ast.parse(text, filename=str(path))):
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            span = (node.end_lineno or node.lineno) - first + 1
            if span <= MAX_FUNCTION_LINES:
                continue
            marked = lines[node.lineno - 1 : node.lineno] + lines[max(first - 2, 0) : first - 1]
            if any(_LONG_FUNCTION.search(line) for line in marked):
                continue
            problems[f"{rel}::{name}"] = (
                f"src/slmforge/{rel}:{node.lineno} {name} spans {span} lines (limit {MAX_FUNCTION_LINES}): "
                f"move steps into named helpers, or say why not with `# long: <reason>` on its def line "
                f"or the line above")
    return problems


def test_files_and_functions_are_short_or_say_why():
    problems = {key: msg for key, msg in _offenders().items() if key not in PENDING}
    assert not problems, "too long (issue 11):\n" + "\n".join(problems.values())


def test_pending_entries_still_offend():
    """A PENDING entry that has been fixed must leave the set, so the set only shrinks."""
    fixed = PENDING - set(_offenders())
    assert not fixed, f"no longer too long; remove from PENDING in {__file__}: {sorted(fixed)}"


def test_exempt_files_exist():
    missing = [rel for rel in EXEMPT_FILES if not (SRC / rel).is_file()]
    assert not missing, f"EXEMPT_FILES names files that are gone: {missing}"


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("def f():\n" + "    x = 1\n" * 80, "f spans 81 lines"),
        ("def f():\n" + "    x = 1\n" * 79, None),
        ("def f():  # long: a table of cases\n" + "    x = 1\n" * 90, None),
        ("# long: a table of cases\ndef f():\n" + "    x = 1\n" * 90, None),
        ("# long:\ndef f():\n" + "    x = 1\n" * 90, "f spans 91 lines"),  # a reason is required
        ("class A:\n    @property\n    def g(self):\n" + "        x = 1\n" * 80, "A.g spans 82 lines"),
        ("def f():\n    def inner():\n" + "        x = 1\n" * 85 + "    return inner\n", "f.<locals>.inner spans"),
        ("x = 1\n" * 601, "has 601 lines"),
        ("# long-file: generated table\n" + "x = 1\n" * 601, None),
    ],
)
def test_the_checker_sees_what_it_should(tmp_path, source, expected):
    """The rule itself, on made-up files: a checker that saw nothing would pass vacuously."""
    (tmp_path / "m.py").write_text(source)
    problems = list(_offenders(tmp_path).values())
    if expected is None:
        assert problems == []
    else:
        assert problems and expected in problems[-1], problems
