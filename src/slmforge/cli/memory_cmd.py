"""``slmforge memory``: what the server and your applications remember about each user."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from slmforge.cli._options import ConfigOpt, SetOpt, out

memory_app = typer.Typer(help="Per-user memory: add, search, list, forget, erase, export.", no_args_is_help=True)

UserOpt = Annotated[str | None, typer.Option("--user", "-u", help="The user (the API key's name in the server).")]
OrgOpt = Annotated[bool, typer.Option("--org", help="The organisation-wide scope, shared by every user.")]


def _open(config: Path | None, set_: list[str] | None, user: str | None, org: bool):
    from slmforge.config import load_config
    from slmforge.errors import ConfigError
    from slmforge.memory import Scope, open_store

    if org == (user is not None):
        raise ConfigError("Name exactly one scope: --user NAME, or --org for the organisation's memories.")
    cfg = load_config(config, set_ or [])
    return open_store(cfg), (Scope.org() if org else Scope.user(str(user)))


@memory_app.command("add")
def add_cmd(text: Annotated[str, typer.Argument(help="What to remember, or a user message to extract facts from.")],
            user: UserOpt = None, org: OrgOpt = False, config: ConfigOpt = None, set_: SetOpt = None,
            kind: Annotated[str, typer.Option(help="fact, preference or note; 'extract' reads a message.")] = "extract",
            importance: Annotated[float, typer.Option(min=0.0, max=1.0)] = 0.5) -> None:
    """Remember something (a statement as is, or the facts a message states)."""
    from slmforge.memory import remember_conversation

    store, scope = _open(config, set_, user, org)
    if kind == "extract":
        ids = remember_conversation(store, scope, [{"role": "user", "content": text}])
        if not ids:
            ids = [store.remember(scope, text, "note", importance)]
    else:
        ids = [store.remember(scope, text, kind, importance)]
    out.print(json.dumps({"ids": ids}))


@memory_app.command("search")
def search_cmd(query: Annotated[str, typer.Argument(help="What to look for.")], user: UserOpt = None,
               org: OrgOpt = False, config: ConfigOpt = None, set_: SetOpt = None,
               k: Annotated[int, typer.Option("--k", "-k", min=1)] = 5) -> None:
    """The memories most relevant to a query (relevance x recency x importance)."""
    store, scope = _open(config, set_, user, org)
    out.print(json.dumps([m.as_dict() for m in store.recall(scope, query, k)], indent=1))


@memory_app.command("list")
def list_cmd(user: UserOpt = None, org: OrgOpt = False, config: ConfigOpt = None, set_: SetOpt = None,
             history: Annotated[bool, typer.Option(help="Include memories a newer one replaced.")] = False) -> None:
    """Every memory of a scope."""
    store, scope = _open(config, set_, user, org)
    out.print(json.dumps([m.as_dict() for m in store.list(scope, history)], indent=1))


@memory_app.command("forget")
def forget_cmd(memory_id: Annotated[int, typer.Argument(help="The memory's id.")], user: UserOpt = None,
               org: OrgOpt = False, config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Delete one memory of the scope."""
    from slmforge.errors import ConfigError

    store, scope = _open(config, set_, user, org)
    if not store.forget(scope, memory_id):
        raise ConfigError(f"No memory {memory_id} in this scope; `slmforge memory list` shows the ids.")
    out.print(f"forgot {memory_id}")


@memory_app.command("erase")
def erase_cmd(user: UserOpt = None, org: OrgOpt = False, config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Delete everything of a scope (memories and sessions) from the memory file."""
    store, scope = _open(config, set_, user, org)
    out.print(f"erased {store.erase(scope)} rows of {scope.kind} {scope.owner}")


@memory_app.command("export")
def export_cmd(user: UserOpt = None, org: OrgOpt = False, config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Everything held about a scope, as JSON."""
    store, scope = _open(config, set_, user, org)
    out.print(json.dumps(store.export(scope), indent=1, ensure_ascii=False))
