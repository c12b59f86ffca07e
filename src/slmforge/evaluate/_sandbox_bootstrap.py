"""The sandbox's bootstrap: builds the box and forks the program (see ``sandbox.py``).

Run as ``python -I -S -B _sandbox_bootstrap.py <json>`` in the box's own session,
with the privileges of the caller, by :func:`slmforge.evaluate.sandbox._execute`.
It sets up the namespaces and forks init (pid 1 of the new pid namespace when there
is one), which forks the program. All three write JSON lines to the status fd:
``{"protections": [...]}`` (namespaces), ``{"protections": [...]}`` (program steps),
then ``{"wait_status": int, "cpu_s": float}`` from init, or ``{"setup_error": str}``.

A script rather than ``preexec_fn``: preexec_fn is unsafe in a threaded parent
(``run_many``), and mount/fork logic reads better as a script than inside fork-exec.
Standard library only, and nothing from slmforge: it runs with ``-I -S``.

``cfg["pass_fds"]`` are descriptors only the program may keep (the verdict harness's
token pipe and verdict file): the bootstrap and init close their copies once they
have forked, so nothing but the program holds them.
"""

import ctypes
import json
import os
import resource
import select
import signal
import sys

CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x20000, 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_REC, MS_PRIVATE, MS_RELATIME = 1024, 2048, 4096, 16384, 1 << 18, 1 << 21
ST_TO_MS = {1: MS_RDONLY, 2: MS_NOSUID, 4: MS_NODEV, 8: MS_NOEXEC, 1024: MS_NOATIME, 2048: MS_NODIRATIME,
            4096: MS_RELATIME}
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38
SETUP_FAILED = 125

libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]


def check(ret, what):
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, "%s: %s" % (what, os.strerror(err)))


def mount(src, dst, fstype, flags, data=None):
    def enc(s):
        return None if s is None else s.encode()

    check(libc.mount(enc(src), enc(dst), enc(fstype), flags, enc(data)), "mount %s" % dst)


def mountpoints():
    with open("/proc/self/mountinfo") as f:
        for line in f:
            raw = line.split()[4]
            yield raw.encode().decode("unicode_escape")  # \040 and friends


def close_all(fds):
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


class Box:
    """One box being built: what was asked for, what the kernel granted, how to report."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.status = cfg["status_fd"]
        os.set_inheritable(self.status, False)  # the program must not inherit it: closed on exec
        self.want, self.strict, self.scratch = set(cfg["want"]), cfg["strict"], cfg["scratch"]
        self.got, self.notes = [], []
        self.root = os.geteuid() == 0
        self.mounts = self.pidns = False

    def say(self, **item):
        os.write(self.status, (json.dumps(item) + "\n").encode())

    def step(self, name, fn):
        if name not in self.want:
            return False
        try:
            fn()
        except OSError as e:
            if self.strict:
                raise
            self.notes.append("%s: %s" % (name, e))
            return False
        self.got.append(name)
        return True

    # ------------------------------------------------------------------ namespaces

    def user_namespace(self):
        uid, gid = os.getuid(), os.getgid()
        check(libc.unshare(CLONE_NEWUSER), "unshare user")
        for name, text in (("setgroups", "deny"), ("uid_map", "0 %d 1" % uid), ("gid_map", "0 %d 1" % gid)):
            with open("/proc/self/" + name, "w") as f:
                f.write(text)

    def read_only_filesystem(self):
        check(libc.unshare(CLONE_NEWNS), "unshare mount")
        mount(None, "/", None, MS_REC | MS_PRIVATE)
        # O_PATH handles opened inside the new namespace: bind sources after the tmpfs covers them.
        keep = [(path, os.open(path, os.O_PATH | os.O_DIRECTORY)) for path in self.cfg["expose"] + [self.scratch]]
        for hide in self.cfg["hide"]:
            if os.path.isdir(hide) and not os.path.islink(hide):
                mount("tmpfs", hide, "tmpfs", MS_NOSUID | MS_NODEV, "mode=755,size=1m")
        for path, fd in keep:
            os.makedirs(path, exist_ok=True)
            mount("/proc/self/fd/%d" % fd, path, None, MS_BIND | MS_REC)
            os.close(fd)
        for point in list(mountpoints()):
            if point == self.scratch:
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
        os.chdir(self.scratch)  # the old cwd belongs to the now read-only copy of the filesystem

    def build(self):
        if not self.root:
            self.step("user namespace", self.user_namespace)
        self.mounts = self.step("read-only filesystem", self.read_only_filesystem)
        self.step("network namespace", lambda: check(libc.unshare(CLONE_NEWNET), "unshare net"))
        self.pidns = self.step("pid namespace", lambda: check(libc.unshare(CLONE_NEWPID), "unshare pid"))
        self.say(protections=self.got, notes=self.notes)

    # ------------------------------------------------------------------ processes

    def program(self, init_pid, box_uid):
        """Grandchild: limits, drop privileges, exec the program."""
        got, lim, want = [], self.cfg["limits"], self.want
        for res, value in ((resource.RLIMIT_CPU, (lim["cpu"], lim["cpu"] + 1)),
                           (resource.RLIMIT_AS, (lim["mem"], lim["mem"])),
                           (resource.RLIMIT_FSIZE, (lim["fsize"], lim["fsize"])),
                           (resource.RLIMIT_NOFILE, (lim["nofile"], lim["nofile"])),
                           (resource.RLIMIT_CORE, (0, 0)),
                           (resource.RLIMIT_NPROC, (lim["nproc"], lim["nproc"]))):
            resource.setrlimit(res, value)
        if self.root and "unprivileged uid" in want:
            try:
                os.chown(self.scratch, box_uid, box_uid)
                os.setgroups([])
                os.setgid(box_uid)
                os.setuid(box_uid)
                got.append("unprivileged uid")
            except OSError as e:
                if self.strict:
                    raise
                self.notes.append("unprivileged uid: %s" % e)
        elif not self.root and "user namespace" in want:
            # uid 0 of our user namespace could remount the filesystem read-write: a nested
            # user namespace without a uid map leaves the program no capability over it.
            check(libc.unshare(CLONE_NEWUSER), "unshare nested user")
        if "process limit" in want and (not self.root or os.getuid() != 0):  # ignored for real root only
            got.append("process limit")
        if "no new privileges" in want:
            check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
            got.append("no new privileges")
        check(libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "pdeathsig")  # after setuid, which clears it
        if os.getppid() != init_pid:
            os._exit(137)
        if self.pidns:
            os.setsid()  # kill(0, ...) from the program then reaches only the program's own processes
        self.say(protections=got, notes=self.notes)
        os.execve(self.cfg["exe"], self.cfg["argv"], self.cfg["env"])

    def init(self, alive_r, alive_w, box_uid):
        """Child of the bootstrap; pid 1 of the new pid namespace when there is one. It reaps
        orphans, reports the program's exit, and its exit takes the whole namespace down.
        Being pid 1 is its job, so the program keeps ordinary signal semantics."""
        check(libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "pdeathsig")
        os.close(alive_w)
        if select.select([alive_r], [], [], 0)[0]:
            os._exit(137)
        if self.pidns and self.mounts:  # only inside our own mount namespace: never cover the host's /proc
            try:
                mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_RDONLY)
            except OSError as e:
                self.notes.append("fresh /proc: %s" % e)
        me = os.getpid()
        prog = os.fork()
        if prog == 0:
            try:
                self.program(me, box_uid)
            except BaseException as e:
                try:
                    self.say(setup_error="%s: %s" % (type(e).__name__, e))
                finally:
                    os._exit(SETUP_FAILED)
        close_all(self.cfg.get("pass_fds", ()))
        while True:
            try:
                pid, wait_status, usage = os.wait4(-1, 0)
            except ChildProcessError:
                os._exit(1)
            if pid == prog:
                self.say(wait_status=wait_status, cpu_s=usage.ru_utime + usage.ru_stime)
                os._exit(0)


def main():
    box = Box(json.loads(sys.argv[1]))
    try:
        box.build()
    except OSError as e:
        box.say(setup_error=str(e))
        sys.exit(SETUP_FAILED)
    alive_r, alive_w = os.pipe()  # the bootstrap holds the write end: EOF means it died
    box_uid = box.cfg["uid_base"] + os.getpid()
    pid = os.fork()
    if pid == 0:
        try:
            box.init(alive_r, alive_w, box_uid)
        except BaseException as e:
            try:
                box.say(setup_error="%s: %s" % (type(e).__name__, e))
            finally:
                os._exit(SETUP_FAILED)
    os.close(alive_r)
    close_all(box.cfg.get("pass_fds", ()))
    while True:
        try:
            os.waitpid(pid, 0)
            break
        except InterruptedError:
            continue


if __name__ == "__main__":
    main()
