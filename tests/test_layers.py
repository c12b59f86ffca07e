"""The layer rule of docs/ARCHITECTURE.md, checked on the source: imports point down, never up or
sideways, and never into another package's private ``_modules``.

Every module under src/slmforge is parsed with ``ast`` (nothing is imported), and every
``import slmforge...`` / ``from slmforge... import ...`` is checked, including the lazy ones inside
functions (heavy imports live there, so that is where a wrong dependency hides). Imports built
from strings (``importlib.import_module``) are not seen; the lazy tables that use them point only
into their own package.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "slmforge"

# Highest first; a module may import only from its own unit or from a unit further down the list.
# Units on one line share a rank but are separate packages: imports between them are sideways.
LAYERS: list[tuple[str, ...]] = [
    ("cli",),
    ("pipeline",),
    ("serve",),
    ("ui",),  # the dashboard: pages over artifacts; runs start as `slmforge` processes; mounted by serve
    ("reasoning",),
    ("agents",),
    ("graphrag",),  # reads a rag index
    ("rag", "memory"),
    ("sizing",),  # doctor and roi: reads model presets, GGUF headers, runtimes
    ("bio",),  # the smiles and protein recipes: RDKit data, tokenizers, train's loop, their own metrics
    ("export",),
    ("compress",),
    ("evaluate",),
    ("generate",),
    ("train",),
    ("model",),
    ("tokenizer",),
    ("data",),
    ("core",),
]

# Where the top-level modules (src/slmforge/*.py) sit. A new top-level module must be placed here
# (the test below fails until it is), so the choice is made on purpose.
TOP_LEVEL = {
    "__init__": "core",  # the version and a lazy name table (strings, no imports)
    "__main__": "cli",  # `python -m slmforge` runs the CLI
    "pipeline": "pipeline",
    "sweep": "pipeline",  # many pipeline runs with content-addressed stage outputs
    "embed": "model",  # loads a sentence-transformers model folder; serve/ and rag/ sit above it
    "config": "core",
    "artifacts": "core",
    "errors": "core",
    "endpoints": "core",  # which endpoint may receive which key: shared by data/, generate/, serve/
    "label_metrics": "core",  # classification and NER scores: reported by train/ (encoder) and evaluate/
    "_progress": "core",  # progress bars: private to slmforge as a whole, used by every stage
}

RANK = {unit: len(LAYERS) - i for i, units in enumerate(LAYERS) for unit in units}

# Violations that could not yet be removed, each with its reason: (importer file, imported module).
# Keep this empty; an entry is a debt, not a permission.
ALLOWED: dict[tuple[str, str], str] = {}


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def _unit(module: str) -> str | None:
    """The layer unit of a dotted ``slmforge...`` name; None for a package missing from LAYERS or a
    top-level module missing from TOP_LEVEL."""
    parts = module.split(".")
    if len(parts) == 1:
        return TOP_LEVEL["__init__"]
    head = parts[1]
    if (SRC / head).is_dir():
        return head if head in RANK else None
    if not (SRC / f"{head}.py").is_file():
        return TOP_LEVEL["__init__"]  # a name defined in slmforge/__init__.py (`from slmforge import __version__`)
    return TOP_LEVEL.get(head)


@functools.cache
def _imports(path: Path, module: str) -> list[tuple[int, str]]:
    """(line, dotted name) for every slmforge import in the file; `from a import b` yields a.b,
    so that both the module and a private name imported from it are seen."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_pkg = path.name == "__init__.py"
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "slmforge"]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                pkg = module.split(".") if is_pkg else module.split(".")[:-1]
                pkg = pkg[: len(pkg) - (node.level - 1)]
                base = ".".join(pkg + ([base] if base else []))
            if base.split(".")[0] != "slmforge":
                continue
            found += [(node.lineno, f"{base}.{a.name}") for a in node.names if a.name != "*"]
    return found


def _private_owner(target: str) -> str | None:
    """The package a private name in ``target`` belongs to (the part before the first ``_name``
    that is not a dunder), or None when the path is public."""
    parts = target.split(".")
    for i, part in enumerate(parts[1:], start=1):
        if part.startswith("_") and not part.startswith("__"):
            return ".".join(parts[:i])
    return None


def _violations() -> list[str]:
    problems: dict[tuple[str, str], list[str]] = {}  # (where, what is wrong) -> the names imported there
    for path in sorted(SRC.rglob("*.py")):
        module = _module_name(path)
        importer = _unit(module)
        rel = path.relative_to(SRC.parents[1])
        if importer is None:
            problems[(f"{rel}", f"{module.split('.')[1]} has no layer; add it to LAYERS or TOP_LEVEL in {__file__}")] = []
            continue
        package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
        for line, target in _imports(path, module):
            if (str(rel), target) in ALLOWED:
                continue
            imported = _unit(target)
            if imported is None:
                problem = f"{target.split('.')[1]} has no layer in LAYERS or TOP_LEVEL"
            elif imported != importer and RANK[imported] >= RANK[importer]:
                kind = "sideways" if RANK[imported] == RANK[importer] else "upward"
                problem = f"{kind}: {importer} -> {imported}"
            elif (owner := _private_owner(target)) and package != owner and not package.startswith(owner + "."):
                problem = f"private to {owner}; import its public API instead"
            else:
                continue
            problems.setdefault((f"{rel}:{line}: {importer} imports", problem), []).append(target)
    return [f"{where} {', '.join(names)} ({problem})" if names else f"{where}: {problem}"
            for (where, problem), names in problems.items()]


def test_imports_point_down_the_layers_and_not_into_private_modules():
    problems = _violations()
    assert not problems, "layer rule broken (see docs/ARCHITECTURE.md, Layers):\n" + "\n".join(problems)


def test_allowlist_entries_are_still_needed():
    """An allowlisted import that no longer exists must leave the list, so the list only shrinks."""
    present = set()
    for path in SRC.rglob("*.py"):
        rel = str(path.relative_to(SRC.parents[1]))
        present |= {(rel, target) for _, target in _imports(path, _module_name(path))}
    assert not set(ALLOWED) - present


@pytest.mark.parametrize(
    ("file", "source", "expected"),
    [
        ("model/__init__.py", "from slmforge.compress import load_quantized\n", "upward: model -> compress"),
        ("rag/index.py", "from slmforge.memory import Store\n", "sideways: rag -> memory"),
        ("serve/_app.py", "def f():\n    from slmforge.train._data import x\n", "private to slmforge.train"),
        ("cli/main.py", "from slmforge.train import _helper\n", "private to slmforge.train"),
        ("wandb.py", "import json\n", "wandb has no layer"),
        ("dashboard/app.py", "import json\n", "dashboard has no layer"),
        ("data/x.py", "from slmforge.model import build_model, estimate\n", "upward: data -> model"),
        ("train/_loop.py", "from ._data import x\n", None),
        ("train/encoder.py", "from slmforge.train._data import x\n", None),
        ("data/synth.py", "from slmforge._progress import progress_bar\n", None),
        ("cli/main.py", "import slmforge.evaluate.run\n", None),
    ],
)
def test_the_checker_sees_what_it_should(tmp_path, monkeypatch, file, source, expected):
    """The rule itself, on small made-up trees: a checker that saw nothing would pass vacuously."""
    root = tmp_path / "slmforge"
    for pkg in ("cli", "serve", "rag", "memory", "train", "model", "compress", "data", "evaluate"):
        (root / pkg).mkdir(parents=True)
        (root / pkg / "__init__.py").write_text("")
    (root / "__init__.py").write_text("")
    (root / file).parent.mkdir(exist_ok=True)
    (root / file).write_text(source)
    monkeypatch.setitem(globals(), "SRC", root)
    problems = _violations()
    if expected is None:
        assert problems == []
    else:
        assert len(problems) == 1 and expected in problems[0], problems


def test_the_type_checker_covers_exactly_the_core_modules():
    """`make test` runs mypy (strict) on pyproject's [tool.mypy] files: every top-level module of the
    core layer, so a module moved down to the core is type-checked from then on."""
    import tomllib

    pyproject = tomllib.loads((SRC.parents[1] / "pyproject.toml").read_text(encoding="utf-8"))
    core = {f"src/slmforge/{name}.py" for name, unit in TOP_LEVEL.items()
            if unit == "core" and (SRC / f"{name}.py").is_file()}
    assert set(pyproject["tool"]["mypy"]["files"]) == core
