"""The sandbox's fallback guard: an audit hook, used only when a kernel protection is missing.

Run as ``python -I -S -B <scratch>/.slmforge_guard.pyc <json> <script> [args...]``:
the sandbox copies this module, compiled, into the scratch folder (the only folder
the box surely sees); the guard installs its hook and then runs ``<script>`` as
``__main__``.

It blocks, from inside the interpreter, what the kernel did not: writes outside
scratch, reading /proc/<pid> of other processes (their environment), network,
signals to other processes, and the ways out of the hook (exec, spawn, ctypes).
Best effort: PEP 578 says audit hooks are not a sandbox, and C extensions can
bypass it. That is why running generated code under it needs an explicit opt-in
(``allow_weak``) and the results say so.
"""

import json
import os
import runpy
import sys

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


if __name__ == "__main__":
    sys.addaudithook(_hook)
    sys.argv = sys.argv[2:]
    runpy.run_path(sys.argv[0], run_name="__main__")
