"""``slmforge agent``: run a tool-using agent on a task, or list the built-in tools."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from slmforge.cli._options import ConfigOpt, SetOpt, err, out
from slmforge.cli.generate_cmd import ModelOpt

agent_app = typer.Typer(help="Agents: a model with tools, approval and budgets.", no_args_is_help=True)

BUILTIN = ("calculator", "python", "files", "sql", "search", "http")


def build_tools(cfg: Any, names: list[str]) -> list[Any]:
    """The built-in tools named in ``names`` (agent.tools), bound to the project's settings.

    Raises:
        AgentError: An unknown name, or a tool whose setting is missing (sql without agent.database...).
    """
    from slmforge import agents
    from slmforge.errors import AgentError

    tools: list[Any] = []
    for name in names:
        if name == "calculator":
            tools.append(agents.calculator())
        elif name == "python":
            tools.append(agents.python_sandbox(allow_weak=cfg.eval.allow_weak_sandbox))
        elif name == "files":
            tools.extend(agents.workspace(cfg.resolve(cfg.agent.workspace)))
        elif name == "sql":
            if not cfg.agent.database:
                raise AgentError("The sql tool needs agent.database: the SQLite file it may read.")
            tools.append(agents.sql_query(cfg.resolve(cfg.agent.database)))
        elif name == "search":
            from slmforge.rag import index_folder, open_index

            if cfg.agent.knowledge:
                cfg = cfg.model_copy(update={"rag": cfg.rag.model_copy(update={"out": cfg.agent.knowledge})})
            if not (index_folder(cfg) / "catalog.sqlite").is_file():
                raise AgentError(f"The search tool needs a rag index at {index_folder(cfg)}: run `slmforge rag index`.")
            tools.append(agents.knowledge_search(open_index(cfg), k=cfg.rag.top_k, mode=cfg.rag.mode))
        elif name == "http":
            tools.append(agents.http_fetch(cfg.agent.allow_hosts))
        else:
            raise AgentError(f"Unknown tool {name!r} in agent.tools; the built-in tools are {', '.join(BUILTIN)}.")
    return tools


def _ask(call: Any) -> bool:
    """Approval on the terminal; denied when nobody is there to answer."""
    if not sys.stdin.isatty():
        err.print(f"denied {call.tool} (no terminal to approve it; --approve all allows high-stakes tools)")
        return False
    args = json.dumps(call.arguments, default=str)[:500]
    return typer.confirm(f"Allow {call.tool}({args})?", default=False, err=True)


@agent_app.command("run")
def run_cmd(
    task: Annotated[str, typer.Argument(help="The task, in words.")],
    model: ModelOpt = None,
    tool: Annotated[list[str] | None, typer.Option("--tool", "-t", help=f"A built-in tool ({', '.join(BUILTIN)}); "
                                                   "repeatable (default: agent.tools).")] = None,
    mode: Annotated[str | None, typer.Option(help="native or react (default: agent.mode).")] = None,
    max_steps: Annotated[int | None, typer.Option("--max-steps", min=1)] = None,
    approve: Annotated[str, typer.Option(help="ask (a prompt on the terminal; deny without one), deny, or all.")
                       ] = "ask",
    trace: Annotated[Path | None, typer.Option(help="Append every step to this JSONL file.")] = None,
    plan: Annotated[bool, typer.Option(help="Plan first (a JSON list of steps), then run the agent on each step.")
                    ] = False,
    route: Annotated[bool, typer.Option(help="Send the task to one of agent.specialists, chosen by the model.")
                     ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the whole result as JSON.")] = False,
    config: ConfigOpt = None, set_: SetOpt = None,
) -> None:
    """Run an agent on a task: the model calls tools until it answers or a budget runs out."""
    from dataclasses import asdict

    from slmforge.agents import Agent, Budget, Planner, Router, approve_all, deny_all
    from slmforge.cli.generate_cmd import load_model
    from slmforge.config import load_config
    from slmforge.errors import AgentError
    from slmforge.generate import SamplingParams, default_model_dir

    cfg = load_config(config, set_ or [])
    if approve not in ("ask", "deny", "all"):
        raise AgentError(f"--approve must be ask, deny or all; got {approve!r}.")
    if plan and route:
        raise AgentError("Choose one of --plan and --route.")
    a = cfg.agent
    # tools first: a misconfigured tool fails before any model loads
    toolsets = ({name: build_tools(cfg, spec.tools) for name, spec in a.specialists.items()} if route
                else {"agent": build_tools(cfg, tool or a.tools)})
    model_ref = model or str(default_model_dir(cfg))
    gen = load_model(model_ref, None, "auto", cfg.generate.endpoints)

    def make(name: str, generator) -> Agent:
        return Agent(generator, toolsets["agent" if name == "executor" else name], mode=mode or a.mode, trace=trace,
                     name=name,
                     budget=Budget(max_steps or a.max_steps, a.max_tokens, a.max_seconds),
                     approve={"ask": _ask, "deny": deny_all, "all": approve_all}[approve],
                     params=SamplingParams(max_new_tokens=a.max_new_tokens))

    if route:
        if not a.specialists:
            raise AgentError("--route needs agent.specialists in the project file (name: {description, tools, "
                             "model, adapter}).")
        specialists = {}
        for name, spec in a.specialists.items():
            own = gen if spec.model is None and spec.adapter is None else load_model(
                spec.model or model_ref, Path(spec.adapter) if spec.adapter else None, "auto", cfg.generate.endpoints)
            specialists[name] = (make(name, own), spec.description)
        routed = Router(gen, specialists, trace=trace).run(task)
        err.print(f"routed to {routed.agent} ({routed.reason})", style="dim")
        result = routed.result
    elif plan:
        planned = Planner(gen, make("executor", gen), trace=trace).run(task)
        for n, (step, r) in enumerate(zip(planned.plan, planned.results), 1):
            err.print(f"plan step {n}: {step} -> {r.answer} ({r.stopped})", style="dim")
        result = planned.results[-1]
    else:
        result = make("agent", gen).run(task)
    if as_json:
        out.print(json.dumps(asdict(result), default=str, ensure_ascii=False, indent=1))
        return
    for s in result.steps:
        what = f"{s.tool}({json.dumps(s.arguments, default=str)[:200]})" if s.tool else s.reply[:200]
        err.print(f"step {s.step} {s.kind:8} {what} -> {str(s.result)[:300]}", style="dim")
    err.print(f"{result.stopped}: {len(result.steps)} steps, {result.tokens} tokens, {result.seconds:.1f} s",
              style="dim")
    out.print(result.answer if result.answer is not None else f"(no answer: {result.stopped})")
    if result.answer is None:
        raise typer.Exit(1)


@agent_app.command("tools")
def tools_cmd(tool: Annotated[list[str] | None, typer.Option("--tool", "-t")] = None,
              config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """The tools an agent would get (agent.tools, or --tool), as the model sees them (OpenAI tools JSON)."""
    from slmforge.config import load_config

    cfg = load_config(config, set_ or [])
    tools = build_tools(cfg, tool or cfg.agent.tools)
    out.print(json.dumps([dict(t.openai(), high_stakes=t.high_stakes) for t in tools], indent=1))
