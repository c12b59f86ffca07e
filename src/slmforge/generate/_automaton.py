"""A regular expression compiled against a vocabulary, and the state of one sequence in it.

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
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from slmforge.errors import GenerateError
from slmforge.generate._vocab import _build_lock, _default_eos_ids, _Lru, _vocabulary

if TYPE_CHECKING:
    import torch

_CACHE_SIZE = 64
# Compiled constraints, keyed by what they were built from (regex, schema, tools) and the tokenizer.
_CONSTRAINTS = _Lru(_CACHE_SIZE)


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


def regex_constraint(tokenizer: Any, regex: str, eos_ids: Sequence[int] | None = None) -> Constraint:
    """A constraint whose text matches ``regex`` in full (Rust ``regex`` syntax, no look-around
    or back-references; ``.`` does not match a newline, ``[\\s\\S]`` does).

    Raises:
        GenerateError: The regex does not compile, matches only the empty text, or the
            tokenizer's vocabulary cannot be mapped to bytes.
    """
    return _compile(tokenizer, regex, eos_ids, "the regular expression")
