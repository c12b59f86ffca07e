"""Question sets written by a teacher model, for ``rag eval`` and ``graph eval``.

The template questions of ``rag.evaluate.make_questions`` name what they ask about ("Explain what
`_collections_abc.MutableSet.remove` does."), so keyword retrieval finds them by the name alone and
cannot be told apart from dense or hybrid retrieval. Here a teacher (any ``Generator``: an in-process
GGUF through llama.cpp, or an OpenAI-compatible endpoint such as ``slmforge serve``) writes the questions
a user would ask:

- ``paraphrased_questions``: given one document, a question *without* the document's identifier. A
  question that still names it (``identifier_in``), or is malformed (``malformed``), is dropped and counted
  by reason; the reference answer is the document's first prose paragraph, as for the template set.
- ``linked_questions``: given two documents where the first names the second (a cross-reference in the
  corpus: the second document's full dotted title written in the first's text, found by plain string
  matching, not by the graph's extractor), a question that needs both, with the teacher's reference answer.

Every teacher reply is cached in a JSONL file keyed by the prompt version, the teacher's name and the
documents' text, so a re-run asks the teacher nothing (the filters are applied again on each run, so a
changed filter needs no regeneration).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slmforge.rag.evaluate import Question

PROMPT_VERSION = "1"  # part of every cache key: a changed prompt regenerates
_WORD = re.compile(r"\w+")
_DOTTED = re.compile(r"\b[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+\b")

# Few-shot completion prompts, not chat instructions: a pretrained base model (Gemma 3 270M, the teacher
# available offline here) continues a pattern reliably but ignores instructions, and an instruction-tuned
# model or endpoint continues it just as well. The examples are written by hand and name no stdlib API.
PARAPHRASE_PROMPT = (
    "Each documentation entry is followed by a question a user would ask when they need it, in plain "
    "words, without the entry's name.\n\n"
    "Entry: def shop.Basket.add_item(self, item, quantity=1)\nPut an item in the basket, or raise its "
    "quantity if it is already there.\n"
    "Question: How do I put something in my shopping cart several times at once?\n\n"
    "Entry: class mail.RetryPolicy\nDecides how long to wait before sending a failed message again.\n"
    "Question: What controls the delay before an email that could not be delivered is tried again?\n\n"
    "Entry: def geo.distance_km(a, b)\nReturn the great-circle distance between two points in kilometres.\n"
    "Question: How can I compute how far apart two places on Earth are?\n\n"
    "Entry: {doc}\nQuestion:"
)
LINKED_PROMPT = (
    "Each pair of documentation entries, where the first mentions the second, is followed by a question "
    "that needs both entries, and its answer.\n\n"
    "Entry 1: def shop.checkout(basket)\nCharge the customer for a shop.Basket and empty it.\n"
    "Entry 2: class shop.Basket\nItems a customer has chosen, with their quantities.\n"
    "Question: What does checkout charge for, and what does that object hold?\n"
    "Answer: It charges for a Basket, which holds the items a customer has chosen with their quantities.\n\n"
    "Entry 1: {doc1}\nEntry 2: {doc2}\nQuestion:"
)
_STOP = ["\n\n", "\nEntry", "\nQuestion:"]


@dataclass
class QuestionSet:
    """Questions kept, and how many teacher replies were dropped and why."""

    questions: list[Any]
    asked: int = 0  # documents (or pairs) the set was made from
    generated: int = 0  # teacher calls made in this run (the rest came from the cache)
    dropped: Counter[str] = field(default_factory=Counter)
    _seen: set[str] = field(default_factory=set, repr=False)  # kept questions, normalised

    def tally(self, question: str, why: str | None, item: Any, generated: bool) -> bool:
        """Count one teacher reply: keep ``item`` unless ``why`` (or a repeated question) drops it."""
        self.asked += 1
        self.generated += generated
        key = " ".join(question.lower().split())
        if why is None and key in self._seen:
            why = "duplicate"
        if why:
            self.dropped[why] += 1
            return False
        self._seen.add(key)
        self.questions.append(item)
        return True

    def report(self) -> dict[str, Any]:
        return {"kept": len(self.questions), "asked": self.asked, "generated": self.generated,
                "dropped": dict(self.dropped)}


class _Cache:
    """Teacher replies by key, one JSON object a line; appended as they come, so an interrupted run keeps
    what it had."""

    def __init__(self, path: Path | None) -> None:
        self.path, self.replies = path, {}
        if path is not None and path.is_file():
            for line in path.read_text().splitlines():
                if line.strip():
                    row = json.loads(line)
                    self.replies[row["key"]] = row["reply"]

    def get_or_ask(self, key: str, ask: Any) -> tuple[str, bool]:
        if key in self.replies:
            return self.replies[key], False
        reply = ask()
        self.replies[key] = reply
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as f:
                f.write(json.dumps({"key": key, "reply": reply}, ensure_ascii=False) + "\n")
        return reply, True


def _key(*parts: str) -> str:
    return hashlib.sha256("\x00".join([PROMPT_VERSION, *parts]).encode()).hexdigest()[:24]


def _ask(generator: Any, prompt: str, max_new_tokens: int) -> str:
    """The teacher's continuation of a few-shot prompt, greedy, up to the end of the example."""
    from slmforge.generate import SamplingParams

    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, repetition_penalty=1.1, stop=_STOP)
    return str(generator.complete(prompt, params)[0].text)


def _code_like(part: str) -> bool:
    """An identifier part no plain-English question would contain: underscores, inner capitals, digits."""
    return "_" in part.strip("_") or part.startswith("_") or any(c.isdigit() for c in part) \
        or (any(c.isupper() for c in part[1:]) and any(c.islower() for c in part))


def identifier_in(question: str, title: str) -> bool:
    """Whether the question still names the document's identifier ``title`` (e.g. ``json.JSONDecoder.decode``):
    two of its parts joined by a dot, a code-like part (``JSONDecoder``, ``raw_decode``) as a word, or any
    part written as code (in backticks or quotes, or called: ``decode(``). A plain word such as "decode"
    in prose is allowed: that is what a paraphrase says."""
    parts = [p for p in title.split(".") if p]
    q = question.lower()
    for a, b in zip(parts, parts[1:]):
        if f"{a}.{b}".lower() in q:
            return True
    for part in parts[-2:] if len(parts) > 1 else parts:
        p = re.escape(part.lower())
        if _code_like(part) and re.search(rf"(?<![\w.]){p}(?!\w)", q):
            return True
        if re.search(rf"[`'\"]{p}[`'\"(]|(?<![\w.]){p}\(", q):
            return True
    return False


def malformed(question: str) -> str | None:
    """Why a generated question is unusable (None when it is fine)."""
    words = _WORD.findall(question)
    if not question.endswith("?"):
        return "not_a_question"
    if len(words) < 5:
        return "too_short"
    if len(words) > 40:
        return "too_long"
    if question.count("?") > 1:
        return "several_questions"
    if vague(question):
        return "vague"
    return None


# A question about "this code" ("Is this test case correct?") points at a text the user of a search box
# never saw: a small teacher writes many such. A question is kept when, besides such generic words, it
# still says what it is about: at least two content words of four letters or more, and three when it
# points at "this"/"these"/"the following" (with two, "Is this a good mock for testing?", "What options are
# available for this command?" or "Which of these is NOT a markup language?" fit many documents equally).
_GENERIC = set("""this that these those what which when where does doing done have with from into your about
there their them they will would should could can good best right correct valid wrong work works working
mean means example code program script test case method methods function functions class classes module
object objects thing something anything same name names want need used using use make also other another
only just like more most some many such here than then well way ways value values type types happens
happen different try following statement statements""".split())
_DEICTIC = re.compile(r"\b(?:this|these|those|the following)\b")


def vague(question: str) -> bool:
    """Whether the question names fewer than two things of its own (``_GENERIC`` words aside), or fewer
    than three when it points at a text the reader never saw ("this", "these", "the following")."""
    q = question.lower()
    need = 3 if _DEICTIC.search(q) else 2
    return len({w for w in _WORD.findall(q) if len(w) >= 4 and w not in _GENERIC}) < need


def _first_question(reply: str) -> str:
    """The reply's first question, its wrapped lines joined (or its first line when it asks nothing)."""
    text = " ".join(re.sub(r"^\s*(?:question\s*\d*\s*:)?\s*", "", reply.strip(), flags=re.I).split())
    end = text.find("?")
    return text[: end + 1] if 0 <= end < 300 else (reply.strip().splitlines() or [""])[0].strip()


def _entry(text: str, chars: int) -> str:
    """A document as one few-shot entry: blank lines squeezed (a blank line ends an example)."""
    return re.sub(r"\n\s*\n+", "\n", text.strip())[:chars]


def _reference(doc: Any) -> str:
    from slmforge.data.synth import paragraphs

    return next((p for p in paragraphs(doc.text) if len(_WORD.findall(p)) >= 5), "")[:700]


def paraphrased_questions(documents: Sequence[Any], generator: Any, name: str, n: int = 200, seed: int = 0,
                          cache: Path | None = None, max_documents: int | None = None,
                          progress: bool = True) -> QuestionSet:
    """Up to ``n`` questions that describe a document without naming it, one per document (documents drawn
    by ``seed``, as ``make_questions`` draws them), asking at most ``max_documents`` (default ``2 * n``).

    Args:
        documents: Data-stage documents (their ``title`` is the identifier a question must not contain).
        generator: The teacher.
        name: The teacher's name, part of the cache key (another teacher regenerates).
        cache: JSONL file of the teacher's replies (None: no cache).

    Returns:
        The kept questions (reference: the document's first prose paragraph) and the drop counts by reason
        (``names_identifier``, ``not_a_question``, ``too_short``, ``too_long``, ``several_questions``,
        ``vague``, ``duplicate``).
    """
    from slmforge._progress import progress_bar

    docs = [d for d in documents if _reference(d)]
    random.Random(seed).shuffle(docs)
    docs = docs[: max_documents or 2 * n]
    store, result = _Cache(cache), QuestionSet([])
    with progress_bar(progress) as bar:
        task = bar.add_task("teacher: paraphrased questions", total=n, info="")
        for d in docs:
            if len(result.questions) == n:
                break
            title = d.title or d.id
            prompt = PARAPHRASE_PROMPT.format(doc=_entry(d.text, 600))
            reply, asked = store.get_or_ask(_key("paraphrase", name, title, d.text), lambda: _ask(generator, prompt, 60))
            q = _first_question(reply)
            why = "names_identifier" if identifier_in(q, title) else malformed(q)
            bar.update(task, advance=result.tally(q, why, Question(q, _reference(d), d.id), asked))
            bar.update(task, info=f"{result.asked} asked, {sum(result.dropped.values())} dropped")
    return result


def linked_pairs(documents: Sequence[Any], n: int = 100, seed: int = 0) -> list[tuple[Any, Any]]:
    """Pairs (first, second) where the first document's text names the second's full dotted title (and the
    two are not one inside the other, like a class and its method): the corpus's own cross-references.
    At most one pair per first document and per second document, drawn by ``seed``."""
    by_title = {d.title: d for d in documents if d.title and "." in d.title}
    pairs: list[tuple[Any, Any]] = []
    for d in documents:
        own = d.title or ""
        for name in dict.fromkeys(_DOTTED.findall(d.text)):
            other = by_title.get(name)
            parent = name.rsplit(".", 1)[0]
            if other is None or other is d or name.startswith(own + ".") or own.startswith(name + ".") \
                    or ("." in parent and parent == own.rsplit(".", 1)[0]):  # methods of one class: one subject
                continue
            pairs.append((d, other))
    random.Random(seed).shuffle(pairs)
    out, used = [], set()
    for a, b in pairs:
        if a.id in used or b.id in used:
            continue
        used |= {a.id, b.id}
        out.append((a, b))
        if len(out) == n:
            break
    return out


def _parse_linked(reply: str) -> tuple[str, str]:
    m = re.search(r"^(.+?)\n\s*answer\s*:\s*(.+)", reply.strip(), flags=re.I | re.S)
    if not m:
        return "", ""
    return " ".join(m.group(1).split()).strip('*" '), " ".join(m.group(2).split()).strip('*" ')


def linked_questions(documents: Sequence[Any], generator: Any, name: str, n: int = 100, seed: int = 0,
                     cache: Path | None = None, progress: bool = True) -> QuestionSet:
    """Up to ``n`` two-document questions with reference answers, written by the teacher from the corpus's
    cross-references (``linked_pairs``); each is a dict ``{"question", "answer", "docs": [first, second]}``.
    Replies without a question and an answer, malformed questions and answers under 3 words are dropped
    and counted (``unparsed``, the ``malformed`` reasons, ``short_answer``, ``duplicate``)."""
    from slmforge._progress import progress_bar

    pairs = linked_pairs(documents, 2 * n, seed)
    store, result = _Cache(cache), QuestionSet([])
    with progress_bar(progress) as bar:
        task = bar.add_task("teacher: two-document questions", total=n, info="")
        for a, b in pairs:
            if len(result.questions) == n:
                break
            prompt = LINKED_PROMPT.format(doc1=_entry(a.text, 600), doc2=_entry(b.text, 600))
            reply, asked = store.get_or_ask(_key("linked", name, a.text, b.text), lambda: _ask(generator, prompt, 120))
            q, ans = _parse_linked(reply)
            why = "unparsed" if not q else malformed(q) or ("short_answer" if len(_WORD.findall(ans)) < 3 else None)
            item = {"question": q, "answer": ans, "docs": [a.id, b.id], "link": b.title}
            bar.update(task, advance=result.tally(q, why, item, asked))
            bar.update(task, info=f"{result.asked} asked, {sum(result.dropped.values())} dropped")
    return result
