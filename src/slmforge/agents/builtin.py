"""The built-in tools: calculator, Python in the sandbox, knowledge-base search, read-only SQL, files in a
workspace folder, HTTP fetch for allowed hosts. Each factory returns ``Tool`` objects bound to its settings.

Results are text (what the model reads), cut to ``MAX_RESULT`` characters.
"""

from __future__ import annotations

import ast
import math
import operator
import os
import sqlite3
from pathlib import Path
from typing import Any

from slmforge.agents.tools import Tool, tool
from slmforge.errors import AgentError

MAX_RESULT = 4000  # characters of a tool result the model is shown


def _cut(text: str) -> str:
    return text if len(text) <= MAX_RESULT else text[:MAX_RESULT] + f"... [{len(text) - MAX_RESULT} more characters]"


# --------------------------------------------------------------------------- calculator

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_FUNCTIONS = {"sqrt": math.sqrt, "log": math.log, "exp": math.exp, "abs": abs, "round": round, "min": min,
              "max": max, "floor": math.floor, "ceil": math.ceil, "sin": math.sin, "cos": math.cos}
_CONSTANTS = {"pi": math.pi, "e": math.e}
_MAX_POWER = 10_000  # an exponent above this (or a result over 10**_MAX_DIGITS) is refused: 9**9**9 hangs
_MAX_DIGITS = 1000


def calculate(expression: str) -> float | int:
    """Evaluate arithmetic: numbers, + - * / // % **, parentheses, and the functions and constants in
    ``_FUNCTIONS``/``_CONSTANTS``.

    Written over ``ast`` by hand (no ``eval``): the expression only ever reaches this walker, which knows
    numbers and the listed operators; names, attributes, calls of anything else are errors.

    Raises:
        ValueError: Anything else, naming it.
    """
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as e:
        raise ValueError(f"not an arithmetic expression: {e.msg}") from None
    return _walk(tree.body)


def _walk(node: ast.AST) -> Any:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _walk(node.left), _walk(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > _MAX_POWER:
            raise ValueError(f"exponent {right} is too large")
        try:
            value = _BINARY[type(node.op)](left, right)
        except ZeroDivisionError:
            raise ValueError("division by zero") from None
        if isinstance(value, int) and value.bit_length() > _MAX_DIGITS * 3.33:
            raise ValueError("the result is too large")
        return value
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_walk(node.operand))
    if isinstance(node, ast.Name) and node.id in _CONSTANTS:
        return _CONSTANTS[node.id]
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCTIONS
            and not node.keywords):
        return _FUNCTIONS[node.func.id](*[_walk(a) for a in node.args])
    raise ValueError(f"{ast.unparse(node)!r} is not allowed (numbers, + - * / // % **, parentheses, "
                     f"{', '.join(sorted(_FUNCTIONS))}, pi, e)")


def calculator() -> Tool:
    @tool(name="calculator")
    def calc(expression: str) -> str:
        """Evaluate an arithmetic expression exactly, e.g. "(12 + 7) * 3" or "sqrt(2) / 4".

        Args:
            expression: Numbers, + - * / // % **, parentheses, sqrt, log, exp, abs, round, min, max, floor,
                ceil, sin, cos, pi, e.
        """
        return str(calculate(expression))

    return calc


# --------------------------------------------------------------------------- Python in the sandbox


def python_sandbox(timeout_s: float = 10.0, allow_weak: bool = False) -> Tool:
    """Run Python in the evaluation sandbox (``slmforge.evaluate.sandbox``): no network, scratch folder,
    resource limits; what it prints is the result. High stakes: it runs code."""
    from slmforge.evaluate.sandbox import SandboxLimits, run_python

    limits = SandboxLimits(timeout_s=timeout_s, cpu_s=max(1, int(timeout_s)))

    @tool(name="python", high_stakes=True)
    def python(code: str) -> str:
        """Run a Python program (standard library only, no network, no files kept) and return what it
        prints. Print the result you need.

        Args:
            code: The whole program.
        """
        result = run_python(code, limits, allow_weak=allow_weak)
        out = result.stdout.strip()
        if result.status != "passed":
            return _cut(f"[{result.status}, exit {result.returncode}]\n{out}\n{result.stderr.strip()[-1500:]}")
        return _cut(out or "(printed nothing)")

    return python


# --------------------------------------------------------------------------- knowledge base


def knowledge_search(index: Any, k: int = 4, mode: str = "hybrid") -> Tool:
    """Search a ``slmforge rag`` index; the result lists numbered passages with source and span."""
    from slmforge.rag.retrieve import retrieve

    @tool(name="search_documents")
    def search_documents(query: str) -> str:
        """Search the documents for passages relevant to a query.

        Args:
            query: What to look for, in words.
        """
        hits = retrieve(index, query, mode=mode, k=k)
        if not hits:
            return "No passages found."
        return _cut("\n\n".join(f"[{n}] {h.chunk.source}:{h.chunk.start}-{h.chunk.end}\n{h.chunk.text.strip()}"
                                for n, h in enumerate(hits, 1)))

    return search_documents


# --------------------------------------------------------------------------- read-only SQL

_READ_ACTIONS = {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION}
MAX_ROWS = 50


def sql_query(database: str | Path) -> Tool:
    """Read-only SQL over one SQLite file: opened read-only (``mode=ro``), ``query_only`` set, and an
    authorizer that denies every action but reading, so neither writes nor ATTACH nor PRAGMA get through.

    Raises:
        AgentError: The file does not exist.
    """
    path = Path(database).resolve()
    if not path.is_file():
        raise AgentError(f"SQL tool: no database file at {path}.")

    def tables() -> str:
        with _read_only(path) as db:
            rows = db.execute("SELECT name, sql FROM sqlite_schema WHERE type = 'table'").fetchall()
        return "; ".join(sql for _, sql in rows)

    @tool(name="sql", description=f"Run one read-only SQL query (SQLite) over {path.name}. Tables: {tables()}")
    def sql(query: str) -> str:
        """Run one read-only SQL query.

        Args:
            query: One SELECT statement.
        """
        with _read_only(path) as db:
            try:
                cursor = db.execute(query)
                rows = cursor.fetchmany(MAX_ROWS + 1)
            except sqlite3.Error as e:
                return f"SQL error: {e}"
            names = [d[0] for d in cursor.description or []]
        lines = [" | ".join(names)] + [" | ".join(str(v) for v in r) for r in rows[:MAX_ROWS]]
        if len(rows) > MAX_ROWS:
            lines.append(f"... more than {MAX_ROWS} rows; narrow the query")
        return _cut("\n".join(lines))

    return sql


class _read_only:
    def __init__(self, path: Path) -> None:
        self.db = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)
        self.db.execute("PRAGMA query_only = ON")
        self.db.set_authorizer(lambda action, *_: sqlite3.SQLITE_OK if action in _READ_ACTIONS else sqlite3.SQLITE_DENY)

    def __enter__(self) -> sqlite3.Connection:
        return self.db

    def __exit__(self, *exc: Any) -> None:
        self.db.close()


# --------------------------------------------------------------------------- workspace files


def confine(root: Path, relative: str) -> Path:
    """``relative`` inside ``root``, with every symlink resolved.

    Raises:
        AgentError: An absolute path, or one that (through ``..`` or a symlink) leaves ``root``.
    """
    if not relative or os.path.isabs(relative) or "\x00" in relative:
        raise AgentError(f"{relative!r}: give a path relative to the workspace.")
    target = (root / relative).resolve()
    if target != root and root not in target.parents:
        raise AgentError(f"{relative!r} leaves the workspace; paths stay inside it.")
    return target


def workspace(folder: str | Path, writable: bool = True) -> list[Tool]:
    """Tools to list, read and (with ``writable``) write text files inside ``folder``; no path can leave it
    (``..``, absolute paths and symlinks pointing out are refused). Writing is high stakes."""
    root = Path(folder).resolve()

    @tool
    def list_files() -> str:
        """List the files in the workspace."""
        files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and not p.is_symlink()
                       ) if root.is_dir() else []
        return _cut("\n".join(files) or "(empty)")

    @tool
    def read_file(path: str) -> str:
        """Read a text file from the workspace.

        Args:
            path: The file's path relative to the workspace.
        """
        target = confine(root, path)
        if not target.is_file():
            return f"No file {path!r} in the workspace."
        return _cut(target.read_text(encoding="utf-8", errors="replace"))

    @tool(high_stakes=True)
    def write_file(path: str, content: str) -> str:
        """Write a text file in the workspace (replacing it if it exists).

        Args:
            path: The file's path relative to the workspace.
            content: The text to write.
        """
        target = confine(root, path)
        target.parent.mkdir(parents=True, exist_ok=True)
        # O_NOFOLLOW: a symlink planted at the target after confine() checked it is not followed out.
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(content)
        return f"Wrote {len(content)} characters to {path}."

    return [list_files, read_file, write_file] if writable else [list_files, read_file]


# --------------------------------------------------------------------------- HTTP fetch


def http_fetch(allow_hosts: list[str], timeout_s: float = 15.0) -> Tool:
    """GET a URL whose host is in ``allow_hosts`` (redirects followed only to allowed hosts). High stakes.

    Raises:
        AgentError: No hosts allowed (HTTP is off unless a host is named).
    """
    if not allow_hosts:
        raise AgentError("HTTP fetch is off: allow it per host (agent.allow_hosts, --allow-host example.org).")
    allowed = {h.lower() for h in allow_hosts}

    @tool(name="http_get", high_stakes=True)
    def http_get(url: str) -> str:
        """Fetch a web page or API response by URL (GET) and return its text.

        Args:
            url: An http or https URL on an allowed host.
        """
        import httpx

        for _ in range(5):
            parsed = httpx.URL(url)
            if parsed.scheme not in ("http", "https") or parsed.host.lower() not in allowed:
                return f"Refused: {parsed.host or url} is not an allowed host ({', '.join(sorted(allowed))})."
            try:
                r = httpx.get(url, timeout=timeout_s, follow_redirects=False)
            except httpx.HTTPError as e:
                return f"Fetch failed: {type(e).__name__}: {e}"
            if r.is_redirect and "location" in r.headers:
                url = str(parsed.join(r.headers["location"]))
                continue
            return _cut(f"HTTP {r.status_code}\n{r.text}")
        return "Refused: too many redirects."

    return http_get
