"""Runs the dashboard starts: each a detached process (its own session, so closing the page or stopping
the dashboard does not stop it) whose log, progress and exit status are files in ``<out_dir>/.jobs/<id>/``:

- ``job.json``: what runs (argv, title, when, the worker's pid);
- ``log.txt``: the command's stdout and stderr;
- ``progress.jsonl``: the progress bars' states (``slmforge._progress``, the bars the CLI shows);
- ``exit.json``: written by the worker when the command ends (``returncode``, ``cancelled``).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slmforge._progress import PROGRESS_FILE
from slmforge.artifacts import pid_alive
from slmforge.errors import ConfigError

JOBS = ".jobs"
_WORKERS: list[subprocess.Popen] = []  # reaped by list_jobs, so finished workers leave no zombies


@dataclass
class Job:
    id: str
    folder: Path
    spec: dict[str, Any]

    @property
    def title(self) -> str:
        return str(self.spec.get("title", ""))

    @property
    def kind(self) -> str:
        return str(self.spec.get("kind", "run"))

    def exit(self) -> dict[str, Any] | None:
        try:
            return json.loads((self.folder / "exit.json").read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return None

    @property
    def status(self) -> str:
        """``running``, ``succeeded``, ``failed``, ``cancelled``, or ``lost`` (the worker died unrecorded)."""
        ended = self.exit()
        if ended is None:
            pid = int(self.spec.get("pid", 0))
            return "running" if pid > 0 and pid_alive(pid) else "lost"
        if ended.get("cancelled"):
            return "cancelled"
        return "succeeded" if ended.get("returncode") == 0 else "failed"

    def log_size(self) -> int:
        try:
            return (self.folder / "log.txt").stat().st_size
        except OSError:
            return 0

    def log_tail(self, max_bytes: int = 20000) -> str:
        try:
            with (self.folder / "log.txt").open("rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - max_bytes))
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def progress(self) -> dict[str, dict[str, Any]]:
        """Each bar's latest state, by its description."""
        bars: dict[str, dict[str, Any]] = {}
        path = self.folder / "progress.jsonl"
        if path.is_file():
            for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line being written
                bars[str(row.get("task"))] = row
        return bars


def jobs_dir(out_dir: Path) -> Path:
    return out_dir / JOBS


def start(out_dir: Path, argv: list[str], title: str, kind: str, cwd: Path, result: str | None = None) -> Job:
    """Start ``slmforge ARGV`` detached, recorded under ``out_dir``; returns the job. ``result``: the
    artifact (relative to ``out_dir``) the job makes, for a link once it has succeeded.

    Raises:
        ConfigError: A pipeline run is already running in this project (two would write the same folders).
    """
    if kind == "run":
        busy = [j for j in list_jobs(out_dir) if j.kind == "run" and j.status == "running"]
        if busy:
            raise ConfigError(f"A run is already going in this project ({busy[0].title}, job {busy[0].id}); "
                              "wait for it or cancel it first: two runs would write the same stage folders.")
    job_id = time.strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)
    folder = jobs_dir(out_dir) / job_id
    folder.mkdir(parents=True)
    spec = {"id": job_id, "title": title, "kind": kind, "argv": [sys.executable, "-m", "slmforge", *argv],
            "cwd": str(cwd), "started": time.time(), "result": result}
    (folder / "job.json").write_text(json.dumps(spec, indent=2), encoding="utf-8")
    worker = subprocess.Popen([sys.executable, "-m", "slmforge.ui._worker", str(folder)], cwd=cwd,
                              start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    _WORKERS.append(worker)
    spec["pid"] = worker.pid
    (folder / "job.json").write_text(json.dumps(spec, indent=2), encoding="utf-8")
    return Job(job_id, folder, spec)


def list_jobs(out_dir: Path) -> list[Job]:
    """The project's jobs, newest first."""
    _WORKERS[:] = [w for w in _WORKERS if w.poll() is None]
    root = jobs_dir(out_dir)
    found = []
    for folder in sorted(root.iterdir(), reverse=True) if root.is_dir() else []:
        try:
            found.append(Job(folder.name, folder, json.loads((folder / "job.json").read_text(encoding="utf-8"))))
        except (OSError, json.JSONDecodeError):
            continue
    return found


def get(out_dir: Path, job_id: str) -> Job | None:
    return next((j for j in list_jobs(out_dir) if j.id == job_id), None)


def cancel(job: Job) -> None:
    """Interrupt the job as Ctrl-C would (training checkpoints and stops); a second cancel kills it."""
    pid = int(job.spec.get("pid", 0))
    if job.status != "running" or not pid:
        return
    marker = job.folder / "cancel"
    sig = signal.SIGKILL if marker.exists() else signal.SIGINT
    marker.write_text(str(time.time()), encoding="utf-8")
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass
    if sig == signal.SIGKILL and job.exit() is None:  # the worker died with its child: record it here
        (job.folder / "exit.json").write_text(json.dumps({"returncode": -9, "cancelled": True}), encoding="utf-8")


def environment(folder: Path) -> dict[str, str]:
    """The command's environment: the dashboard's, with progress recorded into the job folder."""
    return {**os.environ, PROGRESS_FILE: str(folder / "progress.jsonl"), "PYTHONUNBUFFERED": "1",
            "COLUMNS": "120", "NO_COLOR": "1"}
