"""``slmforge graph``: a knowledge graph over the project's rag index, and graph retrieval."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from slmforge.cli._options import ConfigOpt, SetOpt, out

if TYPE_CHECKING:
    from slmforge.config import ProjectConfig
    from slmforge.graphrag import Graph
    from slmforge.rag import Index

graph_app = typer.Typer(help="Graph RAG over the rag index: build the entity graph, query it.", no_args_is_help=True)


def _folder(cfg: ProjectConfig) -> Path:
    from slmforge.rag import index_folder

    return Path(index_folder(cfg)) / "graph"


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
             questions: Annotated[int, typer.Option(min=1, help="Two-document questions.")] = 100,
             k: Annotated[int, typer.Option("--k", "-k", min=1)] = 5,
             teacher: Annotated[str | None, typer.Option("--teacher", help="A model (.gguf, folder or endpoint) that "
                                "writes the questions and reference answers from two documents the corpus links "
                                "(not from the graph); default: questions built from the graph's entities.")] = None,
             model: Annotated[str | None, typer.Option("--model", "-m", help="With --teacher: answer each question "
                              "from each retrieval's chunks with this model and score the answers.")] = None,
             max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1)] = 64) -> None:
    """Vector vs Graph vs hybrid retrieval on questions whose answer needs two documents."""
    from slmforge.config import load_config
    from slmforge.graphrag import compare_multihop, load_graph, multihop_questions
    from slmforge.rag import open_index

    cfg = load_config(config, set_ or [])
    graph, index = load_graph(_folder(cfg)), open_index(cfg)
    if teacher:
        _eval_linked(cfg, graph, index, questions, k, teacher, model, max_new_tokens)
        return
    qs = multihop_questions(graph, index, questions)
    rows = compare_multihop(graph, index, qs, k) if qs else []
    _print_rows(f"{len(qs)} two-document questions (from the graph)", rows, k)
    (_folder(cfg) / "multihop.json").write_text(json.dumps({"questions": qs, "rows": rows}, indent=1))


def _print_rows(title: str, rows: list[dict[str, Any]], k: int) -> None:
    from rich.table import Table

    table = Table(title=title)
    answers = bool(rows) and "token_f1" in rows[0]
    cols = ["retrieval", f"both documents in top {k}", f"recall@{k} (documents)"]
    for col in cols + (["token F1", "ROUGE-L", "vs vector (token F1)"] if answers else []):
        table.add_column(col)
    for r in rows:
        cells = [r["retrieval"], f"{r[f'both@{k}']:.3f}", f"{r[f'recall@{k}']:.3f}"]
        if answers:
            versus = (f"{r['diff']:+.4f} [{r['ci'][0]:+.4f}, {r['ci'][1]:+.4f}] p={r['p_value']:.4f}"
                      if "diff" in r else "")
            cells += [f"{r['token_f1']:.4f}", f"{r['rougeL']:.4f}", versus]
        table.add_row(*cells)
    out.print(table)


def _eval_linked(cfg: ProjectConfig, graph: Graph, index: Index, n: int, k: int, teacher: str, model: str | None,
                 max_new_tokens: int) -> None:
    from slmforge.cli._options import err
    from slmforge.data import read_documents
    from slmforge.generate import load_generator
    from slmforge.graphrag.evaluate import compare_linked
    from slmforge.rag.questions import linked_questions

    docs, _, _ = read_documents(cfg, cfg.rag.sources)
    made = linked_questions(docs, load_generator(teacher, endpoints=cfg.generate.endpoints), teacher, n,
                            cache=_folder(cfg) / "questions-teacher.jsonl")
    err.print(f"teacher questions: {json.dumps(made.report())}", style="dim")
    gen = load_generator(model, endpoints=cfg.generate.endpoints) if model else None
    result = compare_linked(graph, index, made.questions, gen, k, max_new_tokens)
    _print_rows(f"{len(made.questions)} two-document questions (by {Path(teacher).name}, from linked documents)",
                result["rows"], k)
    target = _folder(cfg) / "linked.json"
    target.write_text(json.dumps({"teacher": made.report(), "questions": made.questions, **result}, indent=1))
    err.print(f"wrote {target}", style="dim")
