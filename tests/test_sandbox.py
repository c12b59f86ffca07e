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


# ------------------------------------------------------------------ the verdict: passed = the tests ran to the end

# Every program below defines a WRONG f (the tests need f(1) == 2) and tries to be scored
# "passed" anyway: by ending before the tests, by routing the failing assert to exit 0, by
# forging the verdict, or by hunting for the harness's token.
TESTS = "def check(candidate):\n    assert candidate(1) == 2\n    for i in range(3):\n        assert candidate(i) == i + 1\n"
WRONG = "def f(x):\n    return x\n"
SLOW_WRONG = "import time\ndef f(x):\n    time.sleep(0.3)\n    return x\n"
# Write every token-sized secret the program can find to every descriptor, print it, exit 0.
SPRAY = """
def spray(found):
    import os
    for secret in found:
        data = secret if isinstance(secret, bytes) else str(secret).encode()
        print(data)
        for fd in range(3, 256):
            try:
                os.write(fd, data)
            except OSError:
                pass
"""
FORGERIES = {
    "sys.exit(0)": WRONG + "import sys\nsys.exit(0)\n",
    "exit()": WRONG + "exit()\n",
    "quit()": WRONG + "quit()\n",
    "raise SystemExit": WRONG + "raise SystemExit\n",
    "raise SystemExit(0)": WRONG + "raise SystemExit(0)\n",
    "os._exit(0)": WRONG + "import os\nos._exit(0)\n",
    "exit inside the candidate": "import sys\ndef f(x):\n    sys.exit(0)\n",
    "__main__ block": WRONG + "def main():\n    return 0\nif __name__ == '__main__':\n    import sys\n    sys.exit(main())\n",
    "sys.excepthook": WRONG + "import os, sys\nsys.excepthook = lambda *a: os._exit(0)\n",
    "threading.excepthook": WRONG + "import os, threading\nthreading.excepthook = lambda *a: os._exit(0)\n",
    "sys.unraisablehook": WRONG + "import os, sys\nsys.unraisablehook = lambda *a: os._exit(0)\n",
    "atexit": WRONG + "import atexit, os\natexit.register(lambda: os._exit(0))\n",
    "signal handler exits 0": SLOW_WRONG + "import os, signal\nsignal.signal(signal.SIGALRM, lambda *a: os._exit(0))\n"
                              "signal.setitimer(signal.ITIMER_REAL, 0.1)\n",
    "SIGINT handler exits 0": SLOW_WRONG + "import os, signal, threading\n"
                              "signal.signal(signal.SIGINT, lambda *a: os._exit(0))\n"
                              "threading.Timer(0.1, os.kill, (os.getpid(), signal.SIGINT)).start()\n",
    "thread calls os._exit(0)": SLOW_WRONG + "import os, threading\n"
                                "threading.Thread(target=lambda: (__import__('time').sleep(0.1), os._exit(0))).start()\n",
    "forked child exits 0": WRONG + "import os\nif os.fork() == 0:\n    os._exit(0)\n",
    "own check": WRONG + "def check(candidate):\n    pass\n",
    "patched builtins": WRONG + "import builtins\nbuiltins.range = lambda *a: []\nbuiltins.AssertionError = KeyError\n",
    "patched exit": WRONG + "import builtins, os, sys\nbuiltins.exit = sys.exit = lambda *a: os._exit(0)\nexit()\n",
    "check replaced from a thread": SLOW_WRONG + "import builtins, sys, threading, time\n"
        "def swap():\n    for _ in range(300):\n        sys.modules['__main__'].check = builtins.check = lambda c: None\n"
        "        time.sleep(0.001)\nthreading.Thread(target=swap, daemon=True).start()\n",
    "sys.settrace jump": WRONG + "import sys\n"
        "def tracer(frame, event, arg):\n    if event == 'line' and frame.f_code.co_name == 'check':\n"
        "        frame.f_lineno = frame.f_code.co_firstlineno + 4\n    return tracer\nsys.settrace(tracer)\n",
    "sys.setprofile": WRONG + "import os, sys\nsys.setprofile(lambda *a: os._exit(0))\n",
    "print a forged marker": WRONG + "import os, sys\nfor t in ('PASSED', 'passed', 'OK', '0' * 32, 'verdict: passed'):\n"
        "    print(t)\n    print(t, file=sys.stderr)\nsys.stdout.flush()\nsys.stderr.flush()\nos._exit(0)\n",
    "write to every descriptor": WRONG + SPRAY + "import os\nspray(['passed', 'ok\\n', '0' * 32])\nos._exit(0)\n",
    "read every descriptor": WRONG + SPRAY + "import os\nfound = []\nfor fd in range(0, 256):\n    try:\n"
        "        found.append(os.read(fd, 64))\n    except OSError:\n        pass\n"
        "try:\n    found += os.listdir('/proc/self/fd')\nexcept OSError:\n    pass\nspray(found)\nos._exit(0)\n",
    "walk the frames": WRONG + SPRAY + "import os, sys\nfound = []\nframe = sys._getframe()\nwhile frame is not None:\n"
        "    found += [v for v in frame.f_locals.values() if isinstance(v, (bytes, str)) and len(v) == 32]\n"
        "    frame = frame.f_back\nspray(found)\nos._exit(0)\n",
    "wake the vault early": WRONG + "import os, sys\nframe = sys._getframe()\nwhile frame is not None:\n"
        "    for v in list(frame.f_locals.values()):\n        if type(v).__name__ == 'lock' and v.locked():\n"
        "            try:\n                v.release()\n            except RuntimeError:\n                pass\n"
        "    frame = frame.f_back\nimport time\ntime.sleep(0.2)\nos._exit(0)\n",
    "other threads' frames": WRONG + SPRAY + "import os, sys\nfound = []\nfor fr in sys._current_frames().values():\n"
        "    found += [v for v in fr.f_locals.values() if isinstance(v, bytes)]\nspray(found)\nos._exit(0)\n",
    "gc scan": WRONG + SPRAY + "import gc, os\nfound = [o for o in gc.get_objects() if isinstance(o, (bytes, str)) "
        "and len(o) == 32]\nspray(found)\nos._exit(0)\n",
    "read /proc/self/mem": WRONG + "import os, re\nfound = []\nfor path in ('/proc/self/mem', '/proc/thread-self/mem'):\n"
        "    try:\n        open(path, 'rb')\n        print('OPENED', path)\n    except OSError as e:\n"
        "        print('blocked', e)\nos._exit(0)\n",
    "ctypes": WRONG + "import ctypes, os\nprint('ctypes loaded')\nos._exit(0)\n",
    "KeyboardInterrupt": WRONG + "raise KeyboardInterrupt\n",
    "kill itself": WRONG + "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n",
}


@pytest.mark.parametrize("name", list(FORGERIES))
def test_a_program_that_skips_or_forges_its_tests_is_not_passed(name):
    r = check_program(FORGERIES[name], TESTS, "f", FAST)
    print(name, r.status, r.returncode, r.stdout[-300:], r.stderr[-400:])
    expected = "crashed" if name == "kill itself" else "failed"
    assert r.status == expected, (r.stdout, r.stderr)
    assert "OPENED" not in r.stdout and "ctypes loaded" not in r.stdout


def test_the_verdict_is_in_no_output_and_differs_per_run():
    """The token is nowhere a program or a reader of its output could see it."""
    right = "def f(x):\n    return x + 1\n"
    show = "import os, sys\nprint([os.path.basename(a) for a in sys.argv], sorted(os.environ), os.listdir('.'))\n"
    a, b = (check_program(right + show, TESTS, "f", FAST) for _ in range(2))
    assert a.status == b.status == "passed", (a.stderr, b.stderr)
    assert a.stdout == b.stdout  # nothing run-specific reaches the program's argv or environment
    assert a.stdout.startswith("['program.py'] ['HOME', 'LANG', 'PATH', 'TMPDIR']"), a.stdout


@pytest.mark.parametrize("program", [
    "def f(x):\n    return x + 1\n",
    # ordinary things a correct solution may do: print, threads, a __main__ block that returns,
    # a signal handler, atexit, exiting non-zero from a thread-less helper never called
    "import sys\ndef f(x):\n    print('debug', x, file=sys.stderr)\n    return x + 1\nprint('loaded')\n",
    "import threading\ndef f(x):\n    out = []\n    t = threading.Thread(target=lambda: out.append(x + 1))\n"
    "    t.start()\n    t.join()\n    return out[0]\n",
    "def f(x):\n    return x + 1\ndef main():\n    print(f(1))\nif __name__ == '__main__':\n    main()\n",
    "import signal, atexit\nsignal.signal(signal.SIGALRM, signal.SIG_IGN)\natexit.register(print, 'bye')\n"
    "def f(x):\n    return x + 1\n",
    "import sys\ndef f(x):\n    return x + 1\ndef never():\n    sys.exit(1)\n",
])
def test_correct_programs_still_pass(program):
    r = check_program(program, TESTS, "f", FAST)
    assert r.status == "passed" and r.returncode == 0, r.stderr


def test_ordinary_failures_keep_their_traceback():
    r = check_program("def f(x):\n    return x\n", TESTS, "f", FAST)
    assert r.status == "failed" and r.returncode == 1
    assert "AssertionError" in r.stderr and "tests.py" in r.stderr and "harness" not in r.stderr
    r = check_program("def f(x:\n", TESTS, "f", FAST)
    assert r.status == "failed" and "SyntaxError" in r.stderr
    r = check_program("def g(x):\n    return x + 1\n", TESTS, "f", FAST)
    assert r.status == "failed" and "NameError" in r.stderr
    r = check_program("def f(x):\n    return x + 1\n", "assert False\n", None, FAST)  # no entry point: tests only
    assert r.status == "failed"
    assert check_program("def f(x):\n    return x + 1\n", "assert f(1) == 2\n", None, FAST).status == "passed"


def test_timeouts_and_crashes_under_the_harness():
    r = check_program("def f(x):\n    while True:\n        pass\n", TESTS, "f", SandboxLimits(timeout_s=1.0, cpu_s=30))
    assert r.status == "timeout" and r.returncode is None
    r = check_program("def f(x):\n    while True:\n        pass\n", TESTS, "f", SandboxLimits(timeout_s=20, cpu_s=1))
    assert r.status == "timeout" and r.returncode is not None
    r = check_program("import ctypes\ndef f(x):\n    return x + 1\n", TESTS, "f", FAST)
    assert r.status == "failed" and "not allowed" in r.stderr  # ctypes is blocked while tests are checked
    r = check_program("def f(x):\n    return f(x)\n", TESTS, "f", FAST)
    assert r.status == "failed" and "RecursionError" in r.stderr
    r = check_program("def f(x):\n    return bytearray(10 * 1024 ** 3)\n", TESTS, "f", FAST)
    assert r.status == "failed" and "MemoryError" in r.stderr


def test_the_verdict_holds_under_the_fallback_guard():
    """Weak box (namespaces refused): the harness runs under the audit hook and still decides."""
    want = sandbox._probe(NO_NAMESPACES)
    right, wrong_exit = "def f(x):\n    return x + 1\n", WRONG + "import sys\nsys.exit(0)\n"
    ok = sandbox._execute(right, FAST, None, want, strict=True, harness=(TESTS, "f"))
    bad = sandbox._execute(wrong_exit, FAST, None, want, strict=True, harness=(TESTS, "f"))
    assert "audit hook" in ok.protections
    assert (ok.status, bad.status) == ("passed", "failed"), (ok.stderr, bad.stderr)


# ------------------------------------------------------------------ fail closed without namespaces


@pytest.fixture
def no_namespaces(monkeypatch):
    """This machine as a container that refuses namespaces would look to the sandbox."""
    refused = sandbox._probe(NO_NAMESPACES)
    monkeypatch.setattr(sandbox, "_probe", lambda allowed=sandbox._KERNEL_STEPS: refused)
    return refused


def test_a_weak_box_is_refused_unless_opted_in(no_namespaces):
    assert sandbox.sandbox_weaknesses() == ["read-only filesystem", "network namespace", "pid namespace"]
    assert sandbox.sandbox_weaknesses(network=True) == ["read-only filesystem", "pid namespace"]
    for run in (lambda **kw: run_python("print('ran')", FAST, **kw),
                lambda **kw: check_program("def f(x):\n    return x + 1\n", TESTS, "f", FAST, **kw),
                lambda **kw: run_many([("def f(x):\n    return x + 1\n", TESTS, "f")], FAST, **kw)[0]):
        with pytest.raises(SandboxError, match="allow_weak_sandbox"):
            run()
        r = run(allow_weak=True)
        assert r.status == "passed" and "audit hook" in r.protections
        record = sandbox.sandbox_record([r])
        assert record["weak"] is True and record["missing"] == ["read-only filesystem", "network namespace",
                                                                "pid namespace"]


def test_a_full_box_is_recorded_as_strong():
    r = check_program("def f(x):\n    return x + 1\n", TESTS, "f", FAST)
    record = sandbox.sandbox_record([r, r])
    assert record == {"protections": r.protections, "weak": False, "missing": [], "executions": 2}
    assert {"read-only filesystem", "network namespace", "pid namespace"} <= set(record["protections"])
