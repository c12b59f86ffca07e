"""A ``slmforge serve`` subprocess to load-test: started on a free port, awaited until ready, stopped.

Private to ``slmforge.serve``; ``serve.bench`` re-exports ``free_port``, ``ServerProcess`` and ``start_server``.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now (another process may still take it before it is bound)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """A ``slmforge serve`` subprocess; a context manager that stops it on exit.

    Attributes:
        base_url: ``http://127.0.0.1:PORT``.
        log_path: The file the server's stdout and stderr go to.
    """

    def __init__(self, proc: subprocess.Popen, base_url: str, log_path: Path) -> None:
        self.proc, self.base_url, self.log_path = proc, base_url, log_path

    def log_tail(self, chars: int = 2000) -> str:
        """The end of the server's output."""
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")[-chars:]
        except OSError:
            return ""

    def remove_log(self) -> None:
        """Delete the log file (call after a clean run; keep it to diagnose errors)."""
        self.log_path.unlink(missing_ok=True)

    def stop(self, timeout_s: float = 15.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout_s``. Returns the exit code (None if it could not be reaped)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                try:
                    self.proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    return None
        return self.proc.returncode

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_server(
    models: str | Path | Sequence[str | Path],
    port: int | None = None,
    max_batch_size: int | None = None,
    extra_args: Sequence[str] = (),
    ready_timeout_s: float = 180.0,
    log_path: str | Path | None = None,
    env: dict[str, str] | None = None,
) -> ServerProcess:
    """Start ``slmforge serve MODEL... --port P [--max-batch-size N]`` and wait until GET /ready answers 200.

    The server runs with this interpreter (``python -m slmforge.cli.main``), on 127.0.0.1, without
    authentication. Its output goes to ``log_path`` (a temporary file by default).

    Args:
        models: Model folders (or NAME=PATH), as ``slmforge serve`` takes them.
        port: TCP port; None picks a free one.
        max_batch_size: Passed as ``--max-batch-size`` when given (None: the server's default).
        extra_args: More ``slmforge serve`` options, e.g. ``["--device", "cpu"]``.
        ready_timeout_s: Seconds to wait for the models to load.
        log_path: Where the server's output goes.
        env: The environment of the server (default: this process's).

    Returns:
        The running server; use it as a context manager, or call ``stop()``.

    Raises:
        BenchError: The server exited or was not ready within ``ready_timeout_s``; the message
            holds the end of its output.
    """
    import httpx

    from slmforge.serve.bench import BenchError  # which re-exports this module: imported when needed

    refs = [str(models)] if isinstance(models, (str, Path)) else [str(m) for m in models]
    port = free_port() if port is None else port
    cmd = [sys.executable, "-m", "slmforge.cli.main", "serve", *refs, "--port", str(port), *extra_args]
    if max_batch_size is not None:
        cmd += ["--max-batch-size", str(max_batch_size)]
    if log_path is None:
        fd, name = tempfile.mkstemp(prefix="slmforge-serve-", suffix=".log")
        os.close(fd)
        log_path = name
    log_path = Path(log_path)
    with log_path.open("wb") as log:  # the child keeps its own descriptor
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    server = ServerProcess(proc, f"http://127.0.0.1:{port}", log_path)
    deadline = time.monotonic() + ready_timeout_s
    while True:
        if proc.poll() is not None:
            raise BenchError(f"`{' '.join(cmd[3:])}` exited with code {proc.returncode} before it was ready:\n"
                             f"{server.log_tail()}\n(log: {log_path})")
        try:
            if httpx.get(f"{server.base_url}/ready", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            server.stop()
            raise BenchError(f"`{' '.join(cmd[3:])}` was not ready after {ready_timeout_s:g} s:\n{server.log_tail()}")
        time.sleep(0.2)
