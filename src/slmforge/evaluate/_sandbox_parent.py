"""The parent's side of one sandboxed run: the files and descriptors it hands the box, what it reads back,
and how it waits for the box and kills what is left of it.

Private to ``slmforge.evaluate.sandbox`` (whose docstring describes the whole design); the box's side is
``_sandbox_bootstrap``, ``_sandbox_guard`` and ``_sandbox_harness``. Nothing here decides a status.
"""

from __future__ import annotations

import functools
import json
import os
import select
import shutil
import signal
import subprocess
import time

_OUTPUT_KEEP = 4096  # bytes of stdout/stderr kept: the first and last half
_HERE = os.path.dirname(os.path.abspath(__file__))


def _write_scratch(folder: str, name: str, data: str | bytes) -> str:
    """Write a file the box may read (scratch is chowned to the box uid only later)."""
    path = os.path.join(folder, name)
    with open(path, "wb") as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)
    os.chmod(path, 0o644)
    return path


@functools.cache
def _compiled(name: str) -> bytes:
    """One of this package's sandbox modules (bootstrap, guard, harness) as a .pyc image.

    The box runs them by path; a .pyc saves compiling them in every run (3 to 5 ms of
    CPU per execution, more than the harness adds otherwise). They are copied per run:
    the bootstrap into the job folder, the others into scratch, the one folder every box
    can read (the package itself may sit in a home folder the box hides).
    """
    import importlib.util
    import marshal

    path = os.path.join(_HERE, name)
    with open(path, "rb") as f:
        code = compile(f.read(), path, "exec", dont_inherit=True)
    # header: magic, flags 0 (timestamp-based), mtime and size 0 - unchecked when a .pyc is run as a script
    return importlib.util.MAGIC_NUMBER + bytes(12) + marshal.dumps(code)


def _verdict_channel(job: str, fds: list[int]) -> tuple[bytes, int, int]:
    """A fresh random token in a pipe (read end for the box, write end already closed) and
    the verdict file (write end for the box). Both descriptors are appended to ``fds``."""
    token = os.urandom(16).hex().encode()
    token_r, token_w = os.pipe()
    fds.append(token_r)
    try:
        os.write(token_w, token)  # 32 bytes: far below the pipe buffer, so this never blocks
    finally:
        os.close(token_w)
    verdict = os.open(os.path.join(job, "verdict"), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND
                      | os.O_CLOEXEC, 0o600)
    fds.append(verdict)
    return token, verdict, token_r


def _has_verdict(path: str, token: bytes) -> bool:
    try:
        with open(path, "rb") as f:
            return token in f.read(1 << 20)
    except OSError:
        return False


def _read_status(path: str) -> dict:
    """Merge the JSON lines the bootstrap and its child wrote (a killed box may leave half a line)."""
    report: dict = {"protections": []}
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError:
        return report
    for line in lines:
        try:
            item = json.loads(line)
        except ValueError:
            continue
        report["protections"] += item.pop("protections", [])
        report.update(item)
    return report


def _read_capped(path: str) -> str:
    with open(path, "rb") as f:
        data = f.read(_OUTPUT_KEEP + 1)
        if len(data) > _OUTPUT_KEEP:
            size = os.fstat(f.fileno()).st_size
            half = _OUTPUT_KEEP // 2
            f.seek(size - half)
            data = data[:half] + f"\n...[{size - 2 * half} bytes omitted]...\n".encode() + f.read(half)
    return data.decode("utf-8", errors="replace")


def _wait_unreaped(proc: subprocess.Popen, timeout: float) -> bool:
    """Wait for the bootstrap to exit without reaping it; False on timeout.

    Not reaping keeps its pid (= the box's process-group id) from being reused before
    :func:`_kill_box` signals the group. A pidfd also wakes up at once, where
    ``Popen.wait(timeout)`` polls with sleeps of up to 50 ms.
    """
    try:
        fd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):  # kernel < 5.3: polling wait (reaps; tiny pgid-reuse race)
        try:
            proc.wait(timeout=timeout)
            return True
        except subprocess.TimeoutExpired:
            return False
    try:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        return bool(poller.poll(max(0.0, timeout) * 1000))
    finally:
        os.close(fd)


def _kill_box(proc: subprocess.Popen, uid: int | None, everything: bool) -> None:
    """Kill whatever is left of one run: the bootstrap's process group, and when the box
    may have survived (timeout, no pid namespace) every process of the box's own uid.

    With a pid namespace the program is pid 1 and has PR_SET_PDEATHSIG, so killing the
    bootstrap takes the whole namespace down; the uid sweep catches a program that
    escaped the process group (setsid) where there is no pid namespace.
    """
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()
    if uid is None or not everything:
        return
    for _ in range(50):  # a fork bomb may still be forking between sweeps; the process limit bounds it
        found = _pids_of_uid(uid)
        if not found:
            return
        for pid in found:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(0.01)


def _pids_of_uid(uid: int) -> list[int]:
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/status", encoding="ascii", errors="replace") as f:
                for line in f:
                    if line.startswith("Uid:"):
                        if int(line.split()[1]) == uid:
                            pids.append(int(name))
                        break
        except (OSError, ValueError):
            continue
    return pids


def _remove_tree(path: str) -> None:
    """rmtree that also removes folders a program made unreadable (chmod 000)."""
    def fix(func, target, _exc):
        try:
            os.chmod(os.path.dirname(target), 0o700)
            os.chmod(target, 0o700)
            func(target)
        except OSError:
            pass

    shutil.rmtree(path, onerror=fix)
    if os.path.exists(path):
        shutil.rmtree(path, ignore_errors=True)
