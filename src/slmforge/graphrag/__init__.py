"""Graph RAG over a ``slmforge rag`` index: ``slmforge graph build|query``.

    graph = build_graph(index, folder, generator=None)      # entities and relations of every chunk
    hits = graph_retrieve(graph, index, "How does X relate to Y?", mode="multihop")

Entities come from a deterministic extractor (markdown headings, dotted code identifiers and calls,
backticked terms, capitalised noun phrases), so a small model never yields an empty graph; with a
generator, the model adds entities and typed relations (``{"source", "relation", "target"}``): decoded
under a JSON schema on engines that constrain output (torch, llama.cpp), so even a small model's reply
parses, and parsed leniently elsewhere. Entities are resolved by a key (case, backticks, call parentheses
and a plural "s" removed); every pair in a chunk is linked by co-occurrence, and a model's relations label
their edge (``relations``). Extraction is cached per chunk hash, so a rebuild after the index changed
extracts only new chunks. Communities are Louvain's (networkx), each summarised by its most connected
entities and the first sentence of its most central chunk, or, with a generator, by the model from those.

Retrieval modes: ``local`` (the chunks of the entities the question names and of their neighbours),
``multihop`` (the chunks along shortest paths between the entities the question names: answers that
need two documents), ``global`` (community summaries ranked by the question's words), ``hybrid``
(reciprocal-rank fusion of ``local``/``multihop`` and the index's own hybrid retrieval).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_DOTTED = re.compile(r"\b[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+\b")
_CALL = re.compile(r"\b([A-Za-z_]\w{2,})\(\)")
_TICKS = re.compile(r"`([^`\n]{2,60})`")
_PROPER = re.compile(r"\b[A-Z][a-z]+(?:[ \t]+[A-Z][a-z]+)+\b")
_HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*$", re.M)
_STOP = {"The", "This", "That", "These", "Those", "A", "An", "If", "When", "Use", "See", "Note", "Return", "Returns"}
_NAME = re.compile(r"^[\w.\- ]+(?:\(\))?$")  # an entity name: words, dots, dashes; no clause punctuation
_COMMON = {"and", "or", "not", "the", "for", "with", "from", "that", "this", "none", "true", "false", "self", "str",
           "int", "list", "dict", "object", "value", "name", "type", "data", "file", "string", "default"}


def entity_key(name: str) -> str:
    """The resolution key: case, backticks and call parentheses, surrounding punctuation and (for words,
    not identifiers) a plural "s" removed, so "Widgets", "`widget`" and "widget()" are one entity."""
    key = name.strip().strip("`'\"").removesuffix("()").strip(" .,:;").lower()
    key = re.sub(r"\s+", " ", key)
    code = any(ch in key for ch in "._")  # identifiers keep their spelling: json.dumps is not json.dump
    if not code and len(key) > 3 and key.endswith("s") and not key.endswith("ss") and " " not in key[-3:]:
        key = key[:-1]
    return key


def rule_entities(text: str) -> list[str]:
    """Entity names the deterministic extractor finds in a chunk."""
    found = [m.group(1) for m in _HEADING.finditer(text)]
    found += _DOTTED.findall(text) + _CALL.findall(text) + _TICKS.findall(text)
    for phrase in _PROPER.findall(text):
        words = phrase.split()
        if words[0] in _STOP:
            words = words[1:]
        if len(words) >= 2:
            found.append(" ".join(words))
    keep = (f.strip() for f in found)
    return list(dict.fromkeys(f for f in keep if _NAME.match(f) and len(entity_key(f)) >= 3
                              and entity_key(f) not in _COMMON))


_PROMPT = ('List the named entities (APIs, modules, products, people, places, concepts) in this text and how '
           'they are related, as JSON: {"entities": ["...", ...], "relations": [{"source": "...", "relation": '
           '"uses", "target": "..."}, ...]}. Use empty lists if there are none.\n\nText: ')
_NAME_SCHEMA = {"type": "string", "minLength": 3, "maxLength": 60}
EXTRACTION_SCHEMA = {
    "type": "object",
    "properties": {
        "entities": {"type": "array", "items": _NAME_SCHEMA, "maxItems": 12},
        "relations": {"type": "array", "maxItems": 8, "items": {
            "type": "object", "properties": {"source": _NAME_SCHEMA, "relation": {"type": "string", "minLength": 2,
                                                                                  "maxLength": 30},
                                             "target": _NAME_SCHEMA},
            "required": ["source", "relation", "target"], "additionalProperties": False}},
    },
    "required": ["entities", "relations"],
    "additionalProperties": False,
}


def model_extract(generator: Any, text: str) -> tuple[list[str], list[tuple[str, str, str]]]:
    """The generator's entities and typed relations (source, relation, target); ([], []) when its reply does
    not parse. On an engine that constrains output the reply is decoded under ``EXTRACTION_SCHEMA``."""
    from slmforge.generate import SamplingParams, chat_json

    messages = [{"role": "user", "content": _PROMPT + text[:1500]}]
    params = SamplingParams(max_new_tokens=160, temperature=0.0)
    try:
        reply = chat_json(generator, messages, params, EXTRACTION_SCHEMA)[0].text
        start = min((i for i in (reply.find("{"), reply.find("[")) if i >= 0), default=-1)
        value = json.loads(reply[start: max(reply.rfind("}"), reply.rfind("]")) + 1]) if start >= 0 else None
    except Exception:  # a small model's reply is often not JSON: the rule extractor stands alone
        return [], []
    if isinstance(value, list):  # a bare list of names
        value = {"entities": value, "relations": []}
    if not isinstance(value, dict):
        return [], []
    ok = [str(x).strip() for x in value.get("entities") or [] if isinstance(x, str) and 3 <= len(x.strip()) <= 80]
    relations = [(str(r["source"]).strip(), str(r["relation"]).strip().lower(), str(r["target"]).strip())
                 for r in value.get("relations") or [] if isinstance(r, dict)
                 and all(isinstance(r.get(f), str) and r[f].strip() for f in ("source", "relation", "target"))]
    return ok, [r for r in relations if entity_key(r[0]) != entity_key(r[2])]


def model_entities(generator: Any, text: str) -> list[str]:
    """The generator's entities (``model_extract`` without the relations)."""
    return model_extract(generator, text)[0]


@dataclass
class Graph:
    graph: Any  # networkx.Graph: entity keys; nodes carry "names" and "chunks", edges "weight" and "chunks"
    communities: list[dict[str, Any]] = field(default_factory=list)
    extracted: int = 0  # chunks whose entities were extracted in this build (the rest came from the cache)

    def entities_in(self, question: str) -> list[str]:
        """Graph entities named in the question (by resolution key), longest first."""
        words = " " + " ".join(entity_key(w) for w in re.findall(r"[\w.]+", question)) + " "
        q = entity_key(question)
        hits = [n for n in self.graph.nodes if f" {n} " in words or (" " in n and n in q)]
        return sorted(hits, key=len, reverse=True)


def build_graph(index: Any, folder: str | Path, generator: Any = None, progress: bool = True) -> Graph:
    """Extract every chunk's entities (cached per chunk hash under ``folder``), link co-occurring ones,
    find communities, and save ``graph.json`` and ``communities.json`` in ``folder``."""
    import networkx as nx

    from slmforge._progress import progress_bar

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cache_file = folder / "extraction_cache.json"
    cache: dict[str, Any] = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
    chunks = index.chunks(index.filtered_ids({}))
    g = nx.Graph()
    extracted = 0
    with progress_bar(progress and (len(chunks) > 200 or generator is not None)) as bar:
        task = bar.add_task("extracting entities", total=len(chunks), info="")
        for cid, chunk in chunks.items():
            if chunk.hash not in cache:
                found, relations = model_extract(generator, chunk.text) if generator else ([], [])
                cache[chunk.hash] = {"names": rule_entities(chunk.text) + found, "relations": relations}
                extracted += 1
            entry = cache[chunk.hash]
            names, relations = (entry, []) if isinstance(entry, list) else (entry["names"], entry["relations"])
            keys: dict[str, str] = {}
            for name in [*names, *(n for s, _, t in relations for n in (s, t))]:
                keys.setdefault(entity_key(name), name)
            for key, name in keys.items():
                if key not in g:
                    g.add_node(key, names=[], chunks=[])
                if name not in g.nodes[key]["names"]:
                    g.nodes[key]["names"].append(name)
                g.nodes[key]["chunks"].append(cid)
            ordered = sorted(keys)
            for i, a in enumerate(ordered):
                for b in ordered[i + 1:]:
                    if g.has_edge(a, b):
                        g[a][b]["weight"] += 1
                        g[a][b]["chunks"].append(cid)
                    else:
                        g.add_edge(a, b, weight=1, chunks=[cid], relations=[])
            for source, relation, target in relations:  # the model's label on the co-occurrence edge
                edge = g[entity_key(source)][entity_key(target)]
                label = f"{entity_key(source)} {relation} {entity_key(target)}"
                if label not in edge["relations"]:
                    edge["relations"].append(label)
            bar.update(task, advance=1)
    cache_file.write_text(json.dumps(cache))
    graph = Graph(g, _communities(g, chunks, generator), extracted)
    (folder / "graph.json").write_text(json.dumps(nx.node_link_data(g, edges="edges")))
    (folder / "communities.json").write_text(json.dumps(graph.communities, indent=1))
    return graph


SUMMARISED = 32  # communities (the largest) a generator summarises; the rest keep the rule summary


def _communities(g: Any, chunks: dict[str, Any], generator: Any = None) -> list[dict[str, Any]]:
    import networkx as nx

    if g.number_of_nodes() == 0:
        return []
    out = []
    for i, members in enumerate(nx.community.louvain_communities(g, weight="weight", seed=0)):
        sub = g.subgraph(members)
        top = sorted(members, key=lambda n: -sub.degree(n, weight="weight"))[:8]
        central = g.nodes[top[0]]["chunks"][0]
        first = re.split(r"(?<=[.!?])\s", chunks[central].text.strip(), maxsplit=1)[0][:300] if central in chunks else ""
        labels = sorted({r for a, b in sub.edges for r in g[a][b].get("relations", [])})[:8]
        out.append({"id": i, "size": len(members), "entities": top, "relations": labels,
                    "summary": f"About {', '.join(top[:5])}. {first}".strip(), "summary_by": "rules"})
    out.sort(key=lambda c: -c["size"])
    if generator is not None:
        for community in out[:SUMMARISED]:
            written = _model_summary(generator, community)
            if written:
                community["summary"], community["summary_by"] = written, "model"
    return out


def _model_summary(generator: Any, community: dict[str, Any]) -> str:
    """Two sentences by the model about a community, from its entities, relations and rule summary; "" when
    the model writes nothing usable."""
    from slmforge.generate import SamplingParams

    facts = "\n".join(community["relations"]) or "(none)"
    prompt = (f"Entities: {', '.join(community['entities'])}\nRelations:\n{facts}\nContext: {community['summary']}"
              "\n\nIn two sentences, say what this group of entities is about.")
    try:
        text = generator.chat([{"role": "user", "content": prompt}], SamplingParams(max_new_tokens=80))[0].text
    except Exception:  # a refusing engine leaves the rule summary
        return ""
    text = " ".join(text.split())
    return text if len(text) >= 20 else ""


def load_graph(folder: str | Path) -> Graph:
    """A graph saved by ``build_graph``.

    Raises:
        RagError: No graph in the folder.
    """
    import networkx as nx

    from slmforge.errors import RagError

    folder = Path(folder)
    if not (folder / "graph.json").is_file():
        raise RagError(f"No knowledge graph at {folder}: build it with `slmforge graph build`.")
    g = nx.node_link_graph(json.loads((folder / "graph.json").read_text()), edges="edges")
    return Graph(g, json.loads((folder / "communities.json").read_text()))


def graph_retrieve(graph: Graph, index: Any, question: str, mode: str = "hybrid", k: int = 5) -> list[dict[str, Any]]:
    """Chunks (or, for ``global``, community summaries) for the question, best first: dicts with
    ``id``, ``text``, ``source`` (chunks) and ``why`` (the entities or path that found them)."""
    import networkx as nx

    from slmforge.errors import RagError
    from slmforge.rag.retrieve import retrieve, rrf

    if mode not in ("local", "multihop", "global", "hybrid"):
        raise RagError(f"Unknown graph mode {mode!r}; choose local, multihop, global or hybrid.")
    g = graph.graph
    if mode == "global":
        words = set(re.findall(r"\w+", question.lower()))
        ranked = sorted(graph.communities, key=lambda c: -len(words & set(re.findall(r"\w+", c["summary"].lower()))))
        return [{"id": f"community-{c['id']}", "text": c["summary"], "source": "", "why": c["entities"][:5]}
                for c in ranked[:k]]
    named = graph.entities_in(question)
    found: dict[str, list[str]] = {}  # chunk id -> why
    if len(named) >= 2:
        for i, a in enumerate(named):
            for b in named[i + 1:]:
                if nx.has_path(g, a, b):
                    path = nx.shortest_path(g, a, b)
                    for u, v in zip(path, path[1:]):
                        for cid in g[u][v]["chunks"]:
                            found.setdefault(cid, path)
    if mode in ("local", "hybrid") or not found:
        for n in named:
            for cid in g.nodes[n]["chunks"]:
                found.setdefault(cid, [n])
            if mode == "local":
                for nb in sorted(g[n], key=lambda x: -g[n][x]["weight"])[:5]:
                    for cid in g[n][nb]["chunks"]:
                        found.setdefault(cid, [n, nb])
    ranking = list(found)
    if mode == "hybrid":
        ranking = [c for c, _ in rrf([ranking, [h.id for h in retrieve(index, question, "hybrid", k * 2)]])]
    chunks = index.chunks(ranking[: k * 3])
    return [{"id": c, "text": chunks[c].text, "source": chunks[c].source, "why": found.get(c, ["vector"])}
            for c in ranking if c in chunks][:k]


_MAP_SCHEMA = {"type": "object", "properties": {"points": {"type": "string", "maxLength": 400},
                                                "score": {"enum": list(range(0, 101, 10))}},
               "required": ["points", "score"], "additionalProperties": False}


def global_answer(graph: Graph, index: Any, question: str, generator: Any, k: int = 8) -> dict[str, Any]:
    """Global search by map-reduce over community summaries (as Microsoft's GraphRAG does): the ``k``
    communities closest to the question (by the index's embedder) each give the points they hold for it with
    a helpfulness score (JSON, schema-constrained where the engine constrains); the helpful ones, best first,
    are reduced into one answer.

    Returns:
        ``{"answer", "partials": [{"community", "points", "score"}], "communities": [ids]}``; the answer is
        ``rag.NOT_IN_DOCUMENTS`` when no community helps (the reduce step is then skipped).
    """
    import numpy as np

    from slmforge.generate import SamplingParams, chat_json
    from slmforge.rag import NOT_IN_DOCUMENTS

    if not graph.communities:
        return {"answer": NOT_IN_DOCUMENTS, "partials": [], "communities": []}
    vectors = index.embedder.embed([question] + [c["summary"] for c in graph.communities])
    order = np.argsort(-(vectors[1:] @ vectors[0]))[:k]
    chosen = [graph.communities[int(i)] for i in order]
    partials = []
    for c in chosen:
        messages = [{"role": "user", "content": f"Summary of a group of documents:\n{c['summary']}\nEntities: "
                     f"{', '.join(c['entities'])}\n\nQuestion: {question}\n\nWrite the points of this summary that "
                     'help answer the question, and how much they help (0-100), as JSON {"points": "...", "score": N}.'}]
        params = SamplingParams(max_new_tokens=120)
        try:
            text = chat_json(generator, messages, params, _MAP_SCHEMA)[0].text
            value = json.loads(text[text.index("{"): text.rindex("}") + 1])
            score = int(value.get("score", 0))
            points = str(value.get("points", "")).strip()
        except Exception:  # an unparsable map reply counts as no help, as GraphRAG drops it
            continue
        if score > 0 and points:
            partials.append({"community": c["id"], "points": points, "score": score})
    partials.sort(key=lambda p: -p["score"])
    if not partials:
        return {"answer": NOT_IN_DOCUMENTS, "partials": [], "communities": [c["id"] for c in chosen]}
    notes = "\n".join(f"- ({p['score']}) {p['points']}" for p in partials)
    reduce = [{"role": "user", "content": f"Notes from summaries of the documents, most helpful first:\n{notes}\n\n"
               f"Using only these notes, answer: {question}"}]
    answer = generator.chat(reduce, SamplingParams(max_new_tokens=200))[0].text.strip()
    return {"answer": answer, "partials": partials, "communities": [c["id"] for c in chosen]}


def multihop_questions(graph: Graph, index: Any, n: int = 100, seed: int = 0) -> list[dict[str, Any]]:
    """Questions whose answer needs two documents: for a bridge entity found in two documents, name one
    entity found only in the first and one found only in the second ("How is X connected to Y?")."""
    import random

    g = graph.graph
    doc_of = {cid: c.doc_id for cid, c in index.chunks(index.filtered_ids({})).items()}

    def docs(node: str) -> set[str]:
        return {doc_of[c] for c in g.nodes[node]["chunks"] if c in doc_of}

    rng = random.Random(seed)
    bridges = sorted(n for n in g.nodes if len(docs(n)) >= 2)
    rng.shuffle(bridges)
    out, seen = [], set()
    for b in bridges:
        ds = sorted(docs(b))
        d1, d2 = rng.sample(ds, 2)
        only1 = sorted(x for x in g[b] if docs(x) == {d1})
        only2 = sorted(x for x in g[b] if docs(x) == {d2})
        if not only1 or not only2 or (d1, d2) in seen:
            continue
        seen.add((d1, d2))
        x1, x2 = rng.choice(only1), rng.choice(only2)
        name1, name2 = g.nodes[x1]["names"][0], g.nodes[x2]["names"][0]
        out.append({"question": f"How is {name1} connected to {name2}?", "docs": [d1, d2], "bridge": b})
        if len(out) == n:
            break
    return out


def compare_multihop(graph: Graph, index: Any, questions: list[dict[str, Any]], k: int = 5) -> list[dict[str, Any]]:
    """Per retrieval: the share of questions with both documents in the top ``k`` chunks, and the mean
    share of the two documents found: vector (the index's hybrid), graph multihop, graph hybrid
    (``graphrag.evaluate.compare_linked`` without answers)."""
    from slmforge.graphrag.evaluate import compare_linked

    return list(compare_linked(graph, index, questions, None, k, progress=False)["rows"])
