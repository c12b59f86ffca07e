"""``python -m slmforge.ui._worker JOBDIR``: runs one dashboard job (``_jobs.start``) to its end.

It lives in its own session, so the job outlives the page and the dashboard. It waits for the command
and writes ``exit.json``; a cancel interrupts the whole process group, and the worker survives that
signal (a handler, not SIG_IGN, which the command would inherit) to record how the command ended.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from slmforge.ui._jobs import environment


def main(folder: Path) -> int:
    spec = json.loads((folder / "job.json").read_text(encoding="utf-8"))
    cancelled = False

    def note(signum, frame):  # the group's SIGINT/SIGTERM reached the command too
        nonlocal cancelled
        cancelled = True

    signal.signal(signal.SIGINT, note)
    signal.signal(signal.SIGTERM, note)
    with (folder / "log.txt").open("ab") as log:
        try:
            child = subprocess.Popen(spec["argv"], cwd=spec["cwd"], env=environment(folder), stdin=subprocess.DEVNULL,
                                     stdout=log, stderr=subprocess.STDOUT)
            returncode = child.wait()  # PEP 475: a signal handled above does not end the wait
        except OSError as exc:
            log.write(f"could not start {spec['argv']}: {exc}\n".encode())
            returncode = 127
    ended = {"returncode": returncode, "cancelled": cancelled or (folder / "cancel").exists(), "finished": time.time()}
    tmp = folder / "exit.json.tmp"
    tmp.write_text(json.dumps(ended), encoding="utf-8")
    tmp.replace(folder / "exit.json")
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
