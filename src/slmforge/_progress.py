"""Progress bars for long work (rich, on stderr). Private: stages use it, users see it."""

from __future__ import annotations

import os
import sys

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


def progress_bar(enabled: bool = True) -> Progress:
    """A rich Progress on stderr with count, elapsed time and ETA.

    Disabled (no output at all) when ``enabled`` is false or SLMFORGE_NO_PROGRESS is set.
    """
    disable = (not enabled) or bool(os.environ.get("SLMFORGE_NO_PROGRESS"))
    return Progress(
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        console=Console(file=sys.stderr),
        disable=disable,
        transient=False,
    )
