"""The dashboard (``slmforge.ui``) mounted under ``/ui``: behind the server's keys, over its models."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.responses import RedirectResponse

from slmforge.serve._state import ServerState, match_key


def mount_ui(app: FastAPI, state: ServerState, projects: list[Any]) -> None:
    """Include the dashboard's router, wired to this server's keys, chat templates and extensions."""
    from slmforge.ui import UiSettings, ui_router

    def authenticate(key: str) -> bool:
        return match_key(state.keys or [], key) is not None

    def render_prompt(model: str, messages: list[dict[str, Any]]) -> str | None:
        served = state.models.get(model)
        if served is None or served.generator is None:
            return None
        return served.render_chat(messages)

    def server_info() -> dict[str, Any]:
        from slmforge.agents.builtin import calculator
        from slmforge.reasoning import STRATEGIES

        return {"knowledge": sorted(state.knowledge), "tools": [calculator().openai()],
                "strategies": {k: v for k, v in STRATEGIES.items() if k != "auto"}}

    settings = UiSettings(projects, authenticate=authenticate if state.keys is not None else None,
                          render_prompt=render_prompt, server_info=server_info)
    app.include_router(ui_router(settings))

    @app.get("/", include_in_schema=False)
    async def root():
        return RedirectResponse("/ui/", 307)
