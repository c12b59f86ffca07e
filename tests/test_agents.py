"""Agents: tool schemas, the native and ReAct loops, approval, budgets, the workspace, built-in tools, routing
and planning; scripted generators for the loop's logic, a tiny torch model and our server for the real
constrained paths."""

from __future__ import annotations

import enum
import json
import os
import sqlite3
from typing import Literal

import jsonschema
import pytest

from slmforge.agents import (
    Agent,
    Budget,
    Planner,
    Router,
    ToolCall,
    approve_all,
    calculate,
    calculator,
    python_sandbox,
    sql_query,
    tool,
    workspace,
)
from slmforge.errors import AgentError
from slmforge.generate import Completion, SamplingParams

from conftest import TINY, LiveServer, build_peaky_model, build_tiny_tokenizer


class Scripted:
    """A Generator that replies from a script, and keeps the conversations it was shown."""

    def __init__(self, replies: list[str]) -> None:
        self.replies, self.seen = list(replies), []

    def chat(self, messages, params):
        self.seen.append([dict(m) for m in messages])
        text = self.replies.pop(0) if self.replies else self.seen and "{}"
        return [Completion(text=text, tokens=len(text.split()), finish_reason="stop")]

    def complete(self, prompt, params):
        return self.chat([{"role": "user", "content": prompt}], params)

    def stream(self, prompt, params):
        yield self.complete(prompt, params)[0].text

    def complete_batch(self, prompts, params):
        return [self.complete(p, params) for p in prompts]


def call(name: str, **arguments) -> str:
    return json.dumps({"name": name, "arguments": arguments})


class Unit(enum.Enum):
    KM = "km"
    MI = "mi"


@tool
def convert(amount: float, unit: Unit = Unit.KM, precise: bool | None = None,
            style: Literal["short", "long"] = "short") -> str:
    """Convert a distance to metres.

    Args:
        amount: The distance.
        unit: Its unit.
        precise: Keep decimals.
        style: How to write the result.
    """
    metres = amount * (1000 if unit is Unit.KM else 1609.344)
    return f"{metres:.1f} m" if precise else f"{round(metres)} m"


@tool
def population(city: str) -> int:
    """The population of a city.

    Args:
        city: The city's name.
    """
    return {"Oslo": 717710, "Bergen": 291940}[city]


# --------------------------------------------------------------------------- tools


def test_schema_is_derived_from_types_docstring_and_defaults():
    schema = convert.parameters
    assert convert.name == "convert" and convert.description == "Convert a distance to metres."
    assert schema["required"] == ["amount"] and schema["additionalProperties"] is False
    props = schema["properties"]
    assert props["amount"] == {"type": "number", "description": "The distance."}
    assert props["style"]["enum"] == ["short", "long"] and props["style"]["default"] == "short"
    assert {"type": "null"} in props["precise"]["anyOf"] and props["precise"]["default"] is None
    unit = schema["$defs"][props["unit"]["$ref"].split("/")[-1]]
    assert unit["enum"] == ["km", "mi"] and props["unit"]["default"] == "km"
    jsonschema.Draft202012Validator.check_schema(schema)
    # validated and coerced before the call: the enum member, the defaults filled in
    assert convert.validate({"amount": 2, "unit": "mi"}) == {"amount": 2, "unit": Unit.MI, "precise": None,
                                                             "style": "short"}
    with pytest.raises(AgentError, match=r"unit: 'yd' is not one of"):
        convert.validate({"amount": 1, "unit": "yd"})
    with pytest.raises(AgentError, match="Additional properties"):
        convert.validate({"amount": 1, "speed": 3})
    assert convert.openai()["function"]["parameters"] is schema


def test_a_tool_without_types_is_refused():
    def untyped(x):
        return x

    with pytest.raises(AgentError, match="parameter 'x' has no type annotation"):
        tool(untyped)

    def star(*xs: int) -> int:
        return 0

    with pytest.raises(AgentError, match=r"\*xs"):
        tool(star)
    with pytest.raises(AgentError, match="final_answer"):
        Agent(Scripted([]), [tool(name="final_answer")(lambda answer: answer)])


def test_calculator_is_exact_and_refuses_code():
    assert calculate("(12 + 7) * 3") == 57 and calculate("2 ** 10 // 3") == 341
    assert calculate("round(sqrt(2) * 100)") == 141
    for bad, why in (("__import__('os').system('x')", "not allowed"), ("9 ** 9 ** 9", "too large"),
                     ("1 / 0", "division by zero"), ("x + 1", "not allowed"), ("2 +", "not an arithmetic")):
        with pytest.raises(ValueError, match=why):
            calculate(bad)


# --------------------------------------------------------------------------- the native loop


def test_a_multi_step_tool_task_completes_with_a_trace(tmp_path):
    gen = Scripted([call("population", city="Oslo"), call("calculator", expression="717710 * 2"),
                    call("final_answer", answer="1435420")])
    trace = tmp_path / "trace.jsonl"
    result = Agent(gen, [population, calculator()], trace=trace).run("Twice Oslo's population?")
    assert result.answer == "1435420" and result.stopped == "answer"
    assert [(s.kind, s.tool, s.result) for s in result.steps] == [
        ("call", "population", "717710"), ("call", "calculator", "1435420"), ("answer", "final_answer", "1435420")]
    # the model saw each result as a tool message answering its call, in the server's format
    last = gen.seen[-1]
    assert last[-1]["role"] == "user" and "Result of calculator: 1435420" in last[-1]["content"]
    assert "You can call these tools" in last[0]["content"] and "final_answer" in last[0]["content"]
    lines = [json.loads(x) for x in trace.read_text().splitlines()]
    assert [x["tool"] for x in lines] == ["population", "calculator", "final_answer"]
    assert {"prompt", "reply", "arguments", "result", "tokens", "seconds"} <= set(lines[0])
    assert lines[1]["prompt"][-1] == {"role": "tool", "tool_call_id": "call_agent_0", "content": "717710"}


def test_invalid_arguments_are_rejected_and_fed_back():
    ran = []

    @tool
    def square(n: int) -> int:
        """Square a number.

        Args:
            n: The number.
        """
        ran.append(n)
        return n * n

    gen = Scripted([call("square", n="four"), call("square", m=4), call("cube", n=4), "{not json",
                    call("square", n=4), call("final_answer", answer="16")])
    result = Agent(gen, [square]).run("Square four.")
    assert [s.kind for s in result.steps] == ["invalid", "invalid", "invalid", "invalid", "call", "answer"]
    assert ran == [4]  # nothing ran before the arguments were valid
    feedback = [m[-1]["content"] for m in gen.seen[1:5]]
    assert "n: 'four' is not of type 'integer'" in feedback[0]
    assert "'n' is a required property" in feedback[1] and "'m' was unexpected" in feedback[1]
    assert "there is no tool 'cube'" in feedback[2] and "not a call of a known tool" in feedback[3]
    assert result.answer == "16"


def test_plain_text_from_an_unconstrained_engine_is_the_answer():
    result = Agent(Scripted(["Oslo has about 718 thousand people."]), [population]).run("Oslo?")
    assert result.answer == "Oslo has about 718 thousand people." and len(result.steps) == 1


def test_budgets_stop_a_runaway_loop(tmp_path):
    forever = [call("calculator", expression="1 + 1")] * 50
    by_steps = Agent(Scripted(forever), [calculator()], budget=Budget(max_steps=3)).run("loop")
    assert by_steps.stopped == "max_steps" and by_steps.answer is None and len(by_steps.steps) == 3
    by_tokens = Agent(Scripted(forever), [calculator()], budget=Budget(max_steps=50, max_tokens=10)).run("loop")
    assert by_tokens.stopped == "max_tokens" and len(by_tokens.steps) < 50
    by_time = Agent(Scripted(forever), [calculator()], budget=Budget(max_steps=50, max_seconds=0.0)).run("loop")
    assert by_time.stopped == "max_seconds" and by_time.steps == []


def test_the_approval_gate(tmp_path):
    ws = tmp_path / "ws"
    script = [call("write_file", path="notes.txt", content="hello"), call("final_answer", answer="done")]
    denied = Agent(Scripted(list(script)), workspace(ws)).run("Write hello to notes.txt")
    assert denied.steps[0].kind == "denied" and not (ws / "notes.txt").exists()  # deny by default
    asked: list[ToolCall] = []

    def approver(c: ToolCall) -> bool:
        asked.append(c)
        return c.arguments["path"] == "notes.txt"

    approved = Agent(Scripted(list(script)), workspace(ws), approve=approver).run("Write hello")
    assert approved.steps[0].kind == "call" and (ws / "notes.txt").read_text() == "hello"
    assert asked == [ToolCall("write_file", {"path": "notes.txt", "content": "hello"}, True, "agent")]
    # low-stakes tools never ask
    Agent(Scripted([call("read_file", path="notes.txt"), call("final_answer", answer="x")]), workspace(ws),
          approve=approver).run("Read it")
    assert len(asked) == 1


def test_the_workspace_cannot_be_left(tmp_path):
    ws, outside = tmp_path / "ws", tmp_path / "secret.txt"
    outside.write_text("secret")
    ws.mkdir()
    ls, read, write = workspace(ws)
    os.symlink(outside, ws / "link.txt")
    os.symlink(tmp_path, ws / "up")
    for path in ("../secret.txt", str(outside), "link.txt", "up/secret.txt", "a/../../secret.txt"):
        with pytest.raises(AgentError, match="workspace"):
            read.fn(path=path)
        with pytest.raises(AgentError, match="workspace"):
            write.fn(path=path, content="x")
    assert outside.read_text() == "secret"
    write.fn(path="sub/ok.txt", content="fine")
    assert read.fn(path="sub/ok.txt") == "fine" and "sub/ok.txt" in ls.fn()
    # through the loop the refusal is the tool's error, shown to the model
    r = Agent(Scripted([call("read_file", path="../secret.txt"), call("final_answer", answer="no")]),
              [read]).run("read the secret")
    assert r.steps[0].kind == "error" and "leaves the workspace" in r.steps[0].result


def test_sql_is_read_only(tmp_path):
    db = tmp_path / "shop.sqlite"
    with sqlite3.connect(db) as c:
        c.execute("CREATE TABLE items (name TEXT, price REAL)")
        c.executemany("INSERT INTO items VALUES (?, ?)", [("pen", 1.5), ("book", 12.0)])
    sql = sql_query(db)
    assert "CREATE TABLE items" in sql.description
    assert sql.fn(query="SELECT name FROM items WHERE price > 2") == "name\nbook"
    for attack in ("DELETE FROM items", "DROP TABLE items", "INSERT INTO items VALUES ('x', 1)",
                   f"ATTACH DATABASE '{tmp_path / 'x.sqlite'}' AS x", "PRAGMA query_only = OFF"):
        assert sql.fn(query=attack).startswith("SQL error"), attack
    with sqlite3.connect(db) as c:
        assert c.execute("SELECT count(*) FROM items").fetchone() == (2,)


def test_python_runs_in_the_sandbox_only_when_approved():
    code = call("python", code="print(sum(range(10)))")
    py = python_sandbox(timeout_s=10, allow_weak=True)
    assert py.high_stakes
    denied = Agent(Scripted([code, call("final_answer", answer="?")]), [py]).run("sum 0..9")
    assert denied.steps[0].kind == "denied"
    ran = Agent(Scripted([code, call("final_answer", answer="45")]), [py], approve=approve_all).run("sum 0..9")
    assert ran.steps[0].result == "45"


# --------------------------------------------------------------------------- ReAct


def test_react_loop_thought_action_observation():
    gen = Scripted([json.dumps({"thought": "I need the population.", "tool": "population",
                                "arguments": {"city": "Bergen"}}),
                    json.dumps({"thought": "Bad call.", "tool": "population", "arguments": {}}),
                    json.dumps({"thought": "I know it.", "answer": "291940"})])
    result = Agent(gen, [population], mode="react").run("Bergen's population?")
    assert [s.kind for s in result.steps] == ["call", "invalid", "answer"] and result.answer == "291940"
    assert result.steps[0].thought == "I need the population."
    assert gen.seen[1][-1] == {"role": "user", "content": "Observation: 291940"}
    assert "'city' is a required property" in gen.seen[2][-1]["content"]
    assert '"answer"' in gen.seen[0][0]["content"]


# --------------------------------------------------------------------------- multi-agent


def test_router_and_planner(tmp_path):
    trace = tmp_path / "t.jsonl"
    math_agent = Agent(Scripted([call("final_answer", answer="4")]), [calculator()], name="math")
    geo_agent = Agent(Scripted([call("final_answer", answer="Oslo")]), [population], name="geo")
    router = Router(Scripted(['{"agent": "geo"}']), {"math": (math_agent, "arithmetic"),
                                                     "geo": (geo_agent, "cities and countries")}, trace=trace)
    routed = router.run("Capital of Norway?")
    assert (routed.agent, routed.reason, routed.result.answer) == ("geo", "model", "Oslo")
    assert Router(Scripted(["I would ask math"]), router.specialists).route("2+2")[0] == "math"
    executor = Agent(Scripted([call("population", city="Oslo"), call("final_answer", answer="717710"),
                               call("calculator", expression="717710 + 291940"),
                               call("final_answer", answer="1009650")]),
                     [population, calculator()], name="executor", trace=trace)
    plan = Planner(Scripted(['{"steps": ["Find Oslo\'s population", "Add Bergen\'s 291940"]}']), executor,
                   trace=trace).run("Oslo plus Bergen?")
    assert plan.plan == ["Find Oslo's population", "Add Bergen's 291940"] and plan.answer == "1009650"
    assert "717710" in executor.generator.seen[2][1]["content"]  # step 2 sees step 1's answer
    kinds = [(x["agent"], x["kind"]) for x in map(json.loads, trace.read_text().splitlines())]
    assert kinds[0] == ("router", "route") and ("planner", "plan") in kinds and ("executor", "answer") in kinds


# --------------------------------------------------------------------------- real engines


@pytest.fixture(scope="module")
def tiny_gen(tmp_path_factory, one_torch_thread):
    from slmforge.generate import TorchGenerator

    work = tmp_path_factory.mktemp("agent")
    # a tools prompt is ~1,100 tokens with a 400-token vocabulary: a longer window than TINY's 1,024
    model = build_peaky_model(build_tiny_tokenizer(work, vocab_size=400), work / "model",
                              TINY.model_copy(update={"max_position_embeddings": 4096}))
    return TorchGenerator.from_pretrained(model, device="cpu")


def test_native_and_react_turns_are_valid_calls_on_a_constraining_engine(tiny_gen):
    """A random tiny model knows nothing, yet every turn it writes is a valid call (or answer): the loop
    constrains each turn to the tools' schemas."""
    for mode in ("native", "react"):
        result = Agent(tiny_gen, [population, calculator()], mode=mode, budget=Budget(max_steps=3),
                       params=SamplingParams(max_new_tokens=48)).run("Population of Oslo?")
        assert result.steps and all(s.kind in ("call", "answer", "error") for s in result.steps), \
            [(s.kind, s.reply) for s in result.steps]


def test_an_agent_drives_our_server_through_tools(tiny_gen):
    """The agent over /v1/chat/completions with tools (OpenAIGenerator.chat_tools): the server constrains
    each reply to a call, so every step is a valid call."""
    from slmforge.generate import OpenAIGenerator
    from slmforge.serve import create_app

    with LiveServer(create_app({"tiny": tiny_gen}, max_batch_size=4)) as url:
        remote = OpenAIGenerator(url, "tiny")
        result = Agent(remote, [population, calculator()], budget=Budget(max_steps=3),
                       params=SamplingParams(max_new_tokens=48)).run("Population of Oslo?")
    assert result.steps and all(s.kind in ("call", "answer", "error") for s in result.steps), \
        [(s.kind, s.reply) for s in result.steps]
    assert all(s.tokens > 0 for s in result.steps)


def test_cli_agent_run_denies_high_stakes_tools_without_a_terminal(tmp_path, monkeypatch):
    """`slmforge agent run` in a non-interactive run: a write is denied (deny by default), the trace is
    written, the answer printed; --approve all lets it through."""
    from typer.testing import CliRunner

    import slmforge.cli.generate_cmd as generate_cmd
    from slmforge.cli.main import app

    monkeypatch.chdir(tmp_path)
    script = [call("write_file", path="a.txt", content="hi"), call("final_answer", answer="wrote it")]
    monkeypatch.setattr(generate_cmd, "load_model", lambda *a, **k: Scripted(list(script)))
    r = CliRunner().invoke(app, ["agent", "run", "Write hi to a.txt", "-m", "m", "-t", "files", "--trace", "t.jsonl"])
    assert r.exit_code == 0, r.output
    assert "wrote it" in r.stdout and "denied write_file" in r.stderr and not (tmp_path / "workspace" / "a.txt").exists()
    assert [json.loads(x)["kind"] for x in (tmp_path / "t.jsonl").read_text().splitlines()] == ["denied", "answer"]
    r = CliRunner().invoke(app, ["agent", "run", "Write hi", "-m", "m", "-t", "files", "--approve", "all", "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["steps"][0]["kind"] == "call"
    assert (tmp_path / "workspace" / "a.txt").read_text() == "hi"
    r = CliRunner().invoke(app, ["agent", "run", "x", "-t", "nope"])
    assert isinstance(r.exception, AgentError) and "Unknown tool 'nope'" in str(r.exception)
    r = CliRunner().invoke(app, ["agent", "tools", "-t", "calculator", "-t", "files"])
    names = [(t["function"]["name"], t["high_stakes"]) for t in json.loads(r.stdout)]
    assert names == [("calculator", False), ("list_files", False), ("read_file", False), ("write_file", True)]


def test_cli_agent_run_plans_and_routes(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import slmforge.cli.generate_cmd as generate_cmd
    from slmforge.cli.main import app

    monkeypatch.chdir(tmp_path)
    script = ['{"steps": ["Compute 6 * 7", "Add 1"]}', call("calculator", expression="6 * 7"),
              call("final_answer", answer="42"), call("calculator", expression="42 + 1"),
              call("final_answer", answer="43")]
    monkeypatch.setattr(generate_cmd, "load_model", lambda *a, **k: Scripted(list(script)))
    r = CliRunner().invoke(app, ["agent", "run", "6 * 7 + 1?", "-m", "m", "--plan", "--trace", "t.jsonl"])
    assert r.exit_code == 0 and r.stdout.strip() == "43" and "plan step 2: Add 1 -> 43" in r.stderr
    (tmp_path / "slmforge.yaml").write_text(
        "agent:\n  specialists:\n    math: {description: arithmetic, tools: [calculator]}\n"
        "    files: {description: files in the workspace, tools: [files]}\n")
    script[:] = ['{"agent": "files"}', call("list_files"), call("final_answer", answer="empty")]
    r = CliRunner().invoke(app, ["agent", "run", "What files are there?", "-m", "m", "--route"])
    assert r.exit_code == 0 and "routed to files (model)" in r.stderr and r.stdout.strip() == "empty"


def test_knowledge_search_and_http_tools(tmp_path):
    """search_documents cites passages of a rag index; http_get fetches only from allowed hosts (and not
    through a redirect to another host)."""
    import http.server
    import threading

    from slmforge.agents import http_fetch, knowledge_search
    from slmforge.data import Document
    from slmforge.rag import ChunkSettings, HashingEmbedder, Index

    index = Index.open(tmp_path / "idx", HashingEmbedder(64), "lancedb")
    index.update([Document("1", "The garden gets full sun. Tomatoes need water daily.", "src", "md",
                           path="docs/garden.md", title="Garden"),
                  Document("2", "Invoices are due in thirty days.", "src", "md", path="docs/billing.md", title="B")],
                 ChunkSettings("sentence", size=8, overlap=0), progress=False)
    found = knowledge_search(index, k=1, mode="bm25").fn(query="tomatoes water")
    assert found.startswith("[1] docs/garden.md:") and "Tomatoes need water daily." in found

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/away":
                self.send_response(302)
                self.send_header("Location", "http://example.invalid/x")
                self.end_headers()
                return
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"hello from the allowed host")

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        get = http_fetch(["127.0.0.1"])
        port = server.server_address[1]
        assert get.high_stakes and get.fn(url=f"http://127.0.0.1:{port}/") == "HTTP 200\nhello from the allowed host"
        assert get.fn(url=f"http://127.0.0.1:{port}/away").startswith("Refused: example.invalid")
        assert get.fn(url="http://localhost:1/").startswith("Refused: localhost")
        assert get.fn(url="file:///etc/passwd").startswith("Refused")
    finally:
        server.shutdown()
    with pytest.raises(AgentError, match="HTTP fetch is off"):
        http_fetch([])
