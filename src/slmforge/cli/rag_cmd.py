"""``slmforge rag``: index documents, ask questions with cited answers, evaluate retrieval."""

from __future__ import annotations

import typer

rag_app = typer.Typer(help="Retrieval-augmented generation over your documents: index, query, eval.", no_args_is_help=True)
