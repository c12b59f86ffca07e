"""Stop strings on generated text: pure functions every engine can share."""

from __future__ import annotations


def cut_at_stop(text: str, stop: list[str]) -> tuple[str, bool]:
    """``text`` up to (not including) the earliest stop string, and whether one was found."""
    found = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    if not found:
        return text, False
    return text[: min(found)], True


class StopCutter:
    """Cuts a stream of text pieces at the first stop string.

    Holds back the last ``len(longest stop) - 1`` characters, which could be the
    start of a stop string, until the next piece shows whether they are.
    """

    def __init__(self, stop: list[str]) -> None:
        self.stop = [s for s in stop if s]
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.buffer = ""
        self.stopped = False

    def feed(self, piece: str) -> str:
        """The text that is now safe to show; sets ``stopped`` once a stop string appears."""
        if self.stopped:
            return ""
        self.buffer += piece
        text, hit = cut_at_stop(self.buffer, self.stop)
        if hit:
            self.stopped = True
            self.buffer = ""
            return text
        safe = len(self.buffer) - self.hold
        if safe <= 0:
            return ""
        out, self.buffer = self.buffer[:safe], self.buffer[safe:]
        return out

    def flush(self) -> str:
        """What was held back, at the end of the stream."""
        out, self.buffer = self.buffer, ""
        return "" if self.stopped else out
