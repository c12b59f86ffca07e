"""Progress bars for long work (rich, on stderr). Private: stages use it, users see it.

With ``SLMFORGE_PROGRESS_FILE`` set, every bar also appends its state to that file as JSON lines
(``{"task", "completed", "total", "info", "done", "t"}``, at most about two a second per bar, and always
its last): how the dashboard follows a run it started in another process with the same bars the CLI shows.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

PROGRESS_FILE = "SLMFORGE_PROGRESS_FILE"


class _RecordedProgress(Progress):
    """A Progress that also writes its tasks' states to a JSON-lines file (see the module docstring)."""

    def __init__(self, *columns: Any, record_to: str, **kwargs: Any) -> None:
        super().__init__(*columns, **kwargs)
        self._record_to = record_to
        self._last: dict[TaskID, float] = {}

    def _record(self, task_id: TaskID, force: bool = False) -> None:
        now = time.monotonic()
        task = self._tasks.get(task_id)
        if task is None:
            return
        done = task.total is not None and task.completed >= task.total
        if not (force or done) and now - self._last.get(task_id, 0.0) < 0.5:
            return
        self._last[task_id] = now
        line = {"task": task.description, "completed": task.completed, "total": task.total,
                "info": str(task.fields.get("info", "")), "done": done, "t": time.time()}
        try:
            with open(self._record_to, "a", encoding="utf-8") as f:
                f.write(json.dumps(line) + "\n")
        except OSError:  # following a run is a convenience: never fail the work over it
            pass

    def add_task(self, description: str, *args: Any, **kwargs: Any) -> TaskID:
        task_id = super().add_task(description, *args, **kwargs)
        self._record(task_id, force=True)
        return task_id

    def update(self, task_id: TaskID, *args: Any, **kwargs: Any) -> None:
        super().update(task_id, *args, **kwargs)
        self._record(task_id)

    def advance(self, task_id: TaskID, advance: float = 1) -> None:
        super().advance(task_id, advance)
        self._record(task_id)

    def stop(self) -> None:
        for task_id in list(self._tasks):
            self._record(task_id, force=True)
        super().stop()


def progress_bar(enabled: bool = True) -> Progress:
    """A rich Progress on stderr with count, elapsed time and ETA.

    Disabled (no output at all) when ``enabled`` is false or SLMFORGE_NO_PROGRESS is set; recorded to
    ``SLMFORGE_PROGRESS_FILE`` when that is set (even when disabled on the terminal).
    """
    disable = (not enabled) or bool(os.environ.get("SLMFORGE_NO_PROGRESS"))
    columns = (
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
    )
    options: dict[str, Any] = {"console": Console(file=sys.stderr), "disable": disable, "transient": False}
    record_to = os.environ.get(PROGRESS_FILE)
    if record_to:
        return _RecordedProgress(*columns, record_to=record_to, **options)
    return Progress(*columns, **options)
