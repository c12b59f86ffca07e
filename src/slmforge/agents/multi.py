"""Several agents: a router that hands a task to one specialist, and a planner that splits a task into
steps an executor agent carries out. Each specialist has its own tools and model (or adapter); both
patterns write their decisions into the same JSONL trace as the agents' steps."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slmforge.agents.loop import Agent, AgentResult
from slmforge.errors import AgentError


def _choose(generator: Any, messages: list[dict[str, str]], schema: dict[str, Any], max_tokens: int) -> tuple[Any, str]:
    """A JSON reply under ``schema`` (constrained where the engine constrains; parsed where not):
    (the parsed value or None, the raw text)."""
    from slmforge.generate import SamplingParams, chat_json

    text = chat_json(generator, messages, SamplingParams(max_new_tokens=max_tokens), schema)[0].text
    try:
        return json.loads(text.strip()), text
    except json.JSONDecodeError:
        return None, text


def _trace(path: Path | None, record: dict[str, Any]) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


@dataclass
class RouteResult:
    agent: str
    reason: str  # "model" (the router chose), "keyword", "fallback" (its reply named no specialist)
    result: AgentResult


class Router:
    """Send a task to the specialist whose description fits it.

    Args:
        generator: The model that routes (constrained to the specialists' names where it can be).
        specialists: name -> (agent, description).
        trace: A JSONL file for the routing decision (the agents keep their own ``trace``).

    Raises:
        AgentError: No specialists.
    """

    def __init__(self, generator: Any, specialists: dict[str, tuple[Agent, str]], trace: str | Path | None = None
                 ) -> None:
        if not specialists:
            raise AgentError("A router needs at least one specialist agent.")
        self.generator, self.specialists = generator, specialists
        self.trace = Path(trace) if trace else None

    def route(self, task: str) -> tuple[str, str]:
        """(specialist name, how it was chosen)."""
        names = list(self.specialists)
        listing = "\n".join(f"- {n}: {d}" for n, (_, d) in self.specialists.items())
        messages = [{"role": "system", "content": "Choose the specialist for the task. Reply with JSON "
                     f'{{"agent": "<name>"}}. Specialists:\n{listing}'}, {"role": "user", "content": task}]
        schema = {"type": "object", "properties": {"agent": {"enum": names}}, "required": ["agent"],
                  "additionalProperties": False}
        value, text = _choose(self.generator, messages, schema, 24)
        if isinstance(value, dict) and value.get("agent") in self.specialists:
            return value["agent"], "model"
        named = [n for n in names if n.lower() in text.lower()]
        return (named[0], "keyword") if named else (names[0], "fallback")

    def run(self, task: str) -> RouteResult:
        name, reason = self.route(task)
        _trace(self.trace, {"agent": "router", "kind": "route", "task": task, "chosen": name, "reason": reason})
        return RouteResult(name, reason, self.specialists[name][0].run(task))


@dataclass
class PlanResult:
    plan: list[str]
    results: list[AgentResult] = field(default_factory=list)
    answer: str | None = None
    seconds: float = 0.0


class Planner:
    """Plan, then execute: the planner model writes a short list of steps (JSON, constrained where the
    engine constrains), the executor agent carries out each with the earlier steps' results in view, and
    the last step's answer is the answer.

    Args:
        generator: The planning model.
        executor: The agent that carries out each step (its tools, model and budget).
        max_steps: The longest plan.
        trace: A JSONL file for the plan (the executor keeps its own ``trace``).
    """

    def __init__(self, generator: Any, executor: Agent, max_steps: int = 5, trace: str | Path | None = None) -> None:
        if max_steps < 1:
            raise AgentError(f"A plan needs at least one step (max_steps={max_steps}).")
        self.generator, self.executor, self.max_steps = generator, executor, max_steps
        self.trace = Path(trace) if trace else None

    def plan(self, task: str) -> list[str]:
        tools = ", ".join(t.name for t in self.executor.tools) or "none"
        messages = [{"role": "system", "content": f"Break the task into at most {self.max_steps} short steps, "
                     f'each one action (tools: {tools}). Reply with JSON {{"steps": ["...", ...]}}.'},
                    {"role": "user", "content": task}]
        schema = {"type": "object", "properties": {"steps": {"type": "array", "minItems": 1, "maxItems": self.max_steps,
                                                             "items": {"type": "string", "maxLength": 200}}},
                  "required": ["steps"], "additionalProperties": False}
        value, text = _choose(self.generator, messages, schema, 60 * self.max_steps)
        if isinstance(value, dict) and isinstance(value.get("steps"), list) and value["steps"]:
            return [str(s) for s in value["steps"][: self.max_steps]]
        lines = [ln.strip(" -*0123456789.)") for ln in text.splitlines() if ln.strip(" -*0123456789.)")]
        return lines[: self.max_steps] or [task]

    def run(self, task: str) -> PlanResult:
        start = time.perf_counter()
        plan = self.plan(task)
        _trace(self.trace, {"agent": "planner", "kind": "plan", "task": task, "steps": plan})
        out = PlanResult(plan)
        done: list[str] = []
        for n, step in enumerate(plan, 1):
            context = "\n".join(done)
            prompt = (f"Overall task: {task}\n" + (f"Done so far:\n{context}\n" if context else "")
                      + f"Now do step {n} of {len(plan)}: {step}")
            result = self.executor.run(prompt)
            out.results.append(result)
            done.append(f"{n}. {step} -> {result.answer if result.answer is not None else '(no answer)'}")
            _trace(self.trace, {"agent": "planner", "kind": "step", "step": n, "instruction": step,
                                "answer": result.answer, "stopped": result.stopped})
        out.answer = out.results[-1].answer if out.results else None
        out.seconds = time.perf_counter() - start
        return out
