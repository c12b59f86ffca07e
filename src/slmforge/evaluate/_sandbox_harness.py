"""The verdict harness of ``check_program``: "passed" only when the tests ran to the end.

Run inside the box as ``python -I -S -B <scratch>/.slmforge_harness.pyc VERDICT_FD
TOKEN_FD ENTRY_POINT PROGRAM TESTS`` (the sandbox copies this module, compiled, into
scratch). The parent has written a fresh random token into the pipe ``TOKEN_FD``
and closed its end; ``VERDICT_FD`` is a file the parent reads after the run. The
parent counts the run as passed only when the program exited with status 0 *and*
the verdict file holds the token. The token never appears in argv, the environment, a file, a module
global, or any frame the program can walk to.

How the token stays out of the program's reach:

1. Before any program code runs, the harness drains and closes the token pipe and
   hands the token straight to a *vault* thread (``_vault``); no name in the main
   thread's frames refers to it. From then on the token is a local of the vault's
   frame only. The program runs in the main thread, so no ``f_back`` chain,
   traceback, signal handler or exception hook it can reach leads to the vault's
   frame.
2. The vault writes the token only when the main thread's frame stands on the last
   line of :func:`main`, which follows, in straight-line code, the program, the
   tests and ``check(entry_point)``. A frame's position (``f_lasti``) cannot be
   changed from Python without a trace function, and tracing is blocked (3).
   Whatever the program does to end early (``sys.exit``, ``exit()``, ``quit()``,
   ``raise SystemExit``, ``os._exit(0)``, a signal, ``atexit`` or ``sys.excepthook``
   or ``threading.excepthook`` or ``signal`` handlers that exit 0, a thread that
   calls ``os._exit(0)``, a ``__main__`` block that exits, patched ``exit`` or
   ``check``), the main frame never stands on that line, so there is no verdict.
   Printing a success marker does nothing: stdout is not the channel.
3. An audit hook (:func:`_make_guard`, installed before the program runs, and audit
   hooks cannot be removed) blocks the ways to another thread's frame or to raw
   memory: ``sys._current_frames``, ``sys._current_exceptions``, ``gc.get_objects``
   / ``get_referrers`` / ``get_referents``, ``sys.settrace`` / ``sys.setprofile``
   (tracers receive frames and can move them), assigning ``__code__``, building code
   objects (``code.__new__``), ``ctypes``, new audit hooks, CPython's ``_test*``
   modules, and opening any file named ``mem``. The process is made non-dumpable
   (``prctl``) where the sandbox runs it as an unprivileged uid, so ``/proc/self/mem``
   is owned by root and cannot be opened by any path.
4. The program cannot swap what the harness calls: everything the harness uses after
   the program starts was bound to locals and default arguments before it started
   (patching ``os``, ``builtins`` or this module's globals changes nothing), the tests
   run in their own namespace with a copy of the builtins taken before the program
   ran, and ``check`` must be the function the tests' own code defined.
5. Guessing descriptors gains nothing: the token pipe is closed before the program
   runs, and writing to the verdict file without the token is not a verdict
   (closing or redirecting it only loses a verdict).

What this does not defeat (the threat model): a program that exploits the
interpreter itself - memory-unsafe bugs in CPython, hand-made bytecode loaded with
``marshal`` - can read its own memory and find the token; so can a program running
as root in a weak box (the fallback guard's opt-in mode), where ``/proc/self/mem``
stays readable. And a verdict says only that the tests ran to completion: a program
that changes what they test (patching a module the tests import, or, once ``check``
calls it, reaching the running tests' namespace through its caller's frame) can
still make wrong code pass. These need
deliberate interpreter-level attacks, not the exits and hooks that small models
write by accident or that a prompt-injected program tries first.

Differences from running ``program + tests`` as one script (the old way): the
program still runs as ``__main__`` (so a ``__main__`` block runs, and one that exits
fails), with ``__file__`` and ``sys.argv[0]`` set to the program file; the tests see
the program's globals but their own builtins; ``sys.exit(n)`` and exceptions exit
with status 1 after the usual traceback (harness frames left out).
"""

import os
import sys

_BROKEN = 125  # the harness itself could not start (a non-zero exit: the parent scores it as failed)
_PR_SET_DUMPABLE = 4
# Audit events that reach another thread's frame, raw memory, or tracing (see 3 above).
_BLOCKED_EVENTS = ("sys.settrace", "sys.setprofile", "sys._current_frames", "sys._current_exceptions",
                   "gc.get_objects", "gc.get_referrers", "gc.get_referents", "sys.addaudithook", "code.__new__",
                   "sys.monitoring.register_callback", "sys._setprofileallthreads", "sys._settraceallthreads")
_BLOCKED_MODULES = ("_testcapi", "_testinternalcapi", "_testmultiphase", "_testbuffer", "_testimportmultiple",
                    "_testsinglephase", "_ctypes_test", "_xxtestfuzz")


def _make_guard():
    """The verdict guard's audit hook. Everything it uses is bound here, as default
    arguments of a function nothing else refers to, so the program cannot change it."""

    def hook(event, args, blocked=frozenset(_BLOCKED_EVENTS), modules=frozenset(_BLOCKED_MODULES),
             fspath=os.fspath, str_=str, bytes_=bytes, int_=int, type_=type, error=PermissionError):
        if event in blocked or event.startswith("ctypes."):
            raise error("sandbox: %s is not allowed while the tests are checked" % event)
        if event == "import" and args[0] in modules:
            raise error("sandbox: importing %s is not allowed while the tests are checked" % args[0])
        if event == "object.__setattr__" and args[1] == "__code__":
            raise error("sandbox: replacing a function's code is not allowed while the tests are checked")
        if event == "open":
            path = args[0]
            if type_(path) is int_ or path is None:
                return
            if type_(path) is not str_ and type_(path) is not bytes_:
                path = fspath(path)
            name = path.rpartition("/" if type_(path) is str_ else b"/")[2]
            if name == "mem" or name == b"mem":
                raise error("sandbox: reading process memory is not allowed while the tests are checked")

    return hook


def _non_dumpable():
    """prctl(PR_SET_DUMPABLE, 0): /proc/self/* becomes root's, so an unprivileged program
    cannot open /proc/self/mem. Through _ctypes directly (the ctypes package costs ~5 ms)."""
    from _ctypes import FUNCFLAG_CDECL, CFuncPtr, _SimpleCData, dlopen

    class _Int(_SimpleCData):
        _type_ = "i"

    class _Func(CFuncPtr):
        _flags_ = FUNCFLAG_CDECL
        _restype_ = _Int

    class _Libc:
        _handle = dlopen(None)

    return _Func(("prctl", _Libc))(_PR_SET_DUMPABLE, 0, 0, 0, 0) == 0


def _vault(token, verdict_fd, done, frame, lo, hi, os_write=os.write, os_exit=os._exit):
    """The only holder of the token once the program runs. Runs in its own thread,
    touches no object the program made, looks up no global, and never raises (an
    exception's traceback would lead to this frame), so no program code ever runs on
    this stack."""
    try:
        while True:
            done.acquire()  # released by _finish; a release by the program is a spurious wake-up
            if lo <= frame.f_lasti < hi:
                os_write(verdict_fd, token)
                os_exit(0)
    except:  # noqa: E722 - whatever happens, this thread must not raise
        os_exit(1)


def _read_token(fd):
    """Drain and close the token pipe (the parent wrote the token and closed its end)."""
    token = b""
    while True:
        chunk = os.read(fd, 256)
        if not chunk:
            break
        token += chunk
    os.close(fd)
    return token


def _finish(done, out, err, hold):
    """The tests passed: flush what the program printed, wake the vault, wait to be ended."""
    for stream in (out, err):
        try:
            stream.flush()
        except:  # noqa: E722 - a stream the program closed must not stop the verdict
            pass
    done.release()
    while True:
        hold.acquire()


def _report(exc, out, err, excepthook):
    """Print the failure as the interpreter would (without the harness's own frame)."""
    try:
        tb = exc.__traceback__
        if tb is not None:
            exc.__traceback__ = tb = tb.tb_next  # the printer reads the exception's own traceback
        out.flush()
        excepthook(type(exc), exc, tb)
        if isinstance(exc, SystemExit):
            err.write("sandbox: the program exited (SystemExit: %r) before its tests finished\n" % (exc.code,))
        err.flush()
    except:  # noqa: E722 - the run has failed either way; the caller exits
        pass


def main():
    import _thread
    import builtins

    verdict_fd, token_fd, entry = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    program_path, tests_path = sys.argv[4], sys.argv[5]
    os.set_inheritable(verdict_fd, False)
    out, err, excepthook, exc_info = sys.stdout, sys.stderr, sys.__excepthook__, sys.exc_info
    os_exit, exec_, dict_, any_, report, finish = os._exit, exec, dict, any, _report, _finish
    if os.getuid() != 0:
        try:
            _non_dumpable()
        except BaseException:
            pass  # the fallback guard blocks ctypes: a weak box, as its protections already say
    try:
        with open(program_path, "rb") as f:
            program = compile(f.read(), program_path, "exec", dont_inherit=True)
        with open(tests_path, "rb") as f:
            tests = compile(f.read(), tests_path, "exec", dont_inherit=True)
    except BaseException as e:
        report(e, out, err, excepthook)
        os_exit(1)
    module = type(sys)("__main__")
    ns = module.__dict__
    ns.update(__file__=program_path, __builtins__=builtins, __cached__=None)
    pristine = dict_(builtins.__dict__)
    sys.modules["__main__"] = module
    sys.argv[:] = [program_path]

    frame = sys._getframe()
    last = max(line for _, _, line in frame.f_code.co_lines() if line is not None)
    spans = [(start, end) for start, end, line in frame.f_code.co_lines() if line == last]
    if any(a[1] != b[0] for a, b in zip(spans, spans[1:])):
        os_exit(_BROKEN)  # the last line's bytecode must be one stretch, or the vault's test means nothing
    done, hold = _thread.allocate_lock(), _thread.allocate_lock()
    done.acquire()
    hold.acquire()
    sys.addaudithook(_make_guard())
    # The token goes straight from the pipe (closed here, before any program code runs)
    # into the vault's arguments; no name in this frame ever refers to it.
    _thread.start_new_thread(_vault, (_read_token(token_fd), verdict_fd, done, frame, spans[0][0], spans[-1][1]))

    try:
        exec_(program, ns)
        tns = dict_(ns)
        tns["__builtins__"] = pristine
        exec_(tests, tns)
        if entry:
            check = tns["check"] if "check" in tns else None
            if check is None:
                raise NameError("name 'check' is not defined")
            if not any_(c is check.__code__ for c in tests.co_consts) or check.__globals__ is not tns:
                raise RuntimeError("sandbox: check() is not the function the tests defined")
            if entry not in tns:
                raise NameError("name %r is not defined" % entry)
            check(tns[entry])
    except:  # noqa: E722 - SystemExit and KeyboardInterrupt are failures too
        try:
            report(exc_info()[1], out, err, excepthook)
        finally:
            os_exit(1)
    finish(done, out, err, hold)  # must stay the last line: the vault checks the frame is here


if __name__ == "__main__":
    main()
