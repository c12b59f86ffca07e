"""The agent loop: a model calls tools until it answers, within step, token and time budgets.

Two loops by name, over any ``Generator``:

- ``native``: OpenAI function calling. Every turn is a call, the answer included (a call to
  ``final_answer``), with ``tool_choice`` "required": an endpoint gets ``tools`` natively, an engine that
  constrains output (torch, llama.cpp) writes only calls valid under the tools' schemas, and any other
  engine is prompted with the server's tools prompt and parsed. Same format as ``/v1/chat/completions``.
- ``react``: thought, action, observation. Each turn is one JSON object ``{"thought", "tool",
  "arguments"}`` or ``{"thought", "answer"}``, constrained to the tool schemas where the engine
  constrains; observations come back as user turns.

Arguments are validated before anything runs and errors go back to the model as the tool's result. A
``high_stakes`` tool runs only when ``approve(call)`` says yes; without an approver every such call is
denied. Every step is a line of a JSONL trace.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from slmforge.agents.tools import Tool, ToolArgumentError, as_tools, tool
from slmforge.errors import AgentError, SlmForgeError

MODES = ("native", "react")
FINAL = "final_answer"


@dataclass
class Budget:
    """When a run stops without an answer."""

    max_steps: int = 8  # model turns
    max_tokens: int = 4096  # generated tokens, all turns together
    max_seconds: float = 300.0  # wall clock, tools included


@dataclass
class ToolCall:
    """What an approver is asked about."""

    tool: str
    arguments: dict[str, Any]
    high_stakes: bool
    agent: str


@dataclass
class Step:
    """One turn of a run, as the trace records it."""

    agent: str
    step: int
    kind: str  # "call", "answer", "invalid", "denied", "error" (the tool's), "failed" (the engine's), "budget"
    prompt: list[dict[str, Any]]
    reply: str
    tool: str | None = None
    arguments: Any = None
    result: str | None = None
    thought: str | None = None
    tokens: int = 0
    seconds: float = 0.0


@dataclass
class AgentResult:
    answer: str | None  # None when a budget stopped the run first
    stopped: str  # "answer", "max_steps", "max_tokens", "max_seconds", "failed" (the engine refused a turn)
    steps: list[Step] = field(default_factory=list)
    tokens: int = 0
    seconds: float = 0.0


Approver = Callable[[ToolCall], bool]


def deny_all(call: ToolCall) -> bool:
    """Deny-by-default: what a run gets when nobody can approve."""
    return False


def approve_all(call: ToolCall) -> bool:
    """Approve everything (a sandboxed or test setting; say so where you use it)."""
    return True


@tool(name=FINAL)
def _final_answer(answer: str) -> str:
    """Give the final answer to the task and stop.

    Args:
        answer: The answer, complete, for the person who asked.
    """
    return answer


class Agent:
    """A model with tools.

    Args:
        generator: Any ``Generator`` (in-process engine, export, ``OpenAIGenerator`` over an endpoint).
        tools: ``Tool`` objects or typed functions.
        mode: ``native`` or ``react``.
        system: Instructions placed before the tools' description.
        budget: Steps, tokens and seconds.
        approve: Asked before each high-stakes call; None denies them all.
        params: Sampling per turn (greedy, 256 tokens by default); ``max_new_tokens`` is capped by the
            tokens left.
        trace: A JSONL file each step is appended to.
        name: The agent's name in traces (multi-agent runs).
        adapter: A LoRA adapter of the generator to turn with (engines with adapters: several specialists
            share one base model in memory).

    Raises:
        AgentError: An unknown mode, duplicate tool names, or a tool named ``final_answer``.
    """

    def __init__(self, generator: Any, tools: list[Any], mode: str = "native", system: str | None = None,
                 budget: Budget | None = None, approve: Approver | None = None, params: Any = None,
                 trace: str | Path | None = None, name: str = "agent", adapter: str | None = None) -> None:
        from slmforge.generate import SamplingParams

        if mode not in MODES:
            raise AgentError(f"Unknown agent loop {mode!r}; choose one of {', '.join(MODES)}.")
        self.tools = as_tools(tools)
        if any(t.name == FINAL for t in self.tools):
            raise AgentError(f"{FINAL!r} is the loop's own tool for answering; name yours differently.")
        self.generator, self.mode, self.name = generator, mode, name
        self.system = system or "You are a careful assistant. Use the tools when they help; answer briefly."
        self.budget = budget or Budget()
        self.approve = approve or deny_all
        self.params = params or SamplingParams(max_new_tokens=256)
        self.trace = Path(trace) if trace else None
        self._by_name = {t.name: t for t in self.tools}
        # what every turn sends: the native loop's tools, the ReAct loop's schema
        self._specs = [t.openai() for t in self.tools] + [_final_answer.openai()]
        self._react_schema = _react_schema(self.tools) if mode == "react" else None
        self.adapter = adapter
        if adapter is not None:
            from slmforge.generate import as_engine

            engine = as_engine(generator)
            if not engine.capabilities.adapters or adapter not in engine.adapters:  # type: ignore[attr-defined]
                raise AgentError(f"Agent {name}: the {engine.engine} engine has no adapter {adapter!r}.")

    def run(self, task: str) -> AgentResult:
        """Work on ``task`` until an answer or a budget; never raises for what the model does."""
        start = time.perf_counter()
        result = AgentResult(answer=None, stopped="max_steps")
        messages = self._start(task)
        for n in range(self.budget.max_steps):
            left = self.budget.max_tokens - result.tokens
            if left <= 0 or time.perf_counter() - start > self.budget.max_seconds:
                result.stopped = "max_tokens" if left <= 0 else "max_seconds"
                break
            step = self._turn(n, messages, left)
            result.steps.append(step)
            result.tokens += step.tokens
            self._record(step)
            if step.kind == "answer":
                result.answer, result.stopped = step.result, "answer"
                break
            if step.kind == "failed":
                result.stopped = "failed"
                break
        else:
            result.stopped = "max_steps"
        result.seconds = time.perf_counter() - start
        if result.answer is None:
            self._record(Step(self.name, len(result.steps), "budget", [], "", result=result.stopped))
        return result

    # ------------------------------------------------------------------ turns

    def _start(self, task: str) -> list[dict[str, Any]]:
        if self.mode == "native":
            return [{"role": "system", "content": self.system}, {"role": "user", "content": task}]
        return [{"role": "system", "content": self.system + "\n\n" + _react_prompt(self.tools)},
                {"role": "user", "content": task}]

    def _turn(self, n: int, messages: list[dict[str, Any]], tokens_left: int) -> Step:
        from dataclasses import replace

        params = replace(self.params, n=1, max_new_tokens=max(1, min(self.params.max_new_tokens, tokens_left)))
        if self.adapter is not None:
            self.generator.set_adapter(self.adapter)
        prompt = [dict(m) for m in messages]
        t0 = time.perf_counter()
        try:
            name, arguments, thought, reply, tokens = (self._native if self.mode == "native" else self._react)(
                messages, params)
        except SlmForgeError as e:  # the engine refused (context full, endpoint down): the run ends here
            return Step(self.name, n, "failed", prompt, "", result=str(e), seconds=time.perf_counter() - t0)
        step = Step(self.name, n, "call", prompt, reply, tool=name, arguments=arguments, thought=thought,
                    tokens=tokens)
        step.kind, step.result = self._act(name, arguments)
        self._observe(messages, n, step)
        step.seconds = time.perf_counter() - t0
        return step

    def _native(self, messages: list[dict[str, Any]], params: Any) -> tuple[str | None, Any, None, str, int]:
        from slmforge.generate import chat_with_tools

        reply = chat_with_tools(self.generator, messages, self._specs, "required", params)[0]
        if reply.tool_calls:
            call = reply.tool_calls[0]
            return call.get("name"), call.get("arguments"), None, reply.text or json.dumps(call), reply.tokens
        name, arguments = _loose_call(reply.text)
        words = reply.text.strip()
        if name is None and words and not words.startswith(("{", "[")):  # plain words, unconstrained: the answer
            return FINAL, {"answer": reply.text.strip()}, None, reply.text, reply.tokens
        return name, arguments, None, reply.text, reply.tokens

    def _react(self, messages: list[dict[str, Any]], params: Any) -> tuple[str | None, Any, str | None, str, int]:
        from slmforge.generate import chat_json

        reply = chat_json(self.generator, messages, params, self._react_schema)[0]
        try:
            obj = json.loads(reply.text.strip())
        except json.JSONDecodeError:
            obj = None
        if not isinstance(obj, dict):
            if reply.text.strip() and not reply.text.strip().startswith("{"):
                return FINAL, {"answer": reply.text.strip()}, None, reply.text, reply.tokens
            return None, reply.text, None, reply.text, reply.tokens
        thought = obj.get("thought") if isinstance(obj.get("thought"), str) else None
        if "answer" in obj:
            return FINAL, {"answer": str(obj["answer"])}, thought, reply.text, reply.tokens
        return obj.get("tool"), obj.get("arguments", {}), thought, reply.text, reply.tokens

    def _act(self, name: str | None, arguments: Any) -> tuple[str, str]:
        """(step kind, the result the model is shown)."""
        if name == FINAL:
            try:
                return "answer", _final_answer.validate(arguments)["answer"]
            except ToolArgumentError as e:
                return "invalid", f"Error: {e} Call {FINAL} with {{\"answer\": \"...\"}}."
        chosen = self._by_name.get(name or "")
        if chosen is None:
            known = ", ".join([*self._by_name, FINAL])
            return "invalid", (f"Error: the reply is not a call of a known tool ({known}). Reply with one call."
                               if name is None else f"Error: there is no tool {name!r}; the tools are {known}.")
        try:
            checked = chosen.validate(arguments)
        except ToolArgumentError as e:
            return "invalid", f"Error: {e} Fix the arguments and call again."
        if chosen.high_stakes and not self.approve(ToolCall(chosen.name, checked, True, self.name)):
            return "denied", f"Denied: {chosen.name} needs approval and was not approved. Do without it."
        try:
            return "call", str(chosen(**checked))
        except Exception as e:  # any tool failure is the model's information, not the run's end
            return "error", f"Error: {chosen.name} failed: {type(e).__name__}: {e}"

    def _observe(self, messages: list[dict[str, Any]], n: int, step: Step) -> None:
        if step.kind == "answer":
            return
        if self.mode == "react":
            messages.append({"role": "assistant", "content": step.reply})
            messages.append({"role": "user", "content": f"Observation: {step.result}"})
            return
        if step.tool is None or step.tool not in self._by_name and step.tool != FINAL:
            # not a call of a known tool: the text as the assistant wrote it, the correction as the user
            messages.append({"role": "assistant", "content": step.reply})
            messages.append({"role": "user", "content": step.result or ""})
            return
        call_id = f"call_{self.name}_{n}"
        args = step.arguments if isinstance(step.arguments, (dict, str)) else {}
        messages.append({"role": "assistant", "content": None, "tool_calls": [{
            "id": call_id, "type": "function",
            "function": {"name": step.tool, "arguments": args if isinstance(args, str) else json.dumps(args)}}]})
        messages.append({"role": "tool", "tool_call_id": call_id, "content": step.result or ""})

    def _record(self, step: Step) -> None:
        if self.trace is None:
            return
        self.trace.parent.mkdir(parents=True, exist_ok=True)
        with self.trace.open("a", encoding="utf-8") as f:
            f.write(json.dumps(asdict(step), ensure_ascii=False, default=str) + "\n")


def _loose_call(text: str) -> tuple[str | None, Any]:
    """(name, arguments) of a reply that looks like a call ``{"name", "arguments"}`` even when the
    arguments are wrong (for the error to name them); (None, None) for anything else."""
    try:
        obj = json.loads(text.strip())
    except json.JSONDecodeError:
        return None, None
    if isinstance(obj, list) and obj:
        obj = obj[0]
    if isinstance(obj, dict) and isinstance(obj.get("name"), str):
        return obj["name"], obj.get("arguments", {})
    return None, None


def _react_prompt(tools: list[Tool]) -> str:
    lines = ["Work step by step. Each reply is one JSON object:",
             '{"thought": "<what you think>", "tool": "<tool name>", "arguments": {<arguments>}} to use a tool, '
             'or {"thought": "<what you think>", "answer": "<final answer>"} when you know the answer.',
             "The tool's result comes back as an Observation. Tools:"]
    for t in tools:
        lines.append(f"- {t.name}: {t.description}\n  arguments (JSON schema): "
                     f"{json.dumps(t.parameters, separators=(',', ':'))}")
    return "\n".join(lines)


def _react_schema(tools: list[Tool]) -> dict[str, Any]:
    """One ReAct turn: a thought and a valid call of one tool, or a thought and an answer."""
    from slmforge.generate import tool_call_schema

    thought = {"type": "string", "maxLength": 400}
    options = [{"type": "object", "properties": {"thought": thought, "answer": {"type": "string"}},
                "required": ["thought", "answer"], "additionalProperties": False}]
    defs: dict[str, Any] = {}
    if tools:
        calls = tool_call_schema([t.openai() for t in tools], "required")
        assert calls is not None
        defs = calls.pop("$defs", {})
        for call in calls.get("anyOf", [calls]):
            options.append({"type": "object", "properties": {
                "thought": thought, "tool": call["properties"]["name"], "arguments": call["properties"]["arguments"]},
                "required": ["thought", "tool", "arguments"], "additionalProperties": False})
    schema: dict[str, Any] = {"anyOf": options}
    if defs:
        schema["$defs"] = defs
    return schema
