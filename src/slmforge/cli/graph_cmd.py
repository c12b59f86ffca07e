"""``slmforge graph``: a knowledge graph over the project's rag index, and graph retrieval."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from slmforge.cli._options import ConfigOpt, SetOpt, out

graph_app = typer.Typer(help="Graph RAG over the rag index: build the entity graph, query it.", no_args_is_help=True)


def _folder(cfg) -> Path:
    from slmforge.rag import index_folder

    return index_folder(cfg) / "graph"


@graph_app.command("build")
def build_cmd(config: ConfigOpt = None, set_: SetOpt = None,
              model: Annotated[str | None, typer.Option("--model", "-m", help="Also let this model extract "
                               "entities (any engine); default: the deterministic extractor alone.")] = None) -> None:
    """Extract entities from every chunk of the index (cached per chunk), link them, find communities."""
    from slmforge.config import load_config
    from slmforge.graphrag import build_graph
    from slmforge.rag import open_index

    cfg = load_config(config, set_ or [])
    gen = None
    if model:
        from slmforge.generate import load_generator

        gen = load_generator(model, endpoints=cfg.generate.endpoints)
    graph = build_graph(open_index(cfg), _folder(cfg), gen)
    g = graph.graph
    out.print(f"{_folder(cfg)}: {g.number_of_nodes()} entities, {g.number_of_edges()} relations, "
              f"{len(graph.communities)} communities ({graph.extracted} chunks extracted, the rest cached)")


@graph_app.command("query")
def query_cmd(question: Annotated[str, typer.Argument(help="The question.")], config: ConfigOpt = None,
              set_: SetOpt = None,
              mode: Annotated[str, typer.Option(help="local, multihop, global or hybrid.")] = "hybrid",
              k: Annotated[int, typer.Option("--k", "-k", min=1)] = 5,
              model: Annotated[str | None, typer.Option("--model", "-m", help="With --mode global: answer by "
                                                        "map-reduce over community summaries with this model.")
                               ] = None) -> None:
    """The chunks (or community summaries) the graph finds for a question, as JSON, with why; with --mode
    global and --model, the map-reduce answer and its partial answers."""
    from slmforge.config import load_config
    from slmforge.graphrag import global_answer, graph_retrieve, load_graph
    from slmforge.rag import open_index

    cfg = load_config(config, set_ or [])
    if mode == "global" and model:
        from slmforge.cli.generate_cmd import load_model

        gen = load_model(model, None, "auto", cfg.generate.endpoints)
        result = global_answer(load_graph(_folder(cfg)), open_index(cfg), question, gen, k)
        out.print(json.dumps(result, indent=1, ensure_ascii=False))
        return
    rows = graph_retrieve(load_graph(_folder(cfg)), open_index(cfg), question, mode, k)
    out.print(json.dumps(rows, indent=1, ensure_ascii=False))


@graph_app.command("eval")
def eval_cmd(config: ConfigOpt = None, set_: SetOpt = None,
             questions: Annotated[int, typer.Option(min=1, help="Multi-hop questions built from the graph.")] = 100,
             k: Annotated[int, typer.Option("--k", "-k", min=1)] = 5) -> None:
    """Vector vs Graph vs hybrid retrieval on questions whose answer needs two documents."""
    from rich.table import Table

    from slmforge.config import load_config
    from slmforge.graphrag import compare_multihop, load_graph, multihop_questions
    from slmforge.rag import open_index

    cfg = load_config(config, set_ or [])
    graph, index = load_graph(_folder(cfg)), open_index(cfg)
    qs = multihop_questions(graph, index, questions)
    rows = compare_multihop(graph, index, qs, k) if qs else []
    table = Table(title=f"{len(qs)} two-document questions")
    for col in ("retrieval", f"both documents in top {k}", f"recall@{k} (documents)"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["retrieval"], f"{r[f'both@{k}']:.3f}", f"{r[f'recall@{k}']:.3f}")
    out.print(table)
    (_folder(cfg) / "multihop.json").write_text(json.dumps({"questions": qs, "rows": rows}, indent=1))
