"""The code-execution sandbox: hostile programs stay in their box, HumanEval passes through it.

Each hostile program gets what it needs from the test (a world-writable folder the
test owns, a port the test listens on, the pid of this pytest process) and prints
what it managed to do; the test then checks the world, not just the status.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

import pytest

from slmforge.evaluate import sandbox
from slmforge.evaluate.sandbox import (
    ExecResult,
    SandboxError,
    SandboxLimits,
    check_program,
    load_humaneval,
    run_many,
    run_python,
    sandbox_protections,
)

FAST = SandboxLimits(timeout_s=5, cpu_s=5, memory_mb=512)
SECRET = "hunter2-do-not-leak"
# What a machine that refuses namespaces (a container) may still grant; the audit hook
# covers the rest. Here, as root with Python under /root (0700), that is just no_new_privs.
NO_NAMESPACES = ("unprivileged uid", "process limit", "no new privileges")


def _guarded(code: str, limits: SandboxLimits = FAST, want: tuple[str, ...] | None = None) -> ExecResult:
    """Run with namespaces switched off, as on a machine that refuses them."""
    if want is None:
        want = sandbox._probe(NO_NAMESPACES)
    return sandbox._execute(code, limits, None, want, strict=True)


def _sandbox_processes() -> int:
    """Processes running as a sandbox uid (any box, any test): should be none between runs."""
    count = 0
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{name}/status") as f:
                uid = int(next(line for line in f if line.startswith("Uid:")).split()[1])
        except (OSError, StopIteration):
            continue
        count += uid >= sandbox._UID_BASE
    return count


@pytest.fixture
def world(monkeypatch):
    """What hostile programs aim at: a folder anyone may write to, a listening socket,
    a secret in the environment, and this process."""
    # directly under the temp root (pytest's tmp_path sits in a 0700 folder), world-writable:
    # so only the sandbox, not file permissions, stops the write
    target = Path(tempfile.mkdtemp(prefix="slmforge-hostile-"))
    os.chmod(target, 0o777)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.setblocking(False)
    monkeypatch.setenv("SLMFORGE_TEST_SECRET", SECRET)
    yield {"dir": target, "port": listener.getsockname()[1], "listener": listener, "pid": os.getpid()}
    listener.close()
    shutil.rmtree(target)


def _connections(listener: socket.socket) -> int:
    """Connections the kernel completed on the test's port (accept() of queued ones)."""
    n = 0
    while True:
        try:
            conn, _ = listener.accept()
        except BlockingIOError:
            return n
        conn.close()
        n += 1


WRITE_OUTSIDE = """
import os, pathlib
for path in [{target!r} + "/escaped.txt", "../escaped.txt", "/escaped-{pid}.txt"]:
    try:
        with open(path, "w") as f:
            f.write("out")
        print("ESCAPED", path)
    except OSError as e:
        print("blocked", path, type(e).__name__)
try:
    os.rename("program.py", {target!r} + "/moved.py")
    print("ESCAPED rename")
except OSError as e:
    print("blocked rename", type(e).__name__)
"""

SOCKETS = """
import socket
for family, addr in [(socket.AF_INET, ("127.0.0.1", {port})), (socket.AF_INET, ("8.8.8.8", 53))]:
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(1)
    try:
        s.connect(addr)
        print("CONNECTED", addr)
    except OSError as e:
        print("blocked", addr, type(e).__name__)
"""

READ_ENV = """
import os
print(dict(os.environ))
for path in ["/proc/{pid}/environ", "/proc/1/environ"]:
    try:
        print(open(path, "rb").read())
    except OSError as e:
        print("blocked", path, type(e).__name__)
"""

KILL_PARENT = """
import os, signal
try:
    os.kill({pid}, signal.SIGKILL)
    print("KILLED")
except OSError as e:
    print("blocked", type(e).__name__)
os.kill(os.getppid(), signal.SIGKILL)
print("survived its own attempt on the parent")
"""


def _check_write(r: ExecResult, world) -> None:
    assert "ESCAPED" not in r.stdout, r.stdout
    assert not (world["dir"] / "escaped.txt").exists()
    assert not (world["dir"] / "moved.py").exists()
    assert not os.path.exists(f"/escaped-{world['pid']}.txt")
    assert r.stdout.count("blocked") == 4


def _check_sockets(r: ExecResult, world) -> None:
    assert "CONNECTED" not in r.stdout, r.stdout
    assert _connections(world["listener"]) == 0


def _check_env(r: ExecResult, world) -> None:
    assert SECRET not in r.stdout and SECRET not in r.stderr
    assert "SLMFORGE_TEST_SECRET" not in r.stdout
    # nor anything else of ours: not through os.environ, not through /proc/<our pid>/environ
    clean = {"PATH", "HOME", "TMPDIR", "LANG"}
    leaked = [k for k, v in os.environ.items() if k not in clean and len(v) > 3 and f"{k}={v}" in r.stdout]
    assert leaked == [] and r.stdout.count("blocked") == 2


def _check_kill(r: ExecResult, world) -> None:
    assert "KILLED" not in r.stdout
    os.kill(world["pid"], 0)  # this process is alive (raises if not)
    assert r.status in ("passed", "failed", "crashed")


HOSTILE = {
    "write outside scratch": (WRITE_OUTSIDE, _check_write),
    "open sockets": (SOCKETS, _check_sockets),
    "read environment": (READ_ENV, _check_env),
    "kill the parent": (KILL_PARENT, _check_kill),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_program_is_contained(name, world):
    code, check = HOSTILE[name]
    r = run_python(code.format(target=str(world["dir"]), port=world["port"], pid=world["pid"]), FAST)
    print(name, r.status, r.stdout.strip()[-300:], r.stderr.strip()[-300:])
    check(r, world)


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_program_is_contained_by_the_fallback_guard(name, world):
    """Without namespaces (a container), the audit hook must stop the same programs."""
    code, check = HOSTILE[name]
    r = _guarded(code.format(target=str(world["dir"]), port=world["port"], pid=world["pid"]))
    print(name, r.status, r.stdout.strip()[-300:], r.stderr.strip()[-300:])
    assert "audit hook" in r.protections and "network namespace" not in r.protections
    check(r, world)


def test_guard_blocks_killing_the_parent_even_as_root(world):
    """No uid change and no pid namespace: only the audit hook stands between them."""
    code = KILL_PARENT.format(pid=world["pid"])
    r = _guarded(code, want=())
    assert "blocked PermissionError" in r.stdout and r.status == "failed", (r.stdout, r.stderr)
    os.kill(world["pid"], 0)


def test_fork_bomb_is_contained_and_cleaned_up():
    t0 = time.perf_counter()
    r = run_python("import os\nwhile True:\n    os.fork()\n", SandboxLimits(timeout_s=5, max_processes=32))
    assert r.status in ("failed", "timeout"), r
    assert time.perf_counter() - t0 < 6.5
    # a bomb that survives the process limit (sleeps and retries) until the wall clock kills it
    r = run_python("import os, time\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n"
                   "        time.sleep(0.5)\n", SandboxLimits(timeout_s=1.5, max_processes=32))
    assert r.status == "timeout" and r.returncode is None
    time.sleep(0.2)
    assert _sandbox_processes() == 0  # nothing left behind
    assert run_python("print('still responsive')", FAST).stdout == "still responsive\n"


def test_memory_bomb_fails_quickly():
    r = run_python("x = bytearray(10 * 1024 ** 3)\n", FAST)
    assert r.status == "failed" and "MemoryError" in r.stderr and r.seconds < 3
    r = run_python("chunks = []\nwhile True:\n    chunks.append(bytearray(32 << 20))\n",
                   SandboxLimits(timeout_s=10, memory_mb=256))
    assert r.status == "failed" and "MemoryError" in r.stderr and r.seconds < 5


def test_infinite_loop_times_out_on_the_wall_clock():
    r = run_python("while True:\n    pass\n", SandboxLimits(timeout_s=1.0, cpu_s=30))
    assert r.status == "timeout" and r.returncode is None
    assert 1.0 <= r.seconds < 2.0


def test_cpu_limit_is_a_timeout():
    r = run_python("while True:\n    pass\n", SandboxLimits(timeout_s=20, cpu_s=1))
    assert r.status == "timeout" and r.returncode is not None and r.returncode < 0
    assert r.seconds < 5


def test_big_file_hits_the_file_size_limit():
    r = run_python("open('big.bin', 'wb').write(b'x' * (3 << 20))\n", SandboxLimits(file_mb=1))
    assert r.status == "failed" and "File too large" in r.stderr


def test_segfault_is_a_crash():
    r = run_python("import ctypes\nctypes.string_at(0)\n", FAST)
    assert r.status == "crashed" and r.returncode == -11


@pytest.mark.parametrize("code, status, returncode", [
    ("print('hello')", "passed", 0),
    ("def f(:\n    pass", "failed", 1),
    ("raise SystemExit(3)", "failed", 3),
    ("assert 1 + 1 == 3", "failed", 1),
])
def test_ordinary_programs(code, status, returncode):
    r = run_python(code, FAST)
    assert (r.status, r.returncode) == (status, returncode), r.stderr
    assert r.protections == sandbox_protections()


def test_output_and_stdin_are_captured_and_truncated():
    r = run_python("import sys\nprint(sys.stdin.read().upper())\nprint('e', file=sys.stderr)", FAST, stdin="abc")
    assert (r.stdout, r.stderr) == ("ABC\n", "e\n")
    r = run_python("print('a' * 100_000)\nprint('END')", FAST)
    assert r.status == "passed" and len(r.stdout) < 5000
    assert r.stdout.startswith("aaaa") and r.stdout.endswith("END\n") and "bytes omitted" in r.stdout


def test_scratch_is_writable_private_and_removed():
    code = ("import os\nopen('note.txt', 'w').write('kept')\nprint(open('note.txt').read())\n"
            "print(os.getcwd())\nprint(sorted(os.listdir('.')))\nprint(os.environ['HOME'])")
    r = run_python(code, FAST)
    out = r.stdout.splitlines()
    assert r.status == "passed" and out[0] == "kept"
    assert out[2] == "['note.txt', 'program.py']" and out[3] == out[1]
    assert not os.path.exists(out[1])


def test_network_can_be_allowed(world):
    r = run_python(SOCKETS.format(port=world["port"]), SandboxLimits(timeout_s=5, network=True))
    assert f"CONNECTED ('127.0.0.1', {world['port']})" in r.stdout
    assert _connections(world["listener"]) == 1
    assert "network namespace" not in r.protections


def test_protections_are_reported():
    names = sandbox_protections()
    for always in ("separate process", "clean environment", "scratch directory", "resource limits"):
        assert always in names
    # every kernel protection that is missing must be covered by the audit hook
    if not {"read-only filesystem", "network namespace"} <= set(names):
        assert "audit hook" in names
    print("protections here:", names)


def test_invalid_limits_raise():
    with pytest.raises(SandboxError, match="timeout_s"):
        run_python("pass", SandboxLimits(timeout_s=0))


# ------------------------------------------------------------------ HumanEval


def test_humaneval_data_loads():
    problems = load_humaneval()
    assert len(problems) == 164 and problems[0]["task_id"] == "HumanEval/0"
    assert set(problems[0]) == {"task_id", "prompt", "canonical_solution", "test", "entry_point"}


def test_humaneval_canonical_solutions_pass_and_broken_ones_fail():
    """All 164 (about 5 s on 2 cores, so no need for a slow tier)."""
    problems = load_humaneval()
    jobs = [(p["prompt"] + p["canonical_solution"], p["test"], p["entry_point"]) for p in problems]
    results = run_many(jobs, workers=2)
    assert {p["task_id"]: r.stderr[-300:] for p, r in zip(problems, results) if r.status != "passed"} == {}
    broken = [(p["prompt"] + "    return None\n", p["test"], p["entry_point"]) for p in problems[:3]]
    for r in run_many(broken, workers=2):
        assert r.status == "failed" and "AssertionError" in r.stderr, r.stderr
