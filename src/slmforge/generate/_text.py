"""Text handling every engine shares: chat rendering and stop strings (no torch here)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from slmforge.errors import GenerateError


def render_chat(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """The prompt text the chat template makes of the messages, ending with the assistant's turn opener.

    Raises:
        GenerateError: No chat template, malformed messages, or a template that rejects them.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise GenerateError(
            "This model's tokenizer has no chat template, so it cannot chat. Use plain completion "
            "(`slmforge generate` without --chat), or set tokenizer.chat_template and retrain the tokenizer."
        )
    if not isinstance(messages, list) or not messages:
        raise GenerateError("A chat needs at least one message: [{'role': 'user', 'content': '...'}].")
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise GenerateError(f"Message {i} must be a dict with string 'role' and 'content'; got {m!r}.")
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as exc:  # jinja2 TemplateError and raise_exception() in templates
        raise GenerateError(f"The chat template rejected the messages: {type(exc).__name__}: {exc}") from None


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


def cut_stream(pieces: Iterable[str], stop: list[str], on_close: Callable[[], None]) -> Iterator[str]:
    """Text pieces from an engine's background producer, cut at the first stop string.

    ``on_close`` runs however the consumer leaves (end, stop string, or abandoning the
    iterator): engines use it to cancel and join their generation thread.
    """
    cutter = StopCutter(stop)
    try:
        for piece in pieces:
            text = cutter.feed(piece)
            if text:
                yield text
            if cutter.stopped:
                break
        tail = cutter.flush()
        if tail:
            yield tail
    finally:
        on_close()
