"""Constrained decoding: JSON schemas, regular expressions and OpenAI-style tool calls.

A ``Constraint`` is a regular expression compiled once against a tokenizer's
vocabulary (an ``outlines_core`` index: for each automaton state, the token ids
that keep the text a prefix of a match). It is cached and safe to share between
threads. Each generated sequence gets its own ``ConstraintState``; the decode
loop asks it for the allowed ids (or lets it mask a logits row), samples, and
advances it with the chosen id:

    constraint = json_schema_constraint(tokenizer, schema)
    state = constraint.start(max_tokens)               # raises if max_tokens < constraint.min_tokens
    while not state.finished:
        logits = model_step(...)                       # [V]
        state.mask_logits_(logits, eos_ids)
        token = sample(logits)
        if token in eos_ids:
            break                                      # only sampled when state.can_end
        state.advance(token)

Given a token budget (``constraint.start(max_tokens)``), a state allows only tokens after
which the shortest completion still fits in the tokens left. Each compiled constraint
holds, per automaton state, that fewest number of tokens to a complete text (a breadth-first
search backwards over the index's transitions, run once at compile time), so a small model
that would write a string until ``max_tokens`` is steered to close it, and every reply
parses: a structure cannot be cut half-way.

JSON is generated compact (no whitespace between tokens): a small model left free
to add whitespace tends to emit it forever. Schema keywords that the regex cannot
enforce (``minimum``, ``uniqueItems``, ``not``...) are refused with a
``GenerateError`` rather than silently ignored, so constrained output always
validates against the schema it was asked for.

The tool-calling half is pure Python (no torch): it validates OpenAI ``tools`` and
``tool_choice``, writes the system prompt that describes the tools, turns an
OpenAI conversation into plain ChatML messages, and parses a call back out of the
generated text. A call is written as one JSON object
``{"name": ..., "arguments": {...}}`` alone; parallel calls, as a JSON array of them.
"""

from __future__ import annotations

import copy
import json
import re
import threading
import weakref
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from typing import TYPE_CHECKING, Any

from slmforge.errors import GenerateError

if TYPE_CHECKING:
    import torch

__all__ = [
    "Constraint",
    "ConstraintState",
    "chat_messages_for_template",
    "check_tools",
    "json_schema_constraint",
    "mask_logits_rows_",
    "parallel_calls",
    "parse_tool_call",
    "parse_tool_calls",
    "regex_constraint",
    "tool_call_schema",
    "tool_constraint",
    "tools_system_prompt",
    "validate_json",
]

# No whitespace between JSON tokens: small models loop on free whitespace.
_WHITESPACE = ""
# Chat end-of-turn tokens that also end a constrained answer, when the tokenizer has them.
_END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")
# Free text under tool_choice "auto": an optional space (SentencePiece models start words
# with one), then a character that is neither whitespace nor "{", then anything. It never
# matches the empty string: an index whose start state is final loses the start state's
# transitions in outlines_core 0.2.14.
_FREE_TEXT = r" ?[^{\s][\s\S]*"
_TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_CACHE_SIZE = 64
# Nesting of response_format json_object: values may be arrays/objects of arrays/objects of
# scalars. outlines_core's automaton grows ~4x per level: depth 1 compiles in 0.1 s, depth 2
# in ~4 s (cached afterwards), depth 3 in minutes.
_JSON_OBJECT_DEPTH = 1  # 2 takes ~4.5 s to compile per tokenizer; 3 minutes at 3

# Keywords a regex enforces (outlines_core's builder honours them).
_SUPPORTED = frozenset({
    "type", "properties", "required", "additionalProperties", "items", "prefixItems", "minItems",
    "maxItems", "minLength", "maxLength", "pattern", "format", "enum", "const", "anyOf", "oneOf",
    "allOf", "$ref", "$defs", "definitions",
})
# Keywords that only annotate; safe to ignore.
_ANNOTATIONS = frozenset({
    "title", "description", "default", "examples", "$schema", "$id", "$comment", "$anchor",
    "deprecated", "readOnly", "writeOnly", "contentMediaType", "contentEncoding", "strict",
})
# Keywords a regex cannot enforce (outlines_core ignores them silently, so output would
# not validate): refused.
_UNSUPPORTED = frozenset({
    "not", "if", "then", "else", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum",
    "multipleOf", "uniqueItems", "contains", "minContains", "maxContains", "minProperties",
    "maxProperties", "patternProperties", "propertyNames", "dependentRequired", "dependentSchemas",
    "dependencies", "unevaluatedProperties", "unevaluatedItems", "additionalItems", "$dynamicRef",
    "$dynamicAnchor", "$recursiveRef", "$recursiveAnchor",
})
_FORMATS = frozenset({"date", "date-time", "time", "uri", "email", "uuid"})


# --------------------------------------------------------------------------- vocabulary


def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's printable-unicode -> byte table (the inverse of ``bytes_to_unicode``)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {v: k for k, v in bytes_to_unicode().items()}


def _decoder_kind(tokenizer: Any) -> str:
    """``"byte_level"`` or ``"sentencepiece"``, read from the fast tokenizer's decoder.

    Raises:
        GenerateError: Not a fast tokenizer, or a decoder whose token text cannot be mapped
            back to bytes (WordPiece, no decoder...).
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise GenerateError(
            f"Constrained decoding needs a fast (Rust `tokenizers`) tokenizer; got {type(tokenizer).__name__}. "
            "Load the model's tokenizer.json with transformers' fast tokenizer."
        )
    decoder = json.loads(backend.to_str()).get("decoder") or {}
    parts = decoder.get("decoders", [decoder]) if decoder.get("type") == "Sequence" else [decoder]
    types = [p.get("type") for p in parts]
    if "ByteLevel" in types:
        return "byte_level"
    spiece = "Metaspace" in types or "ByteFallback" in types or any(
        p.get("type") == "Replace" and (p.get("pattern") or {}).get("String") == "\u2581" for p in parts
    )
    if spiece:
        return "sentencepiece"
    raise GenerateError(
        f"Constrained decoding cannot map this tokenizer's tokens to bytes: its decoder is {types or 'missing'}, "
        "and only byte-level BPE (GPT-2 style, decoder ByteLevel) and SentencePiece-style vocabularies "
        "('\u2581' for a space, <0xNN> byte tokens) are supported. Use response_format text, or a model with "
        "one of those tokenizers."
    )


_NON_REGULAR = re.compile(r"\(\?<?[=!]|(?<!\\)(?:\\\\)*\\[1-9]|\\k<")
_UNICODE_DIGIT = re.compile(r"(?<!\\)((?:\\\\)*)\\d")
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _token_bytes(tokenizer: Any) -> dict[bytes, list[int]]:
    """Map the bytes each non-special token stands for to its ids (several ids may share bytes).

    Raises:
        GenerateError: The vocabulary cannot be mapped (see ``_decoder_kind``), or a byte-level
            token holds a character outside the byte alphabet.
    """
    kind = _decoder_kind(tokenizer)
    special = set(tokenizer.all_special_ids)
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    special |= {i for i, t in added.items() if getattr(t, "special", False)}
    added_text = {i for i in added if i not in special}  # matched verbatim in text, never byte-mapped
    u2b = _byte_level_decoder() if kind == "byte_level" else {}
    out: dict[bytes, list[int]] = {}
    for text, i in tokenizer.get_vocab().items():
        if i in special:
            continue
        if i in added_text:
            data = text.encode("utf-8")
        elif kind == "byte_level":
            try:
                data = bytes(u2b[c] for c in text)
            except KeyError as e:
                raise GenerateError(
                    f"Token {text!r} (id {i}) holds the character {e.args[0]!r}, which is not in the byte-level "
                    "alphabet its ByteLevel decoder expects, so constrained decoding cannot tell which bytes it "
                    "stands for. The tokenizer.json looks inconsistent; retrain or re-export the tokenizer."
                ) from None
        else:
            m = _BYTE_TOKEN.fullmatch(text)
            data = bytes([int(m.group(1), 16)]) if m else text.replace("\u2581", " ").encode("utf-8")
        if data:
            out.setdefault(data, []).append(i)
    if not out:
        raise GenerateError("The tokenizer has no ordinary (non-special) tokens; nothing can be generated.")
    return out


def _default_eos_ids(tokenizer: Any) -> tuple[int, ...]:
    """The model's eos id, then the chat end-of-turn tokens the vocabulary has."""
    ids: list[int] = []
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    vocab = tokenizer.get_vocab()
    for text in _END_OF_TURN_TOKENS:
        if text in vocab and vocab[text] not in ids:
            ids.append(int(vocab[text]))
    return tuple(ids)


class _Lru:
    """A small thread-safe LRU map. Values hold a strong reference to the tokenizer whose
    ``id()`` is in the key, so that id cannot be reused by another object while cached."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._items: OrderedDict[Hashable, tuple[Any, Any]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable, owner: Any) -> Any | None:
        with self._lock:
            item = self._items.get(key)
            if item is None or item[0] is not owner:
                return None
            self._items.move_to_end(key)
            return item[1]

    def put(self, key: Hashable, owner: Any, value: Any) -> None:
        with self._lock:
            self._items[key] = (owner, value)
            self._items.move_to_end(key)
            while len(self._items) > self._size:
                self._items.popitem(last=False)


_VOCABS = _Lru(8)
_CONSTRAINTS = _Lru(_CACHE_SIZE)
_BUILD_LOCKS: weakref.WeakValueDictionary[Hashable, threading.Lock] = weakref.WeakValueDictionary()
_BUILD_LOCKS_LOCK = threading.Lock()


def _build_lock(key: Hashable) -> threading.Lock:
    """The lock that lets one thread build the constraint of ``key`` while others wait for it."""
    with _BUILD_LOCKS_LOCK:
        lock = _BUILD_LOCKS.get(key)
        if lock is None:
            lock = _BuildLock()
            _BUILD_LOCKS[key] = lock
        return lock


class _BuildLock:
    """A lock a WeakValueDictionary can hold (``threading.Lock`` objects take no weak references)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def __enter__(self) -> None:
        self._lock.acquire()

    def __exit__(self, *exc: object) -> None:
        self._lock.release()


def _vocabulary(tokenizer: Any, eos_ids: tuple[int, ...]) -> Any:
    import outlines_core as oc

    key = ("vocab", id(tokenizer), eos_ids)
    vocab = _VOCABS.get(key, tokenizer)
    if vocab is None:
        mapping = _token_bytes(tokenizer)
        ends = set(eos_ids)
        for data in list(mapping):  # an end id is never also ordinary text
            mapping[data] = [i for i in mapping[data] if i not in ends]
            if not mapping[data]:
                del mapping[data]
        vocab = oc.Vocabulary(eos_ids[0], mapping)
        _VOCABS.put(key, tokenizer, vocab)
    return vocab


# --------------------------------------------------------------------------- constraint


class _Step:
    """What one automaton state allows: ordinary ids (no end ids) and whether the text may end.

    ``next_dist`` (filled when a budget first gets tight in this state) is, for each id, the
    fewest tokens that complete the text after it; ``budgeted`` caches the narrower steps of
    that state per number of tokens left.
    """

    __slots__ = ("budgeted", "by_device", "can_end", "ids", "next_dist")

    def __init__(self, ids: torch.Tensor, can_end: bool) -> None:
        self.ids = ids
        self.can_end = can_end
        self.by_device: dict[tuple[str, int, tuple[int, ...]], torch.Tensor] = {}
        self.next_dist: torch.Tensor | None = None
        self.budgeted: dict[int, _Step] = {}

    def on(self, device: torch.device, vocab_size: int, eos_ids: tuple[int, ...]) -> torch.Tensor:
        """The allowed ids below ``vocab_size`` on ``device``, with ``eos_ids`` when the text
        may end (cached, so a GPU step copies nothing from the host)."""
        key = (str(device), vocab_size, eos_ids)
        ids = self.by_device.get(key)
        if ids is None:
            import torch

            ids = self.ids[self.ids < vocab_size]
            if self.can_end:
                ends = torch.tensor([e for e in eos_ids if 0 <= e < vocab_size], dtype=torch.long)
                ids = torch.cat([ids, ends])
            ids = ids.to(device)
            self.by_device[key] = ids
        return ids


_UNREACHABLE = 1 << 30  # "no complete text from here": larger than any budget


def _distances(index: Any, initial: int, final: frozenset[int], eos: int) -> tuple[dict[int, int], dict[int, int]]:
    """For each automaton state, the fewest tokens that complete the text from it (0 in a final
    state), and the largest such count over the states one token away.

    One pass over every (state, token) transition to collect each state's distinct successors,
    then a breadth-first search backwards from the final states. It runs once per compiled
    constraint: 2-25 ms for small JSON schemas over an 8,192-token vocabulary here (a third to
    two thirds of the outlines-core index build, itself 10-60 ms), 0.1-0.5 s over 262,144 tokens
    (4-11% of the index build; benchmarks/structured_budget.py). Memory stays per state: a
    Gemma-sized vocabulary never holds every transition in Python at once.
    """
    from collections import deque

    successors: dict[int, set[int]] = {}
    todo = [initial]
    while todo:
        state = todo.pop()
        if state in successors:
            continue
        nxt = index.get_next_state
        succ = {nxt(state, t) for t in index.get_allowed_tokens(state) if t != eos}
        succ.discard(None)
        successors[state] = succ
        todo.extend(n for n in succ if n not in successors)
    predecessors: dict[int, list[int]] = {}
    for state, succ in successors.items():
        for n in succ:
            predecessors.setdefault(n, []).append(state)
    dist = {s: 0 for s in successors if s in final}
    queue = deque(dist)
    while queue:
        state = queue.popleft()
        for p in predecessors.get(state, ()):
            if p not in dist:
                dist[p] = dist[state] + 1
                queue.append(p)
    max_next = {s: max((dist.get(n, _UNREACHABLE) for n in succ), default=0) for s, succ in successors.items()}
    return dist, max_next


class Constraint:
    """A regular expression compiled against one tokenizer's vocabulary.

    Compiled once (see ``json_schema_constraint``, ``regex_constraint``,
    ``tool_constraint``, which cache), immutable apart from per-state caches of
    allowed-id tensors (also per number of tokens left, where a budget narrows them),
    and safe to share between threads. Start one ``ConstraintState`` per generated
    sequence; ``min_tokens`` is the shortest budget a start accepts.

    Attributes:
        regex: The regular expression the generated text must match in full.
        eos_ids: The end ids ``allowed_ids`` adds when the text may end, and that
            ``advance`` accepts as "end".
    """

    def __init__(self, regex: str, index: Any, eos_ids: tuple[int, ...]) -> None:
        self.regex = regex
        self.eos_ids = eos_ids
        self._index = index
        self._initial: int = index.get_initial_state()
        self._final = frozenset(index.get_final_states())
        self._steps: dict[int, _Step] = {}
        self._dist, self._max_next = _distances(index, self._initial, self._final, eos_ids[0])

    @property
    def min_tokens(self) -> int:
        """The fewest tokens of any complete text (the shortest valid reply), end id not counted."""
        return self._dist.get(self._initial, _UNREACHABLE)

    def start(self, max_tokens: int | None = None) -> ConstraintState:
        """A fresh state at the beginning of the text.

        Args:
            max_tokens: The most tokens the text may take (end id not counted). The state
                then only allows tokens after which a complete text still fits in the tokens
                left, so the text is complete when they run out. None: no budget.

        Raises:
            GenerateError: ``max_tokens`` is smaller than ``min_tokens``.
        """
        if max_tokens is not None and max_tokens < self.min_tokens:
            raise GenerateError(
                f"max_tokens is {max_tokens}, but the shortest reply that completes this structure takes "
                f"{self.min_tokens} tokens with this tokenizer; ask for max_tokens >= {self.min_tokens}."
            )
        return ConstraintState(self, max_tokens)

    def _step(self, state: int) -> _Step:
        step = self._steps.get(state)
        if step is None:  # a race only computes the same value twice
            import torch

            eos = self._index_eos
            ids = sorted(i for i in self._index.get_allowed_tokens(state) if i != eos)
            step = _Step(torch.tensor(ids, dtype=torch.long), state in self._final)
            self._steps[state] = step
        return step

    def _ended_step(self) -> _Step:
        """The pseudo-state after an end id: only end ids allowed."""
        step = self._steps.get(-1)
        if step is None:
            import torch

            step = _Step(torch.zeros(0, dtype=torch.long), True)
            self._steps[-1] = step
        return step

    @property
    def _index_eos(self) -> int:
        return self.eos_ids[0]

    def _next(self, state: int, token_id: int) -> int | None:
        return self._index.get_next_state(state, token_id)

    def _tight(self, state: int, left: int) -> bool:
        """With ``left`` tokens left, some allowed token here would leave too few to complete."""
        return left - 1 < self._max_next.get(state, 0)

    def _budget_step(self, state: int, left: int) -> _Step:
        """The ids of ``state`` after which a complete text still fits in ``left - 1`` tokens."""
        step = self._step(state)
        narrow = step.budgeted.get(left)
        if narrow is None:  # a race only computes the same value twice
            import torch

            if step.next_dist is None:
                nxt, dist = self._index.get_next_state, self._dist
                step.next_dist = torch.tensor(
                    [dist.get(nxt(state, i), _UNREACHABLE) for i in step.ids.tolist()], dtype=torch.long)
            narrow = _Step(step.ids[step.next_dist <= left - 1], step.can_end)
            step.budgeted[left] = narrow
        return narrow


class ConstraintState:
    """Where one generated sequence stands in its constraint. Not thread-safe: one per sequence.

    With a token budget (``Constraint.start(max_tokens)``) every step allows only tokens
    after which the shortest completion still fits in the tokens left: a string, number or
    object is closed in time, so the text is complete when the budget runs out.
    """

    def __init__(self, constraint: Constraint, max_tokens: int | None = None) -> None:
        self._constraint = constraint
        self._state = constraint._initial
        self._ended = False
        self._left = max_tokens
        self._shortened = False

    @property
    def tokens_left(self) -> int | None:
        """Tokens the text may still take (None: no budget)."""
        return self._left

    @property
    def shortened(self) -> bool:
        """The budget decided: at some step it removed a token the constraint allowed (the
        text was steered to its shortest ending), or it ran out where the text could go on.
        A reply that is complete only because of this finishes with reason ``length``."""
        if self._shortened:
            return True
        return self._left == 0 and not self._ended and self._constraint._step(self._state).ids.numel() > 0

    @property
    def can_end(self) -> bool:
        """The text so far is a complete match: an end id may be sampled now."""
        return self._ended or self._constraint._step(self._state).can_end

    @property
    def finished(self) -> bool:
        """The text is complete and nothing may follow it (or the budget is spent): the caller
        stops the sequence."""
        if self._ended:
            return True
        step = self._current()
        return step.can_end and step.ids.numel() == 0

    def _current(self) -> _Step:
        """What this step allows, narrowed to the budget."""
        c = self._constraint
        if self._ended:
            return c._ended_step()
        if self._left is not None and c._tight(self._state, self._left):
            return c._budget_step(self._state, self._left)
        return c._step(self._state)

    def allowed_ids(self) -> torch.Tensor:
        """The token ids allowed at this step (1-D long tensor on the CPU, never empty).

        The constraint's ``eos_ids`` are included when the text may end; once
        ``finished``, only they are.
        """
        import torch

        step = self._current()
        if self._ended:
            return torch.tensor(self._constraint.eos_ids, dtype=torch.long)
        if step.can_end:
            return torch.cat([step.ids, torch.tensor(self._constraint.eos_ids, dtype=torch.long)])
        return step.ids

    def mask_logits_(self, logits: torch.Tensor, eos_ids: Sequence[int]) -> None:
        """Set every disallowed entry of one logits row to -inf, in place.

        Args:
            logits: A 1-D row ``[V]`` on any device; ids at or above the tokenizer's
                vocabulary (padding rows of the output layer) are disallowed.
            eos_ids: The caller's end ids; allowed only when the text may end.

        Raises:
            GenerateError: ``logits`` is not 1-D, or no id of this row is allowed (the
                row is shorter than the vocabulary the constraint needs).
        """
        if logits.dim() != 1:
            raise GenerateError(f"mask_logits_ takes one logits row [V]; got shape {tuple(logits.shape)}.")
        ids = self._ids_on(logits.device, logits.shape[0], tuple(int(e) for e in eos_ids))
        keep = logits.index_select(0, ids)
        logits.fill_(float("-inf"))
        logits.index_copy_(0, ids, keep)

    def _ids_on(self, device: torch.device, vocab_size: int, ends: tuple[int, ...]) -> torch.Tensor:
        """The allowed ids of a ``vocab_size``-wide row on ``device``, end ids included when the
        text may end.

        Raises:
            GenerateError: No id of such a row is allowed.
        """
        ids = self._current().on(device, vocab_size, ends)
        if ids.numel() == 0:
            raise GenerateError(
                f"No token of this {vocab_size}-wide logits row is allowed by the constraint (the row is narrower "
                "than the tokenizer's vocabulary, or no end id was given for a finished text)."
            )
        return ids

    def advance(self, token_id: int) -> None:
        """Move past one sampled token.

        An id in the constraint's ``eos_ids`` ends the text (then ``finished`` is True).
        A caller whose end ids differ from the constraint's (pass the same ``eos_ids`` to
        the factory to avoid that) simply stops without advancing on an end id.

        Raises:
            GenerateError: The token was not allowed at this step.
        """
        token_id = int(token_id)
        if token_id in self._constraint.eos_ids:
            if not self.can_end:
                raise GenerateError(f"End id {token_id} was sampled before the constrained text was complete.")
            self._ended = True
            return
        c = self._constraint
        nxt = None if self._ended else c._next(self._state, token_id)
        if nxt is not None and self._left is not None and c._dist.get(nxt, _UNREACHABLE) > self._left - 1:
            raise GenerateError(
                f"Token id {token_id} leaves too few of the {self._left} tokens left to complete the "
                "constrained text; mask the logits with mask_logits_ (or sample from allowed_ids) before advancing."
            )
        if nxt is None:
            raise GenerateError(
                f"Token id {token_id} is not allowed by the constraint at this step; mask the logits with "
                "mask_logits_ (or sample from allowed_ids) before advancing."
            )
        if self._left is not None:
            self._shortened = self._shortened or c._tight(self._state, self._left)
            self._left -= 1
        self._state = nxt


def mask_logits_rows_(
    logits: torch.Tensor, states: Sequence[ConstraintState | None], eos_ids: Sequence[int]
) -> None:
    """``mask_logits_`` for a batch ``[B, V]``: on an accelerator in a fixed number of kernels
    (not three per row), on the CPU row by row.

    Args:
        logits: The batch's last-position logits ``[B, V]``, masked in place.
        states: One entry per row; None leaves that row unconstrained.
        eos_ids: The caller's end ids.

    Raises:
        GenerateError: ``logits`` is not 2-D, ``states`` has another length, or a row has
            no allowed id.
    """
    if logits.dim() != 2 or logits.shape[0] != len(states):
        raise GenerateError(
            f"mask_logits_rows_ takes logits [B, V] and B states; got shape {tuple(logits.shape)} and "
            f"{len(states)} states."
        )
    rows = [r for r, st in enumerate(states) if st is not None]
    if not rows:
        return
    ends = tuple(int(e) for e in eos_ids)
    cols = [states[r]._ids_on(logits.device, logits.shape[1], ends) for r in rows]  # type: ignore[union-attr]
    if logits.device.type == "cpu":  # no launch overhead to save; row by row is ~2x faster there
        for r, ids in zip(rows, cols, strict=True):
            keep = logits[r].index_select(0, ids)
            logits[r].fill_(float("-inf"))
            logits[r].index_copy_(0, ids, keep)
        return
    _mask_rows_fused(logits, rows, cols)


def _mask_rows_fused(logits: torch.Tensor, rows: list[int], cols: list[torch.Tensor]) -> None:
    """Mask ``rows`` of ``logits`` to their allowed ``cols`` in a fixed number of kernels."""
    import torch

    meta = torch.tensor(rows + [c.numel() for c in cols], dtype=torch.long)
    if logits.device.type == "cuda":
        meta = meta.pin_memory().to(logits.device, non_blocking=True)
    row_ids, counts = meta[: len(rows)], meta[len(rows):]
    flat_cols = torch.cat(cols)
    flat_rows = torch.repeat_interleave(row_ids, counts, output_size=flat_cols.numel())
    keep = logits[flat_rows, flat_cols]
    logits.index_fill_(0, row_ids, float("-inf"))
    logits[flat_rows, flat_cols] = keep


def _canonical(value: Any) -> str:
    """A cache key for JSON data: the same data gives the same string whatever its key order."""
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"))
    except (TypeError, ValueError):
        raise GenerateError(f"Expected JSON data (a schema, tools, tool_choice); got {value!r:.200}.") from None


def _eos_key(eos_ids: Sequence[int] | None) -> tuple[int, ...] | None:
    return None if not eos_ids else tuple(int(e) for e in eos_ids)


def _compile(tokenizer: Any, regex: str, eos_ids: Sequence[int] | None, what: str) -> Constraint:
    """Compile ``regex`` for ``tokenizer``, cached by (tokenizer, regex, eos ids)."""
    import outlines_core as oc

    eos = tuple(int(e) for e in eos_ids) if eos_ids else _default_eos_ids(tokenizer)
    if not eos:
        raise GenerateError(
            "Constrained decoding needs an end-of-text id, and this tokenizer has no eos token; pass eos_ids."
        )
    key = ("regex", id(tokenizer), eos, regex)
    constraint = _CONSTRAINTS.get(key, tokenizer)
    if constraint is not None:
        return constraint
    # One build per regex: requests that arrive together for a new schema wait for the first one's
    # index instead of each compiling it (seconds for deep schemas) on the same cores.
    with _build_lock(key):
        constraint = _CONSTRAINTS.get(key, tokenizer)
        if constraint is not None:
            return constraint
        vocab = _vocabulary(tokenizer, eos)
        try:
            index = oc.Index(regex, vocab)
        except ValueError as e:  # "Failed to build DFA ..." for look-around, back-references, bad syntax
            raise GenerateError(
                f"Cannot compile {what} for constrained decoding: {e}. Regexes use Rust syntax without "
                "look-around or back-references."
            ) from None
        constraint = Constraint(regex, index, eos)
        if constraint._initial in constraint._final:
            # outlines_core 0.2.14 drops the start state's transitions when it is final.
            raise GenerateError(
                f"{what[:1].upper()}{what[1:]} matches the empty text, which constrained decoding cannot "
                "compile reliably; make it require at least one character."
            )
        if not constraint._step(constraint._initial).ids.numel():
            raise GenerateError(
                f"{what[:1].upper()}{what[1:]} cannot be generated with this tokenizer: no token can start it."
            )
        _CONSTRAINTS.put(key, tokenizer, constraint)
    return constraint


# --------------------------------------------------------------------------- JSON schema


def _check_supported(schema: Any, where: str, defs_ok: bool = True) -> None:
    """Refuse schema keywords the regex builder would ignore or mishandle.

    Raises:
        GenerateError: Naming the keyword and where it is (``where`` is a JSON-pointer-like path).
    """
    if schema is True:
        return
    if schema is False or not isinstance(schema, dict):
        raise GenerateError(
            f"The schema at {where} is {json.dumps(schema)}; constrained decoding needs an object schema there "
            "(true/{} for any value)."
        )
    for key, value in schema.items():
        at = f"{where}/{key}"
        if key in _UNSUPPORTED:
            raise GenerateError(
                f"JSON schema keyword '{key}' at {at} is not supported by constrained decoding: the generated text "
                "could not be guaranteed to satisfy it. Remove it (and check the value after generation), or "
                "express it with supported keywords (type, properties, required, enum, const, anyOf, items, "
                "minItems/maxItems, minLength/maxLength, pattern, format)."
            )
        if key not in _SUPPORTED and key not in _ANNOTATIONS and not key.startswith("x-"):
            raise GenerateError(f"JSON schema keyword '{key}' at {at} is unknown to constrained decoding.")
        if key == "format" and value not in _FORMATS:
            raise GenerateError(
                f"JSON schema format {value!r} at {at} is not supported by constrained decoding; supported "
                f"formats: {', '.join(sorted(_FORMATS))}."
            )
        if key == "pattern" and _NON_REGULAR.search(value):
            raise GenerateError(
                f"JSON schema pattern {value!r} at {at} uses look-around or a back-reference, which constrained "
                "decoding cannot enforce; rewrite it without them."
            )
        if key == "$ref" and not (value.startswith(("#/$defs/", "#/definitions/")) or value == "#"):
            raise GenerateError(
                f"JSON schema $ref {value!r} at {at} is not supported: only references into this schema's "
                "$defs (or definitions) are."
            )
        if key == "allOf" and len(value) > 1:
            raise GenerateError(
                f"JSON schema keyword 'allOf' with {len(value)} subschemas at {at} is not supported by constrained "
                "decoding (only a single subschema is); merge the subschemas into one."
            )
        if key == "required" and isinstance(schema.get("properties"), dict):
            missing = [k for k in value if k not in schema["properties"]]
            if missing:
                raise GenerateError(
                    f"The schema at {where} requires {missing} but does not list them in 'properties', so "
                    "constrained decoding cannot write them; describe them under 'properties'."
                )
        if key in ("properties", "$defs", "definitions"):
            for name, sub in value.items():
                _check_supported(sub, f"{at}/{name}")
        elif key in ("anyOf", "oneOf", "allOf", "prefixItems"):
            for n, sub in enumerate(value):
                _check_supported(sub, f"{at}/{n}")
        elif key in ("items", "additionalProperties") and isinstance(value, dict):
            _check_supported(value, at)


_LITERAL_KEYS = ("enum", "const", "default", "examples")


def _any_value(depth: int) -> dict[str, Any]:
    """Any JSON value nesting arrays/objects ``depth`` levels deep (0: scalars only)."""
    leaf: dict[str, Any] = {"type": ["string", "number", "boolean", "null"]}
    value = leaf
    for _ in range(depth):
        value = {"anyOf": [leaf, {"type": "array", "items": value}, {"type": "object", "additionalProperties": value}]}
    return value


def _any_json_object_schema(depth: int) -> dict[str, Any]:
    """Any JSON object whose values nest arrays/objects ``depth`` levels deep."""
    return {"type": "object", "additionalProperties": _any_value(depth)}


def _normalize(schema: Any) -> Any:
    """Rewrite a checked schema for outlines_core's regex builder.

    ``true`` becomes ``{}`` (the builder rejects booleans); an unconstrained value, an
    object without ``properties`` and an array without ``items`` get bounded nesting
    (``_any_value(1)``): the builder's own "any JSON" regex takes seconds to minutes to
    compile.
    """
    if schema is True or schema == {}:
        return _any_value(1)
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key in ("properties", "$defs", "definitions") and isinstance(value, dict):
            out[key] = {name: _normalize(sub) for name, sub in value.items()}
        elif key in ("anyOf", "oneOf", "allOf", "prefixItems") and isinstance(value, list):
            out[key] = [_normalize(sub) for sub in value]
        elif key in ("items", "additionalProperties") and isinstance(value, dict):
            out[key] = _normalize(value)
        else:
            out[key] = value
    if not (set(out) & _SUPPORTED):  # annotations only: any value
        return {**out, **_any_value(1)}
    types = out["type"] if isinstance(out.get("type"), list) else [out.get("type")]
    if "object" in types and "properties" not in out and not isinstance(out.get("additionalProperties"), (dict, bool)):
        out["additionalProperties"] = _any_value(1)
    if "array" in types and "items" not in out and "prefixItems" not in out:
        out["items"] = _any_value(1)
    return out


def _check_schema(schema: dict[str, Any], where: str) -> None:
    """A valid JSON Schema (draft 2020-12) that constrained decoding can enforce.

    Raises:
        GenerateError: Invalid schema, or an unsupported keyword.
    """
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import SchemaError

    if not isinstance(schema, dict):
        raise GenerateError(f"{where} must be a JSON schema object; got {type(schema).__name__}.")
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as e:
        path = "/".join(str(p) for p in e.path)
        raise GenerateError(f"{where} is not a valid JSON schema: {e.message} (at /{path}).") from None
    _check_supported(schema, where)


def _schema_regex(schema: dict[str, Any] | None, where: str = "the schema", object_depth: int = 2) -> str:
    from outlines_core.json_schema import build_regex_from_schema

    if schema is None:
        schema = _any_json_object_schema(object_depth)
        _check_schema(schema, where)
        return _bounded_numbers(build_regex_from_schema(json.dumps(schema), whitespace_pattern=_WHITESPACE))
    _check_schema(schema, where)
    try:
        regex = build_regex_from_schema(json.dumps(_normalize(schema)), whitespace_pattern=_WHITESPACE)
    except ValueError as e:  # outlines' explanation of what it cannot handle
        raise GenerateError(f"{where} cannot be turned into a constraint: {e}".strip()) from None
    # Rust's \d is any Unicode digit; JSON Schema's (ECMA-262) and the date/time formats mean 0-9.
    return _bounded_numbers(_UNICODE_DIGIT.sub(lambda m: m.group(1) + "[0-9]", regex))


# The builder's integers, fractions and exponents take any number of digits, and a small model that
# starts a number often never stops writing digits. A double holds 15-17 significant digits, so longer
# numbers carry nothing: cap them there (integers 19 digits, the int64 range).
_NUMBER_PARTS = (("(0|[1-9][0-9]*)", "(0|[1-9][0-9]{0,18})"), (r"(\.[0-9]+)?", r"(\.[0-9]{1,17})?"),
                 ("([eE][+-][0-9]+)?", "([eE][+-][0-9]{1,3})?"))


def _bounded_numbers(regex: str) -> str:
    for unbounded, bounded in _NUMBER_PARTS:
        regex = regex.replace(unbounded, bounded)
    return regex


def json_schema_constraint(
    tokenizer: Any,
    schema: dict[str, Any] | None,
    eos_ids: Sequence[int] | None = None,
    *,
    object_depth: int = _JSON_OBJECT_DEPTH,
) -> Constraint:
    """A constraint whose text is one compact JSON value valid against ``schema``.

    Args:
        tokenizer: A fast Hugging Face tokenizer (byte-level BPE or SentencePiece-style).
        schema: A JSON schema (draft 2020-12), or None for any JSON object
            (``response_format: {"type": "json_object"}``).
        eos_ids: End ids (default: the tokenizer's eos, then its chat end-of-turn tokens).
        object_depth: For ``schema`` None, how deep values may nest arrays and objects
            (2: ``{"a": [{"b": 1}]}`` but no deeper). Compiling depth 2 takes a few seconds
            once per tokenizer; depth 3 takes minutes.

    Returns:
        A cached, shareable ``Constraint``.

    Raises:
        GenerateError: Invalid schema, a keyword constrained decoding cannot enforce (named
            in the message), or a tokenizer whose vocabulary cannot be mapped to bytes.
    """
    if object_depth < 0 or object_depth > 3:
        raise GenerateError(f"object_depth must be 0 to 3; got {object_depth}.")
    key = ("schema", id(tokenizer), _eos_key(eos_ids), _canonical(schema), object_depth)
    constraint = _CONSTRAINTS.get(key, tokenizer)
    if constraint is None:
        regex = _schema_regex(schema, object_depth=object_depth)
        constraint = _compile(tokenizer, regex, eos_ids, "the JSON schema")
        _CONSTRAINTS.put(key, tokenizer, constraint)
    return constraint


def regex_constraint(tokenizer: Any, regex: str, eos_ids: Sequence[int] | None = None) -> Constraint:
    """A constraint whose text matches ``regex`` in full (Rust ``regex`` syntax, no look-around
    or back-references; ``.`` does not match a newline, ``[\\s\\S]`` does).

    Raises:
        GenerateError: The regex does not compile, matches only the empty text, or the
            tokenizer's vocabulary cannot be mapped to bytes.
    """
    return _compile(tokenizer, regex, eos_ids, "the regular expression")


# --------------------------------------------------------------------------- tools


def _tool_choice_name(tool_choice: Any) -> str:
    """``"none"``, ``"auto"``, ``"required"``, or the forced tool's name prefixed by ``"function:"``."""
    if tool_choice in ("none", "auto", "required"):
        return str(tool_choice)
    return "function:" + tool_choice["function"]["name"]


def _effective_choice(tools: list[dict[str, Any]] | None, tool_choice: Any) -> Any:
    if tool_choice is None:
        return "auto" if tools else "none"
    return tool_choice


def check_tools(tools: list[dict[str, Any]] | None, tool_choice: Any) -> None:
    """Validate OpenAI ``tools`` and ``tool_choice`` (None means "auto" with tools, else "none").

    Checks each tool is ``{"type": "function", "function": {"name", "description"?,
    "parameters"?}}`` with a unique name of 1-64 letters, digits, ``_`` or ``-``, and a
    parameters object schema that is valid (draft 2020-12) and, unless tool_choice is
    "none", enforceable by constrained decoding.

    Raises:
        GenerateError: Naming the bad field, e.g. ``tools[1].function.name``.
    """
    if tools is not None and not isinstance(tools, list):
        raise GenerateError(f"tools must be a list of tool objects; got {type(tools).__name__}.")
    tools = tools or []
    choice = _effective_choice(tools, tool_choice)
    names: list[str] = []
    for n, tool in enumerate(tools):
        where = f"tools[{n}]"
        if not isinstance(tool, dict):
            raise GenerateError(f"{where} must be an object; got {type(tool).__name__}.")
        if tool.get("type") != "function":
            raise GenerateError(f"{where}.type must be \"function\"; got {tool.get('type')!r}.")
        fn = tool.get("function")
        if not isinstance(fn, dict):
            raise GenerateError(f"{where}.function must be an object with name, description and parameters.")
        name = fn.get("name")
        if not isinstance(name, str) or not _TOOL_NAME.fullmatch(name):
            raise GenerateError(
                f"{where}.function.name must be 1-64 characters of letters, digits, '_' or '-'; got {name!r}."
            )
        if name in names:
            raise GenerateError(f"{where}.function.name {name!r} is used by tools[{names.index(name)}] too.")
        names.append(name)
        if fn.get("description") is not None and not isinstance(fn["description"], str):
            raise GenerateError(f"{where}.function.description must be a string.")
        params = fn.get("parameters")
        if params is not None:
            if not isinstance(params, dict) or params.get("type", "object") != "object":
                raise GenerateError(f"{where}.function.parameters must be a JSON schema of type \"object\".")
            if choice == "none":
                from jsonschema import Draft202012Validator
                from jsonschema.exceptions import SchemaError

                try:
                    Draft202012Validator.check_schema(params)
                except SchemaError as e:
                    raise GenerateError(
                        f"{where}.function.parameters is not a valid JSON schema: {e.message}."
                    ) from None
            else:
                _check_schema(params, f"{where}.function.parameters")
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise GenerateError(
                f"tool_choice must be \"none\", \"auto\", \"required\" or {{\"type\": \"function\", \"function\": "
                f"{{\"name\": ...}}}}; got {choice!r}."
            )
        if choice == "required" and not tools:
            raise GenerateError("tool_choice is \"required\" but no tools were given.")
        return
    if not isinstance(choice, dict) or choice.get("type") != "function" or not isinstance(choice.get("function"), dict):
        raise GenerateError(
            f"tool_choice must be \"none\", \"auto\", \"required\" or {{\"type\": \"function\", \"function\": "
            f"{{\"name\": ...}}}}; got {json.dumps(choice)[:200]}."
        )
    forced = choice["function"].get("name")
    if forced not in names:
        raise GenerateError(
            f"tool_choice.function.name {forced!r} is not one of the tools ({', '.join(names) or 'none given'})."
        )


def _parameters(tool: dict[str, Any]) -> dict[str, Any]:
    return tool["function"].get("parameters") or {"type": "object", "properties": {}}


def _hoist_defs(params: dict[str, Any], prefix: str, defs: dict[str, Any]) -> dict[str, Any]:
    """Move a tool's ``$defs``/``definitions`` into the call schema's root ``$defs`` under
    ``prefix`` and rewrite its ``$ref``s, since references resolve against the root.

    Raises:
        GenerateError: A "#" (whole-schema) reference, which would point at the wrong root.
    """
    params = copy.deepcopy(params)
    local = {**params.pop("definitions", {}), **params.pop("$defs", {})}

    def rewrite(node: Any) -> Any:
        if isinstance(node, dict):
            out = {}
            for k, v in node.items():
                if k == "$ref" and isinstance(v, str):
                    if v == "#":
                        raise GenerateError(
                            f"Tool parameters use a recursive \"$ref\": \"#\" ({prefix.rstrip('_')}); name the "
                            "recursive part under $defs and refer to it there."
                        )
                    v = re.sub(r"^#/(\$defs|definitions)/", f"#/$defs/{prefix}", v)
                out[k] = v if k in _LITERAL_KEYS else rewrite(v)
            return out
        if isinstance(node, list):
            return [rewrite(v) for v in node]
        return node

    for name, sub in local.items():
        defs[prefix + name] = rewrite(sub)
    return rewrite(params)


def tool_call_schema(tools: list[dict[str, Any]] | None, tool_choice: Any, parallel: bool = False
                     ) -> dict[str, Any] | None:
    """The JSON schema of one call object ``{"name": <tool>, "arguments": <its parameters>}``
    (with ``parallel``: of one such object or a JSON array of one or more).

    Args:
        tools: OpenAI tools (checked by ``check_tools``).
        tool_choice: "none", "auto", "required", a named tool, or None ("auto" with tools).
        parallel: Allow several calls (see ``parallel_calls``); ignored for a named tool.

    Returns:
        An ``anyOf`` over the allowed tools (the single object when one is allowed), or
        None when no call may be made ("none", or no tools).

    Raises:
        GenerateError: Invalid tools or tool_choice.
    """
    check_tools(tools, tool_choice)
    choice = _effective_choice(tools, tool_choice)
    if choice == "none" or not tools:
        return None
    if isinstance(choice, dict):
        tools = [t for t in tools if t["function"]["name"] == choice["function"]["name"]]
    defs: dict[str, Any] = {}
    calls = []
    for n, tool in enumerate(tools):
        params = _hoist_defs(_parameters(tool), f"tool{n}_", defs)
        calls.append({
            "type": "object",
            "properties": {"name": {"const": tool["function"]["name"]}, "arguments": params},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        })
    schema: dict[str, Any] = calls[0] if len(calls) == 1 else {"anyOf": calls}
    if parallel and choice in ("auto", "required"):
        # An array, not one object per line: outlines-core 0.2.14 drops a token that leaves a complete
        # match for an incomplete one ("}" then "\n"), so text cannot go on after a complete call.
        schema = {"anyOf": [schema, {"type": "array", "items": schema, "minItems": 1}]}
    if defs:
        schema = {**schema, "$defs": defs}
    return schema


def parallel_calls(tools: list[dict[str, Any]] | None, tool_choice: Any, parallel_tool_calls: bool | None) -> bool:
    """Whether a reply may hold several tool calls: OpenAI's ``parallel_tool_calls`` (default
    true) under "auto" or "required"; a named tool is called exactly once."""
    return parallel_tool_calls is not False and _effective_choice(tools, tool_choice) in ("auto", "required")


def tool_constraint(
    tokenizer: Any, tools: list[dict[str, Any]] | None, tool_choice: Any, eos_ids: Sequence[int] | None = None,
    *, parallel: bool = False,
) -> Constraint | None:
    """The constraint of an assistant turn that may (or must) call a tool.

    "required" or a named tool: the text is exactly one call object, or with ``parallel``
    that or a JSON array of one or more call objects. "auto": either that, or free text
    whose first non-space character is not "{" (nor "[" with ``parallel``) and that may end
    anywhere. "none" (or no tools): None, generate unconstrained.

    Raises:
        GenerateError: Invalid tools or tool_choice, a parameters keyword constrained
            decoding cannot enforce, or an unmappable vocabulary.
    """
    choice = _effective_choice(tools, tool_choice)
    parallel = parallel and choice in ("auto", "required")
    key = ("tools", id(tokenizer), _eos_key(eos_ids), _canonical(tools), _canonical(tool_choice), parallel)
    constraint = _CONSTRAINTS.get(key, tokenizer)
    if constraint is not None:
        return constraint
    schema = tool_call_schema(tools, tool_choice, parallel)
    if schema is None:
        return None
    call = _schema_regex(schema, "the tool call schema")
    text = _FREE_TEXT.replace("{", "{\\[") if parallel else _FREE_TEXT  # nor an array of calls
    regex = f"({call})|({text})" if choice == "auto" else call
    constraint = _compile(tokenizer, regex, eos_ids, f"the tool call ({_tool_choice_name(choice)})")
    _CONSTRAINTS.put(key, tokenizer, constraint)
    return constraint


def tools_system_prompt(tools: list[dict[str, Any]] | None, tool_choice: Any, parallel: bool = False) -> str:
    """The system-prompt text that describes the tools and how to call one ("" for "none");
    with ``parallel``, also how to call several at once.

    Raises:
        GenerateError: Invalid tools or tool_choice.
    """
    check_tools(tools, tool_choice)
    choice = _effective_choice(tools, tool_choice)
    if choice == "none" or not tools:
        return ""
    lines = ["You can call these tools:"]
    for tool in tools:
        fn = tool["function"]
        desc = (fn.get("description") or "").strip()
        lines.append(f"- {fn['name']}{': ' + desc if desc else ''}")
        lines.append(f"  parameters (JSON schema): {json.dumps(_parameters(tool), separators=(',', ':'))}")
    lines.append(
        'To call a tool, answer with only this JSON object and nothing else: '
        '{"name": "<tool name>", "arguments": {<arguments as JSON>}}. '
        "The result will be sent back to you in the next message."
    )
    if parallel and choice in ("auto", "required"):
        lines.append("To call several tools at once, answer with a JSON array of such objects instead.")
    if choice == "auto":
        lines.append("If no tool is needed, answer in plain text instead.")
    elif choice == "required":
        lines.append("You must call one of the tools now.")
    else:
        lines.append(f"You must call the tool {choice['function']['name']} now.")
    return "\n".join(lines)


def _text_content(content: Any, where: str) -> str:
    """OpenAI content: a string, None, or a list of parts of which only text is kept.

    Raises:
        GenerateError: A non-text part (image, audio...) or another type.
    """
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for n, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise GenerateError(f"{where}[{n}] is a {kind!r} part; only text content is supported.")
            texts.append(part["text"])
        return "".join(texts)
    raise GenerateError(f"{where} must be a string or a list of text parts; got {type(content).__name__}.")


def _call_text(call: dict[str, Any], where: str) -> tuple[str, str]:
    """(name, call JSON as the model writes it) for one OpenAI ``tool_calls`` entry.

    Raises:
        GenerateError: A malformed entry.
    """
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise GenerateError(f"{where}.function.name is missing; a tool call is {{\"id\", \"type\": \"function\", "
                            "\"function\": {\"name\", \"arguments\"}}.")
    args: Any = fn.get("arguments", "{}")
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError as e:
            raise GenerateError(f"{where}.function.arguments is not valid JSON: {e.msg} at char {e.pos}.") from None
    return fn["name"], json.dumps({"name": fn["name"], "arguments": args}, ensure_ascii=False, separators=(",", ":"))


def chat_messages_for_template(
    messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, tool_choice: Any, parallel: bool = False
) -> list[dict[str, str]]:
    """Turn an OpenAI conversation into plain ``{"role", "content"}`` messages for a ChatML
    template that knows only system, user and assistant.

    Assistant ``tool_calls`` become their call JSON as the content (after any text; several
    calls as a JSON array, as the model writes them); a ``tool`` message becomes a user message ``"Result of <name>: <content>"``, the
    name found through its ``tool_call_id``; the tools prompt is appended to a leading
    system message, or a system message holding it is prepended.

    Raises:
        GenerateError: Naming the bad message field (unknown role, tool_call_id that no
            earlier assistant call has, non-text content...), or invalid tools.
    """
    if not isinstance(messages, list) or not messages:
        raise GenerateError("messages must be a non-empty list of {role, content} objects.")
    out: list[dict[str, str]] = []
    call_names: dict[str, str] = {}
    for n, msg in enumerate(messages):
        where = f"messages[{n}]"
        if not isinstance(msg, dict):
            raise GenerateError(f"{where} must be an object with role and content.")
        role = msg.get("role")
        if role in ("system", "developer", "user"):
            out.append({"role": "user" if role == "user" else "system",
                        "content": _text_content(msg.get("content"), f"{where}.content")})
        elif role == "assistant":
            parts = [_text_content(msg.get("content"), f"{where}.content")] if msg.get("content") else []
            texts = []
            for k, call in enumerate(msg.get("tool_calls") or []):
                name, text = _call_text(call, f"{where}.tool_calls[{k}]")
                if isinstance(call.get("id"), str):
                    call_names[call["id"]] = name
                texts.append(text)
            if texts:
                parts.append(texts[0] if len(texts) == 1 else "[" + ",".join(texts) + "]")
            out.append({"role": "assistant", "content": "\n".join(parts)})
        elif role == "tool":
            call_id = msg.get("tool_call_id")
            if call_id not in call_names:
                raise GenerateError(
                    f"{where}.tool_call_id {call_id!r} does not match the id of any earlier assistant tool call."
                )
            content = _text_content(msg.get("content"), f"{where}.content")
            out.append({"role": "user", "content": f"Result of {call_names[call_id]}: {content}"})
        else:
            raise GenerateError(
                f"{where}.role {role!r} is not supported; use system, developer, user, assistant or tool."
            )
    prompt = tools_system_prompt(tools, tool_choice, parallel)
    if prompt:
        if out[0]["role"] == "system":
            out[0] = {"role": "system", "content": (out[0]["content"].rstrip() + "\n\n" + prompt).lstrip()}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out


def parse_tool_calls(text: str, tools: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    """The calls written in ``text``, if it is only calls.

    Returns:
        ``[{"name": str, "arguments": dict}, ...]`` when ``text`` (surrounding whitespace
        aside) is one call object or a non-empty JSON array of them (parallel calls), each
        with a known tool ``name`` and ``arguments`` valid against that tool's parameters;
        otherwise None (plain text, or anything malformed).
    """
    from jsonschema import Draft202012Validator

    text = text.strip()
    if not text.startswith(("{", "[")) or not tools:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    objs = value if isinstance(value, list) and value else [value]
    calls = []
    for obj in objs:
        if not isinstance(obj, dict) or set(obj) != {"name", "arguments"} or not isinstance(obj["arguments"], dict):
            return None
        tool = next((t for t in tools if t.get("function", {}).get("name") == obj["name"]), None)
        if tool is None or any(True for _ in Draft202012Validator(_parameters(tool)).iter_errors(obj["arguments"])):
            return None
        calls.append({"name": obj["name"], "arguments": obj["arguments"]})
    return calls


def parse_tool_call(text: str, tools: list[dict[str, Any]] | None) -> dict[str, Any] | None:
    """The call written in ``text``, if it is exactly one (see ``parse_tool_calls``).

    Returns:
        ``{"name": str, "arguments": dict}``, or None (plain text, several calls, or a
        malformed call).
    """
    calls = parse_tool_calls(text, tools)
    return calls[0] if calls is not None and len(calls) == 1 else None


def validate_json(text: str, schema: dict[str, Any] | None) -> None:
    """Check that ``text`` is JSON valid against ``schema`` (None: any JSON object).

    Raises:
        GenerateError: Not JSON, or the first validation error with its location.
    """
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import best_match

    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise GenerateError(f"The output is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}.") from None
    if schema is None:
        if not isinstance(value, dict):
            raise GenerateError(f"The output is JSON but not an object (it is a {type(value).__name__}).")
        return
    error = best_match(Draft202012Validator(schema).iter_errors(value))
    if error is not None:
        path = "".join(f"[{p!r}]" if isinstance(p, str) else f"[{p}]" for p in error.absolute_path) or "(the root)"
        raise GenerateError(f"The output does not match the schema at {path}: {error.message}.")
