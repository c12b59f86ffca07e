"""The lineage graph as an SVG drawn on the server: layers by longest path from a root, one column per
layer. A project's lineage is a short DAG (data -> tokenizer -> train -> sft -> quantize/eval -> report),
so a layered layout reads well and needs no graph-layout library or JavaScript to render."""

from __future__ import annotations

from html import escape
from urllib.parse import quote

_W, _H, _GAP_X, _GAP_Y, _PAD = 170, 46, 50, 16, 10
_FILL = {"passing": "#e6f4ea", "failing": "#fde8e8", "done": "#eef2fb", "external": "#f3f3f3"}


def _layers(nodes: list[dict], edges: list[tuple[str, str]]) -> dict[str, int]:
    parents: dict[str, list[str]] = {n["id"]: [] for n in nodes}
    for src, dst in edges:
        parents.setdefault(dst, []).append(src)
    depth: dict[str, int] = {}

    def visit(node: str, seen: frozenset[str]) -> int:
        if node not in depth:
            ps = [p for p in parents.get(node, []) if p not in seen]  # a cycle cannot come from manifests; be safe
            depth[node] = 1 + max((visit(p, seen | {node}) for p in ps), default=-1)
        return depth[node]

    for n in nodes:
        visit(n["id"], frozenset())
    return depth


def lineage_svg(nodes: list[dict], edges: list[tuple[str, str]], link: str) -> str:
    """The graph as an ``<svg>``; each project artifact links to ``link`` + its id."""
    if not nodes:
        return '<p class="muted">No artifacts yet: start a run.</p>'
    depth = _layers(nodes, edges)
    columns: dict[int, list[dict]] = {}
    for n in sorted(nodes, key=lambda n: n["id"]):
        columns.setdefault(depth[n["id"]], []).append(n)
    pos = {n["id"]: (_PAD + d * (_W + _GAP_X), _PAD + i * (_H + _GAP_Y))
           for d, col in columns.items() for i, n in enumerate(col)}
    width = _PAD * 2 + (max(columns) + 1) * (_W + _GAP_X) - _GAP_X
    height = _PAD * 2 + max(len(c) for c in columns.values()) * (_H + _GAP_Y) - _GAP_Y
    parts = [f'<svg class="lineage" role="img" aria-labelledby="lineage-title" viewBox="0 0 {width} {height}" '
             f'width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg">',
             '<title id="lineage-title">Lineage: which artifact was made from which</title>',
             '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" markerHeight="7" '
             'orient="auto-start-reverse"><path d="M 0 0 L 10 5 L 0 10 z" fill="#667"/></marker></defs>']
    for src, dst in edges:
        (x1, y1), (x2, y2) = pos[src], pos[dst]
        parts.append(f'<path class="edge" d="M {x1 + _W} {y1 + _H / 2} C {x1 + _W + _GAP_X / 2} {y1 + _H / 2}, '
                     f'{x2 - _GAP_X / 2} {y2 + _H / 2}, {x2} {y2 + _H / 2}" fill="none" stroke="#667" '
                     'marker-end="url(#arrow)"/>')
    for n in nodes:
        x, y = pos[n["id"]]
        label = n["id"] if len(n["id"]) <= 24 else "…" + n["id"][-23:]
        box = (f'<rect x="{x}" y="{y}" width="{_W}" height="{_H}" rx="6" fill="{_FILL.get(n["status"], "#fff")}" '
               f'stroke="#556"/><text x="{x + 8}" y="{y + 18}" class="node-id">{escape(label)}</text>'
               f'<text x="{x + 8}" y="{y + 36}" class="node-kind">{escape(n["kind"])} · {escape(n["status"])}</text>')
        title = f'<title>{escape(n["id"])} ({escape(n["kind"])}, {escape(n["status"])})</title>'
        if n["inside"]:
            parts.append(f'<a class="node" href="{escape(link + quote(n["id"]))}">{title}{box}</a>')
        else:
            parts.append(f'<g class="node external">{title}{box}</g>')
    parts.append("</svg>")
    return "".join(parts)
