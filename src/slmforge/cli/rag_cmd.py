"""``slmforge rag``: index documents, ask questions with cited answers, evaluate retrieval."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from slmforge.cli._options import ConfigOpt, SetOpt, err, out

rag_app = typer.Typer(help="Retrieval-augmented generation over your documents: index, query, eval.", no_args_is_help=True)

SourceOpt = Annotated[
    list[str] | None,
    typer.Option("--source", "-s", help="A file or folder to index (repeatable; default rag.sources, else data.sources)."),
]
StoreOpt = Annotated[str | None, typer.Option(help="Vector store: lancedb, qdrant, faiss or chroma (default rag.store).")]
ModeOpt = Annotated[str | None, typer.Option(help="Retrieval: dense, bm25 or hybrid (default rag.mode).")]
KOpt = Annotated[int | None, typer.Option("--k", "-k", min=1, help="Chunks to retrieve (default rag.top_k).")]
WhereOpt = Annotated[
    list[str] | None,
    typer.Option("--where", help="Metadata filter FIELD=VALUE on source (globs allowed), kind, title or doc_id "
                 "(repeatable; the same field twice means either value)."),
]
TeacherOpt = Annotated[
    str | None,
    typer.Option("--teacher", help="A model (.gguf, folder, or http(s)://HOST/v1#MODEL endpoint) that writes the "
                 "questions instead of the templates; its replies are cached beside the results."),
]


def _config(config: Path | None, set_: list[str] | None, **rag: object):
    from slmforge.config import load_config

    cfg = load_config(config, set_ or [])
    given = {k: v for k, v in rag.items() if v is not None}
    if given:
        cfg = cfg.model_copy(update={"rag": cfg.rag.model_copy(update=given)})
    spec = cfg.rag.embedder
    if spec is None or not spec.startswith(("hashing", "http://", "https://")):  # a model will load
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # a weights bar for an embedder that loads in a second is noise
    return cfg


def _where(items: list[str] | None) -> dict[str, object] | None:
    from slmforge.errors import ConfigError

    if not items:
        return None
    out_: dict[str, object] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--where {item!r}: write FIELD=VALUE, e.g. --where 'source=docs/*.md'.")
        key, value = item.split("=", 1)
        prev = out_.get(key)
        out_[key] = value if prev is None else [*(prev if isinstance(prev, list) else [prev]), value]
    return out_


@rag_app.command("index")
def index_cmd(config: ConfigOpt = None, set_: SetOpt = None, source: SourceOpt = None, store: StoreOpt = None,
              full: Annotated[bool, typer.Option(help="Also delete indexed documents no longer in the sources "
                                                 "(default: yes).")] = True) -> None:
    """Index the sources: read and clean them as the data stage does, chunk, embed what changed, commit."""
    from slmforge.data import read_documents
    from slmforge.rag import chunk_settings, open_index

    cfg = _config(config, set_, store=store)
    docs, skipped, dropped = read_documents(cfg, source or cfg.rag.sources)
    index = open_index(cfg, create=True)
    stats = index.update(docs, chunk_settings(cfg), delete_missing=full)
    s = stats.as_dict()
    err.print(f"skipped {len(skipped)} inputs, dropped {sum(dropped.values())} documents ({dict(dropped)})", style="dim")
    out.print(f"{index.folder}: {s['chunks']} chunks of {index.documents()} documents in {index.store_kind} "
              f"({s['added']} added, {s['changed']} changed, {s['unchanged']} unchanged, {s['deleted']} deleted; "
              f"{s['embedded']} chunks embedded)")
    index.close()


@rag_app.command("query")
def query_cmd(
    question: Annotated[str, typer.Argument(help="The question.")],
    config: ConfigOpt = None, set_: SetOpt = None, mode: ModeOpt = None, k: KOpt = None, where: WhereOpt = None,
    model: Annotated[str | None, typer.Option("--model", "-m", help="Model to answer with: a folder, .gguf, ONNX "
                     "export or endpoint (default: the project's sft output, else train).")] = None,
    retrieve_only: Annotated[bool, typer.Option("--retrieve-only", help="Print the chunks, generate nothing.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object: answer, sources, citations.")] = False,
) -> None:
    """Answer a question from the index, citing its sources, or say it is not in the documents."""
    from slmforge.rag import answer, open_index, retrieve

    cfg = _config(config, set_, mode=mode, top_k=k)
    r = cfg.rag
    index = open_index(cfg)
    if retrieve_only:
        hits = retrieve(index, question, r.mode, r.top_k, _where(where), r.mmr, r.rerank, r.reranker)
        rows = [{"id": h.id, "score": round(h.score, 4), "dense": round(h.dense, 4), "source": h.chunk.source,
                 "start": h.chunk.start, "end": h.chunk.end, "text": h.chunk.text} for h in hits]
        if as_json:
            out.print(json.dumps(rows, ensure_ascii=False))
        for i, row in enumerate([] if as_json else rows, start=1):
            out.print(f"[{i}] {row['source']}:{row['start']}-{row['end']} (score {row['score']}, cosine {row['dense']})")
            out.print("    " + str(row["text"])[:300].replace("\n", "\n    "))
        return
    from slmforge.artifacts import default_model
    from slmforge.generate import load_generator

    model_ref = model or str(default_model(cfg, "answer with", "pass --model"))
    gen = load_generator(model_ref, endpoints=cfg.generate.endpoints)
    reply = answer(index, gen, question, r.mode, r.top_k, _where(where), r.mmr, r.rerank, r.reranker,
                   r.min_score, r.max_new_tokens)
    out.print(json.dumps(reply.as_dict(), ensure_ascii=False) if as_json else reply.render())


def _recorded_index(config: Path | None, set_: list[str] | None):
    from slmforge.errors import RagError
    from slmforge.rag import index_folder
    from slmforge.rag.index import open_recorded

    cfg = _config(config, set_)
    index = open_recorded(index_folder(cfg), cfg.rag.store_url)
    if index is None:
        raise RagError(f"No knowledge index at {index_folder(cfg)}: build it with `slmforge rag index`.")
    return index


@rag_app.command("info")
def info_cmd(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """What the index holds: documents, chunks, embedder, store, chunking (the model is not loaded)."""
    index = _recorded_index(config, set_)
    out.print(json.dumps({"folder": str(index.folder), "documents": index.documents(), "chunks": index.count(),
                          "store": index.store_kind, "store_vectors": index.store.count(),
                          "embedder": index.meta("embedder"), "chunking": json.loads(index.meta("chunking", "{}")),
                          "version": index.version}, indent=2))


@rag_app.command("migrate")
def migrate_cmd(to: Annotated[str, typer.Option("--to", help="The store to move to: lancedb, qdrant, faiss, chroma.")],
                config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Move the index's vectors to another store (rebuilt from the catalog, nothing re-embedded)."""
    index = _recorded_index(config, set_)
    current = index.store_kind
    index.migrate(to)
    out.print(f"{index.folder}: {index.store.count()} vectors moved from {current} to {to}; set rag.store: {to}")


def _paired_table(tests: list[dict[str, Any]], n: int) -> Any:
    """The modes of each chunker compared pairwise: difference, 95% interval, p-value and verdict per metric."""
    from rich.table import Table

    metrics = [m for m in tests[0] if m not in ("chunker", "baseline", "candidate")]
    table = Table(title=f"Paired over the same {n} questions (candidate - baseline; McNemar's test for recall, "
                  "permutation for MRR)")
    for col in ["chunker", "candidate - baseline", *metrics]:
        table.add_column(col, justify="left" if col in ("chunker", "candidate - baseline") else "right")
    for t in tests:
        cells = [f"{t[m]['diff']:+.3f} [{t[m]['ci_low']:+.3f}, {t[m]['ci_high']:+.3f}] p={t[m]['p_value']:.3g}"
                 + ("" if t[m]["verdict"].startswith("no ") else f" {t[m]['verdict']}") for m in metrics]
        table.add_row(t["chunker"], f"{t['candidate']} - {t['baseline']}", *cells)
    return table


@rag_app.command("eval")
def eval_cmd(
    config: ConfigOpt = None, set_: SetOpt = None, source: SourceOpt = None,
    chunkers: Annotated[str, typer.Option(help="Chunkers to compare, comma-separated.")] = "fixed,recursive,sentence,semantic",
    modes: Annotated[str, typer.Option(help="Retrieval modes to compare, comma-separated.")] = "dense,bm25,hybrid",
    questions: Annotated[int, typer.Option(min=1, help="Questions generated from the corpus.")] = 200,
    k: Annotated[int, typer.Option("--k", "-k", min=1, help="Depth of recall@k and nDCG@k.")] = 10,
    out_dir: Annotated[Path | None, typer.Option("--out", help="Where the table, per-question scores and plot go "
                       "(default <index>/eval).")] = None,
    teacher: TeacherOpt = None,
) -> None:
    """Compare chunkers and retrieval modes: recall@k, MRR, nDCG@k on questions made from the corpus
    (by the data stage's templates, which name the API; with --teacher, paraphrased by a model)."""
    from rich.table import Table

    from slmforge.data import read_documents
    from slmforge.rag import chunk_settings, index_folder, load_embedder
    from slmforge.rag.evaluate import compare, make_questions, paired, plot

    cfg = _config(config, set_)
    docs, _, _ = read_documents(cfg, source or cfg.rag.sources)
    folder = out_dir or (index_folder(cfg) / "eval")
    folder.mkdir(parents=True, exist_ok=True)
    made = None
    if teacher:
        from slmforge.generate import load_generator
        from slmforge.rag.questions import paraphrased_questions

        made = paraphrased_questions(docs, load_generator(teacher, endpoints=cfg.generate.endpoints), teacher,
                                     questions, cache=folder / "questions-teacher.jsonl")
        err.print(f"teacher questions: {json.dumps(made.report())}", style="dim")
    qs = made.questions if made else make_questions(docs, questions)
    emb = load_embedder(cfg.rag.embedder, cfg.rag.embedder_model, cfg.resolve)
    rows = compare(docs, qs, folder, emb, chunkers.split(","), modes.split(","), chunk_settings(cfg), cfg.rag.store, k)
    kind = "paraphrased by " + Path(teacher).name if teacher else "template"
    table = Table(title=f"{len(qs)} questions from {len(docs)} documents ({emb.name}; {kind})")
    metrics = list(rows[0].scores) if rows else []
    for col in ["chunker", "mode", "chunks", *metrics]:
        table.add_column(col, justify="left" if col in ("chunker", "mode") else "right")
    for r in rows:
        table.add_row(r.chunker, r.mode, str(r.chunks), *(f"{r.scores[m]:.3f}" for m in metrics))
    out.print(table)
    tests = paired(rows, [f"recall@{k}", "mrr"])
    if tests:
        out.print(_paired_table(tests, len(qs)))
    (folder / "results.json").write_text(json.dumps(
        {"questions": [vars(q) for q in qs], "embedder": emb.identity(), "question_set": kind,
         "teacher": made.report() if made else None, "paired": tests,
         "rows": [{"chunker": r.chunker, "mode": r.mode, "chunks": r.chunks, **r.scores,
                   "per_question": r.per_question} for r in rows]}, indent=1))
    if rows:
        png = plot(rows, folder / "retrieval.png", ["recall@1", "recall@5", "mrr"])
        err.print(f"wrote {folder / 'results.json'} and {png}", style="dim")


@rag_app.command("versus")
def versus_cmd(
    config: ConfigOpt = None, set_: SetOpt = None, source: SourceOpt = None,
    finetuned: Annotated[str | None, typer.Option(help="The fine-tuned model (default: the sft output).")] = None,
    pretrained: Annotated[str | None, typer.Option(help="The pretrained model (default: the train output).")] = None,
    questions: Annotated[int, typer.Option(min=1, help="Questions generated from the corpus.")] = 200,
    k: Annotated[int, typer.Option("--k", "-k", min=1, help="Sources per RAG answer.")] = 3,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1)] = 64,
) -> None:
    """RAG vs fine-tuning vs both: the same questions, token F1 and ROUGE-L, paired tests against fine-tuning."""
    from rich.table import Table

    from slmforge.artifacts import default_model, output_dir
    from slmforge.data import read_documents
    from slmforge.generate import load_generator
    from slmforge.rag import open_index
    from slmforge.rag.evaluate import make_questions
    from slmforge.rag.versus import compare_configurations

    cfg = _config(config, set_)
    index = open_index(cfg)
    docs, _, _ = read_documents(cfg, source or cfg.rag.sources)
    qs = make_questions(docs, questions)
    tuned = load_generator(finetuned or str(default_model(cfg, "compare", "pass --finetuned")), device="cpu")
    base = load_generator(pretrained or str(output_dir(cfg, "train")), device="cpu")
    rows = compare_configurations({"fine-tuned": (tuned, None), "pretrained + RAG": (base, index),
                                   "fine-tuned + RAG": (tuned, index)}, qs, "fine-tuned", k, max_new_tokens,
                                  cfg.rag.min_score)
    table = Table(title=f"{len(qs)} questions from {len(docs)} documents")
    for col in ("configuration", "token F1", "ROUGE-L", "vs fine-tuned (token F1)"):
        table.add_column(col)
    for r in rows:
        versus = (f"{r['diff']:+.4f} [{r['ci'][0]:+.4f}, {r['ci'][1]:+.4f}] p={r['p_value']:.4f} {r['vs fine-tuned']}"
                  if "diff" in r else "")
        table.add_row(r["configuration"], f"{r['token_f1']:.4f}", f"{r['rougeL']:.4f}", versus)
    out.print(table)
    target = index.folder / "eval" / "versus.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps({"questions": len(qs), "rows": rows}, indent=1))
    err.print(f"wrote {target}", style="dim")
