"""Tools: typed Python functions whose name, description and JSON schema come from the function itself.

    @tool
    def convert(amount: float, unit: Literal["km", "mi"] = "km") -> str:
        '''Convert a distance.

        Args:
            amount: The distance to convert.
            unit: The unit it is given in.
        '''

    convert.openai()   # {"type": "function", "function": {"name": "convert", "description": ..., "parameters": ...}}

The schema is pydantic's for a model made of the signature (types, ``Literal`` and ``Enum`` as enums,
defaults, ``X | None`` as optional), with the Google/NumPy/reST parameter docs (docstring-parser) as
descriptions. Arguments are validated against the schema (jsonschema, as the server validates calls)
and then by pydantic, before the function runs; a tool marked ``high_stakes`` (writes, code, network)
runs only when an approver says yes (``slmforge.agents.loop``).
"""

from __future__ import annotations

import inspect
import json
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from slmforge.errors import AgentError

_NAME_OK = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")


class ToolArgumentError(AgentError):
    """A call's arguments do not fit the tool's schema (fed back to the model, never raised to the user)."""


@dataclass
class Tool:
    """A function an agent may call.

    Attributes:
        name: What the model calls it (1-64 letters, digits, ``_`` or ``-``).
        description: What it does, for the model (the docstring's summary and body).
        parameters: The JSON schema of its keyword arguments (an object schema).
        fn: The function.
        high_stakes: Writes, runs code or reaches the network: runs only when approved.
    """

    name: str
    description: str
    parameters: dict[str, Any]
    fn: Callable[..., Any]
    high_stakes: bool = False
    _model: Any = field(default=None, repr=False)

    def openai(self) -> dict[str, Any]:
        """The tool as an OpenAI ``tools`` entry (what ``/v1/chat/completions`` and the agent loop send)."""
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}

    def validate(self, arguments: Any) -> dict[str, Any]:
        """The arguments as the function takes them.

        Raises:
            ToolArgumentError: Not an object, or not valid against the schema; the message names each
                problem by its path, for the model to correct.
        """
        from jsonschema import Draft202012Validator

        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError as e:
                raise ToolArgumentError(f"arguments of {self.name} are not JSON: {e.msg} at char {e.pos}.") from None
        if not isinstance(arguments, dict):
            raise ToolArgumentError(f"arguments of {self.name} must be a JSON object; got {json.dumps(arguments)}.")
        errors = sorted(Draft202012Validator(self.parameters).iter_errors(arguments), key=lambda e: list(e.path))
        if errors:
            problems = "; ".join(f"{'/'.join(map(str, e.path)) or '(arguments)'}: {e.message}" for e in errors[:5])
            raise ToolArgumentError(f"invalid arguments for {self.name}: {problems}.")
        if self._model is None:
            return dict(arguments)
        import pydantic

        try:
            checked = self._model.model_validate(arguments)
        except pydantic.ValidationError as e:
            problems = "; ".join(f"{'/'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors()[:5])
            raise ToolArgumentError(f"invalid arguments for {self.name}: {problems}.") from None
        return {k: getattr(checked, k) for k in type(checked).model_fields}

    def __call__(self, **arguments: Any) -> Any:
        return self.fn(**arguments)


def tool(fn: Callable[..., Any] | None = None, *, name: str | None = None, high_stakes: bool = False,
         description: str | None = None) -> Any:
    """Make a ``Tool`` of a typed function; usable bare (``@tool``) or with options
    (``@tool(high_stakes=True)``).

    Raises:
        AgentError: A parameter without a type annotation, ``*args``/``**kwargs``, a bad name, or a type
            pydantic cannot describe as JSON schema.
    """

    def make(f: Callable[..., Any]) -> Tool:
        return _make_tool(f, name or f.__name__, high_stakes, description)

    return make(fn) if fn is not None else make


def _make_tool(fn: Callable[..., Any], name: str, high_stakes: bool, description: str | None) -> Tool:
    import docstring_parser
    import pydantic

    if not name or len(name) > 64 or not set(name) <= _NAME_OK:
        raise AgentError(f"Tool name {name!r} must be 1-64 letters, digits, '_' or '-' (OpenAI's rule for tools).")
    doc = docstring_parser.parse(inspect.getdoc(fn) or "")
    described = {p.arg_name: p.description for p in doc.params}
    try:
        hints = typing.get_type_hints(fn)
    except Exception as e:  # a forward reference that does not resolve
        raise AgentError(f"Tool {name}: its type annotations do not resolve ({e}).") from None
    fields: dict[str, Any] = {}
    for pname, p in inspect.signature(fn).parameters.items():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            raise AgentError(f"Tool {name}: *{pname} cannot be described to a model; name every parameter.")
        if pname not in hints:
            raise AgentError(f"Tool {name}: parameter {pname!r} has no type annotation; the schema is derived "
                             "from the annotations (e.g. `city: str`, `days: int = 3`).")
        default = ... if p.default is p.empty else p.default
        fields[pname] = (hints[pname], pydantic.Field(default, description=described.get(pname)))
    try:
        model = pydantic.create_model(f"{name}_arguments", **fields)
        schema = model.model_json_schema()
    except (pydantic.PydanticSchemaGenerationError, TypeError) as e:
        raise AgentError(f"Tool {name}: a parameter type has no JSON schema ({e}).") from None
    schema = _tidy(schema)
    schema["additionalProperties"] = False
    schema.setdefault("properties", {})
    text = description or "\n\n".join(x for x in (doc.short_description, doc.long_description) if x) or name
    return Tool(name=name, description=text.strip(), parameters=schema, fn=fn, high_stakes=high_stakes,
                _model=model)


def _tidy(node: Any) -> Any:
    """Drop pydantic's generated ``title`` annotations (noise in a prompt), keeping a property named title."""
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            if k == "title" and isinstance(v, str):
                continue
            out[k] = {pk: _tidy(pv) for pk, pv in v.items()} if k in ("properties", "$defs") else _tidy(v)
        return out
    if isinstance(node, list):
        return [_tidy(v) for v in node]
    return node


def as_tools(items: list[Any]) -> list[Tool]:
    """Tools from ``Tool`` objects and plain typed functions (made into tools).

    Raises:
        AgentError: Two tools with one name, or something that is neither.
    """
    out: list[Tool] = []
    for item in items:
        t = item if isinstance(item, Tool) else tool(item) if callable(item) else None
        if t is None:
            raise AgentError(f"{item!r} is not a tool: give Tool objects or typed functions.")
        if any(o.name == t.name for o in out):
            raise AgentError(f"Two tools are named {t.name!r}; tool names must be unique.")
        out.append(t)
    return out
