"""``slmforge ui``: a local web dashboard over a project's artifacts, runs and models.

Runs (every artifact with kind, status, size, headline metrics and integrity; the lineage graph), detail
views (interactive loss and metric charts, evaluation rows wrong-first, dropped documents by reason),
comparisons (the paired A/B of ``eval compare``, started from the page; metric deltas of any two
artifacts), runs started and cancelled from the page with live progress (the CLI's own progress bars,
recorded by the run's process), and a chat playground over the server's models.

It is a router mounted by ``slmforge.serve.create_app(ui=...)`` under ``/ui``, behind the server's API
keys when keys are on (a login page turns a key into a cookie). Pages are rendered on the server (Jinja2);
the only JavaScript besides ours is Plotly, served from the ``plotly`` package: nothing is fetched from the
internet, and there is no build step. Needs ``pip install slmforge[ui]``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slmforge.errors import ConfigError

__all__ = ["UiSettings", "project", "ui_router"]


@dataclass
class UiSettings:
    """What the dashboard needs from the server that mounts it.

    Attributes:
        projects: The project files it shows (``project(path, overrides)`` each).
        authenticate: Checks an API key (None: the server has no keys and the dashboard is open).
        render_prompt: ``(model, messages) -> prompt`` as the model's chat template renders it.
        server_info: ``() -> dict`` of what chat requests may name: knowledge bases, strategies, tools.
    """

    projects: list[Any]
    authenticate: Callable[[str], bool] | None = None
    render_prompt: Callable[[str, list[dict[str, Any]]], str] | None = None
    server_info: Callable[[], dict[str, Any]] = field(default=lambda: {})


def project(config_path: str | Path | None, overrides: list[str] | None = None) -> Any:
    """A project for ``UiSettings.projects``: its file (None: ./slmforge.yaml or the defaults) and the ``--set``
    overrides its runs are started with.

    Raises:
        ConfigError: The project file does not load.
    """
    from slmforge.config import load_config
    from slmforge.ui._scan import Project

    load_config(config_path, overrides or [])  # fail now, with the key and line, not on the first page view
    path = Path(config_path).resolve() if config_path else None
    return Project("p0", path, list(overrides or []))  # its key is its place in UiSettings.projects


def ui_router(settings: UiSettings) -> Any:
    """The dashboard's routes (an ``APIRouter`` with prefix ``/ui``).

    Raises:
        ConfigError: jinja2 or plotly is missing (``pip install slmforge[ui]``), or no project.
    """
    try:
        import jinja2  # noqa: F401
        import plotly  # noqa: F401
    except ImportError as exc:
        raise ConfigError(f"The dashboard needs {exc.name}: pip install slmforge[ui]") from None
    if not settings.projects:
        raise ConfigError("The dashboard needs at least one project file (-c slmforge.yaml).")
    for i, p in enumerate(settings.projects):
        p.key = f"p{i}"
    from slmforge.ui._routes import build_router

    return build_router(settings)
