"""OpenAI tool calls: checking ``tools``/``tool_choice``, the call schema and its constraint,
the system prompt, a conversation rendered for a plain ChatML template, and parsing calls back.

Pure Python apart from the constraint (no torch). A call is written as one JSON object
``{"name": ..., "arguments": {...}}`` alone; parallel calls, as a JSON array of them.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Sequence
from typing import Any

from slmforge.errors import GenerateError
from slmforge.generate._automaton import _CONSTRAINTS, Constraint, _canonical, _compile, _eos_key
from slmforge.generate._schema import _LITERAL_KEYS, _check_schema, _schema_regex

# Free text under tool_choice "auto": an optional space (SentencePiece models start words
# with one), then a character that is neither whitespace nor "{", then anything. It never
# matches the empty string: an index whose start state is final loses the start state's
# transitions in outlines_core 0.2.14.
_FREE_TEXT = r" ?[^{\s][\s\S]*"
_TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


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
