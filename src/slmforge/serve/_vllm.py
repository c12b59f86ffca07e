"""The ``vllm`` engine: a managed ``vllm serve`` process on 127.0.0.1, reached through an ``Upstream``.

Private to ``slmforge.serve``; ``serve._upstream`` re-exports ``VllmServer`` and ``VLLM_ENV``
(see its docstring for the whole forwarding picture).
"""

from __future__ import annotations

import collections
import json
import logging
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

from slmforge.errors import ConfigError, ModelError

if TYPE_CHECKING:
    from slmforge.config import ServeModelConfig
    from slmforge.serve._upstream import Upstream

VLLM_ENV = "SLMFORGE_VLLM"  # overrides the `vllm` command, e.g. "/opt/vllm-env/bin/vllm"
_LOG = logging.getLogger("slmforge.serve.vllm")
_LOG_TAIL_LINES = 40
# vLLM accepts only these LoRA ranks for --max-lora-rank (vllm/config/lora.py, MaxLoRARanks).
_VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
_VLLM_DEFAULT_LORA_RANK = 16


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _terminate(process: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM the process group, SIGKILL it after ``grace_s``; also reaps stray workers of the group."""
    if os.name != "posix":
        process.terminate()
        try:
            process.wait(grace_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        return

    def signal_group(sig: int) -> None:
        try:
            os.killpg(process.pid, sig)  # started with start_new_session: the group id is its pid
        except (ProcessLookupError, PermissionError):
            pass

    if process.poll() is None:
        signal_group(signal.SIGTERM)
        try:
            process.wait(grace_s)
        except subprocess.TimeoutExpired:
            pass
    # vLLM runs its engine (and tensor-parallel workers) in child processes: any left would hold the GPU.
    signal_group(signal.SIGKILL)
    process.wait()


def _lora_rank(folder: Path) -> int | None:
    """The largest LoRA rank in a PEFT adapter folder's adapter_config.json, or None if unreadable."""
    try:
        config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    ranks = [config.get("r")] + list((config.get("rank_pattern") or {}).values())
    ranks = [r for r in ranks if isinstance(r, int)]
    return max(ranks) if ranks else None


class VllmServer:
    """A managed ``vllm serve`` process for one ``engine: vllm`` model (and its LoRA adapters).

    It listens on 127.0.0.1 on a free port, with a random API key of its own (passed in the
    environment, not on the command line), so only this server talks to it.

    Args:
        model_cfg: The model's entry in ``serve.models`` (``path``, ``adapters``, ``vllm``).
        resolve: Maps a path of the project file to a real one (``ProjectConfig.resolve``); hub ids
            should come back unchanged.
        log_file: Where to copy vLLM's output (stdout and stderr); None keeps only its last lines.
        stop_timeout_s: Seconds between SIGTERM and SIGKILL on ``stop``.
        request_timeout_s: The returned upstreams' timeout.

    Raises:
        ConfigError: The model has no path.
    """

    def __init__(self, model_cfg: ServeModelConfig, resolve: Callable[[str], str | Path] = lambda p: p,
                 log_file: str | Path | None = None, stop_timeout_s: float = 30.0,
                 request_timeout_s: float = 600.0) -> None:
        if not model_cfg.path:
            raise ConfigError(f"serve.models: model {model_cfg.name!r} has engine vllm but no path; set path to a "
                              f"model folder or hub id.")
        self.cfg = model_cfg
        self._resolve = resolve
        self.log_file = Path(log_file) if log_file is not None else None
        self.stop_timeout_s = stop_timeout_s
        self.request_timeout_s = request_timeout_s
        self.process: subprocess.Popen | None = None
        self.port: int | None = None
        self._api_key = secrets.token_urlsafe(24)
        self._tail: collections.deque[str] = collections.deque(maxlen=_LOG_TAIL_LINES)
        self._reader: threading.Thread | None = None
        self._finalizer: weakref.finalize | None = None

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT/v1`` once started.

        Raises:
            ModelError: Not started.
        """
        if self.port is None:
            raise ModelError(f"vllm serve for model {self.cfg.name!r} is not started; call start() first.")
        return f"http://127.0.0.1:{self.port}/v1"

    def executable(self) -> list[str]:
        """The command that runs vLLM: ``$SLMFORGE_VLLM`` (split like a shell would), else ``vllm``
        on the PATH or next to this Python, else plain ``vllm`` (which ``start`` reports missing)."""
        override = os.environ.get(VLLM_ENV, "").strip()
        if override:
            return shlex.split(override)
        found = shutil.which("vllm") or shutil.which("vllm", path=str(Path(sys.executable).parent))
        return [found or "vllm"]

    def command(self, port: int) -> list[str]:
        """The exact ``vllm serve`` argv for this model on ``port``.

        Raises:
            ConfigError: An adapter's rank is above what vLLM supports.
        """
        v = self.cfg.vllm
        argv = [*self.executable(), "serve", str(self._resolve(self.cfg.path)),
                "--host", "127.0.0.1", "--port", str(port),
                "--served-model-name", self.cfg.name,
                "--gpu-memory-utilization", f"{v.gpu_memory_utilization:g}",
                "--tensor-parallel-size", str(v.tensor_parallel_size),
                "--dtype", v.dtype]
        if v.max_model_len is not None:
            argv += ["--max-model-len", str(v.max_model_len)]
        if v.max_num_seqs is not None:
            argv += ["--max-num-seqs", str(v.max_num_seqs)]
        if self.cfg.adapters:
            folders = {name: Path(self._resolve(path)) for name, path in self.cfg.adapters.items()}
            # Every adapter may be in one batch, as with the torch engine (vLLM's default is 1).
            argv += ["--enable-lora", "--max-loras", str(len(folders))]
            rank = max((r for r in map(_lora_rank, folders.values()) if r is not None), default=None)
            if rank is not None and rank > _VLLM_DEFAULT_LORA_RANK and "--max-lora-rank" not in v.extra_args:
                allowed = [r for r in _VLLM_LORA_RANKS if r >= rank]
                if not allowed:
                    raise ConfigError(f"serve.models: model {self.cfg.name!r} has a LoRA adapter of rank {rank}; "
                                      f"vLLM serves ranks up to {_VLLM_LORA_RANKS[-1]}.")
                argv += ["--max-lora-rank", str(allowed[0])]
            argv += ["--lora-modules", *(f"{name}={folder}" for name, folder in folders.items())]
        return argv + list(v.extra_args)

    def start(self) -> Upstream:
        """Spawn ``vllm serve`` and block until its ``/health`` answers 200.

        Returns:
            The upstream for the base model (``upstreams()`` has one per adapter too).

        Raises:
            ModelError: Already started, the vllm command is missing, or vLLM exited or did not become
                ready within ``vllm.startup_timeout_s`` (the message ends with the last lines of its log).
        """
        if self.process is not None:
            raise ModelError(f"vllm serve for model {self.cfg.name!r} is already running (pid {self.process.pid}).")
        port = _free_port()
        argv = self.command(port)
        self._check_executable(argv[0])
        env = {**os.environ, "VLLM_API_KEY": self._api_key, "PYTHONUNBUFFERED": "1"}
        self._tail.clear()
        _LOG.info("starting %s", shlex.join(argv))
        try:
            process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT, env=env, text=True, errors="replace",
                                       start_new_session=True)  # Ctrl-C reaches us; we stop vLLM in order
        except OSError as exc:
            raise ModelError(f"Could not run {argv[0]!r} for model {self.cfg.name!r}: {exc.strerror or exc}.") from None
        self.process, self.port = process, port
        # Stops it if the interpreter exits without stop() (the finalizer must not hold self).
        self._finalizer = weakref.finalize(self, _terminate, process, self.stop_timeout_s)
        self._reader = threading.Thread(target=self._read_log, args=(process,), daemon=True,
                                        name=f"vllm-log-{self.cfg.name}")
        self._reader.start()
        try:
            self._wait_ready(process, port)
        except BaseException:
            self.stop()
            raise
        _LOG.info("vllm serve for %s is ready on port %d", self.cfg.name, port)
        return self.upstreams()[self.cfg.name]

    def upstreams(self) -> dict[str, Upstream]:
        """Served name -> upstream, for the base model and each LoRA adapter (new clients each call).

        Raises:
            ModelError: Not started.
        """
        from slmforge.serve._upstream import Upstream  # it re-exports this module: imported when needed

        names = [self.cfg.name, *self.cfg.adapters]
        return {name: Upstream(self.base_url, name, api_key=self._api_key, timeout_s=self.request_timeout_s,
                               served_model=name) for name in names}

    def stop(self) -> None:
        """SIGTERM vLLM (its whole process group), SIGKILL after ``stop_timeout_s``. Safe to call twice."""
        process, self.process = self.process, None
        if process is None:
            return
        if self._finalizer is not None:
            self._finalizer.detach()
        _terminate(process, self.stop_timeout_s)
        if self._reader is not None:
            self._reader.join(timeout=5)
        _LOG.info("vllm serve for %s stopped (exit code %s)", self.cfg.name, process.returncode)

    def log_tail(self) -> str:
        """The last lines vLLM wrote."""
        return "\n".join(self._tail)

    def __enter__(self) -> VllmServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ helpers

    def _check_executable(self, program: str) -> None:
        if shutil.which(program) is not None:
            return
        if os.environ.get(VLLM_ENV, "").strip():
            raise ModelError(f"Model {self.cfg.name!r} has engine vllm, but {program!r} from {VLLM_ENV} is not an "
                             f"executable; set {VLLM_ENV} to the vllm command of an environment that has it.")
        raise ModelError(f"Model {self.cfg.name!r} has engine vllm, but no `vllm` command was found on the PATH. "
                         f"vLLM needs a CUDA GPU: `pip install vllm` in a GPU environment (its torch pins usually "
                         f"call for a separate one), then put its vllm on the PATH or set {VLLM_ENV} to it, "
                         f"e.g. {VLLM_ENV}=/opt/vllm-env/bin/vllm.")

    def _read_log(self, process: subprocess.Popen) -> None:
        # Draining the pipe is required (a full pipe would block vLLM); keep the tail for errors.
        log = self.log_file.open("a", encoding="utf-8") if self.log_file is not None else None
        try:
            for line in process.stdout:
                line = line.rstrip("\n")
                self._tail.append(line)
                _LOG.debug("%s", line)
                if log is not None:
                    log.write(line + "\n")
                    log.flush()
        except (OSError, ValueError):
            pass
        finally:
            if log is not None:
                log.close()

    def _wait_ready(self, process: subprocess.Popen, port: int) -> None:
        timeout = self.cfg.vllm.startup_timeout_s
        deadline = time.monotonic() + timeout
        health = f"http://127.0.0.1:{port}/health"
        while True:
            code = process.poll()
            if code is not None:
                if self._reader is not None:
                    self._reader.join(timeout=5)  # the last lines are the ones that explain
                raise ModelError(f"vllm serve for model {self.cfg.name!r} exited with code {code} before it was "
                                 f"ready.{self._tail_text()}")
            try:
                if httpx.get(health, timeout=2.0, trust_env=False).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise ModelError(f"vllm serve for model {self.cfg.name!r} was not ready within {timeout:g} s "
                                 f"(serve.models[].vllm.startup_timeout_s); raise it for a large model."
                                 f"{self._tail_text()}")
            time.sleep(0.25)

    def _tail_text(self) -> str:
        tail = self.log_tail()
        where = f" (whole log: {self.log_file})" if self.log_file is not None else ""
        return f" Last lines of its log{where}:\n{tail}" if tail else " It wrote nothing."
