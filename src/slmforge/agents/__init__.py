"""Agents: typed tools, a tool-calling loop with approval and budgets, and multi-agent patterns.

    from slmforge.agents import Agent, Budget, tool, calculator, workspace, approve_all
    from slmforge.generate import load_generator

    @tool
    def population(city: str) -> int:
        '''The population of a city.

        Args:
            city: The city's name.
        '''
        return {"Oslo": 717_710}.get(city, 0)

    agent = Agent(load_generator("http://127.0.0.1:8000/v1#sft"), [population, calculator()],
                  mode="native", budget=Budget(max_steps=6), trace="runs/agent/trace.jsonl")
    result = agent.run("How many people live in Oslo, doubled?")
    print(result.answer, result.stopped, [s.tool for s in result.steps])

Everything runs over the ``Generator`` protocol: in-process engines, exports, ``slmforge serve``, llama.cpp,
vLLM or a hosted API (``OpenAIGenerator`` sends ``tools`` natively). Tool calls use the server's format
(``slmforge.generate.chat_with_tools``), so a client's tools and ours are the same thing.
"""

from __future__ import annotations

from slmforge.agents.builtin import (
    calculate,
    calculator,
    confine,
    http_fetch,
    knowledge_search,
    python_sandbox,
    sql_query,
    workspace,
)
from slmforge.agents.loop import (
    FINAL,
    MODES,
    Agent,
    AgentResult,
    Approver,
    Budget,
    Step,
    ToolCall,
    approve_all,
    deny_all,
)
from slmforge.agents.multi import Planner, PlanResult, Router, RouteResult
from slmforge.agents.tools import Tool, ToolArgumentError, as_tools, tool

__all__ = [
    "Agent", "AgentResult", "Approver", "Budget", "FINAL", "MODES", "Step", "ToolCall", "approve_all", "deny_all",
    "Planner", "PlanResult", "Router", "RouteResult",
    "Tool", "ToolArgumentError", "as_tools", "tool",
    "calculate", "calculator", "confine", "http_fetch", "knowledge_search", "python_sandbox", "sql_query",
    "workspace",
]
