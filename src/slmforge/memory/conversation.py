"""From conversations to memories, and memories back into a prompt.

- ``extract_facts``: facts and preferences a user states about themselves. Rules first ("my name is X",
  "my favorite color is X", "I prefer/like/love/hate X", "I work at/on X", "I live in X", "I use X"), each
  with a subject, so a newer statement about the same subject replaces the older; then, when a
  generator is given, the model's own JSON list (parsed leniently: a small model that writes nothing
  usable leaves the rule results, never an empty hand).
- ``window``: the session's turns that fit a token budget, newest kept; the older ones summarised
  (by the generator, else by their first sentences) into one ``summary`` memory of the session.
- ``context_for``: the system message a grounded chat gets: the user's relevant memories.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

from slmforge.memory.store import MemoryStore, Scope

_RULES: list[tuple[re.Pattern[str], str, str, float]] = [
    (re.compile(r"\bmy name is ([A-Z][\w'-]*(?: [A-Z][\w'-]*)?)", re.I), "fact", "name", 0.9),
    (re.compile(r"\bmy (favou?rite [\w ]{1,30}?) is ([^.,;!?\n]{1,60})", re.I), "preference", "{0}", 0.7),
    (re.compile(r"\bI (?:work|am working) (at|for|on) ([^.,;!?\n]{1,60})", re.I), "fact", "work {0}", 0.7),
    (re.compile(r"\bI live in ([^.,;!?\n]{1,60})", re.I), "fact", "home", 0.7),
    (re.compile(r"\bI (?:really )?(prefer|like|love|hate|dislike) ([^.,;!?\n]{1,60})", re.I), "preference", "", 0.6),
    (re.compile(r"\bI (?:use|am using) ([^.,;!?\n]{1,60})", re.I), "fact", "", 0.5),
    (re.compile(r"\bmy ([a-z][\w ]{1,30}?) is ([^.,;!?\n]{1,60})", re.I), "fact", "{0}", 0.6),
]


def _first_person(match: re.Match[str]) -> str:
    text = match.group(0).strip()
    if re.match(r"my\b", text, re.I):
        return re.sub(r"^my\b", "The user's", text, flags=re.I) + "."
    return f"The user said: {text}."


def rule_facts(text: str) -> list[dict[str, Any]]:
    """Facts and preferences the rules find in a user's message, each with kind, subject and importance."""
    out: list[dict[str, Any]] = []
    taken: list[tuple[int, int]] = []
    for pattern, kind, subject, importance in _RULES:
        for m in pattern.finditer(text):
            if any(a <= m.start() < b for a, b in taken):  # a more specific rule already read this span
                continue
            taken.append(m.span())
            subj = subject.format(*(g.lower().strip() for g in m.groups())) if subject else None
            out.append({"text": _first_person(m), "kind": kind, "subject": subj, "importance": importance})
    return out


_EXTRACT = ("List the lasting facts and preferences the user states about themselves in this message, as JSON: "
            '[{"text": "...", "kind": "fact" or "preference", "subject": "what it is about, in one or two words"}]. '
            "Reply [] if there are none.\n\nMessage: ")
FACTS_SCHEMA = {"type": "array", "maxItems": 6, "items": {
    "type": "object", "properties": {"text": {"type": "string", "minLength": 3, "maxLength": 160},
                                     "kind": {"enum": ["fact", "preference"]},
                                     "subject": {"type": "string", "minLength": 2, "maxLength": 40}},
    "required": ["text", "kind", "subject"], "additionalProperties": False}}


def model_facts(generator: Any, text: str) -> list[dict[str, Any]]:
    """The generator's extraction (greedy, short), each with a subject (so a newer fact about the same
    subject supersedes the older, as the rules' do); [] when it returns nothing parseable. On an engine
    that constrains output the reply is decoded under ``FACTS_SCHEMA``."""
    from slmforge.generate import SamplingParams, chat_json

    messages = [{"role": "user", "content": _EXTRACT + text}]
    params = SamplingParams(max_new_tokens=160, temperature=0.0)
    try:
        reply = chat_json(generator, messages, params, FACTS_SCHEMA)[0].text
        found = json.loads(reply[reply.index("["): reply.rindex("]") + 1])
    except Exception:  # a small model's reply is often not JSON at all: the rules stand alone
        return []
    return [{"text": str(f["text"]).strip(), "kind": f.get("kind") if f.get("kind") in ("fact", "preference")
             else "fact", "subject": " ".join(str(f["subject"]).lower().split()) or None
             if isinstance(f.get("subject"), str) else None, "importance": 0.5}
            for f in found if isinstance(f, dict) and str(f.get("text", "")).strip()]


def remember_conversation(store: MemoryStore, scope: Scope, messages: list[dict[str, Any]], generator: Any = None,
                          session: str | None = None) -> list[int]:
    """Extract and store the user's facts and preferences from ``messages``; returns the memory ids."""
    ids = []
    for m in messages:
        if m.get("role") != "user" or not isinstance(m.get("content"), str):
            continue
        facts = rule_facts(m["content"]) + (model_facts(generator, m["content"]) if generator else [])
        for f in facts:
            ids.append(store.remember(scope, f["text"], f["kind"], f["importance"], f["subject"], session))
    return ids


def _summary(generator: Any, turns: list[dict[str, str]]) -> str:
    transcript = "\n".join(f"{t['role']}: {t['content']}" for t in turns)
    if generator is not None:
        from slmforge.generate import SamplingParams

        try:
            text = generator.chat([{"role": "user", "content": "Summarise this conversation in two sentences:\n\n"
                                    + transcript}], SamplingParams(max_new_tokens=80, temperature=0.0))[0].text.strip()
            if len(text.split()) >= 4:
                return text
        except Exception:  # summarising is best effort: the fallback below always works
            pass
    firsts = [re.split(r"(?<=[.!?])\s", t["content"].strip(), maxsplit=1)[0] for t in turns if t["content"].strip()]
    return "Earlier: " + " / ".join(f"{t['role']}: {s}" for t, s in zip(turns, firsts))[:600]


def window(store: MemoryStore, scope: Scope, session: str, budget: int, count: Callable[[str], int],
           generator: Any = None) -> tuple[list[dict[str, str]], str | None]:
    """The session's newest turns within ``budget`` tokens (``count`` counts a text's tokens), and a summary
    of the older ones (stored as the session's ``summary`` memory), or None when every turn fits."""
    turns = store.turns(scope, session)
    kept: list[dict[str, str]] = []
    used = 0
    for t in reversed(turns):
        n = count(t["content"])
        if kept and used + n > budget:
            break
        kept.insert(0, t)
        used += n
    older = turns[: len(turns) - len(kept)]
    if not older:
        return kept, None
    summary = _summary(generator, older)
    store.remember(scope, summary, "summary", 0.4, subject=f"session {session} summary", session=session)
    return kept, summary


def context_for(store: MemoryStore, scope: Scope, query: str, k: int = 5) -> str | None:
    """A system message listing the memories relevant to ``query`` (None when there are none)."""
    found = [m for m in store.recall(scope, query, k) if m.score > 0]
    if not found:
        return None
    return "What you remember about this user (use it when relevant):\n" + "\n".join(f"- {m.text}" for m in found)
