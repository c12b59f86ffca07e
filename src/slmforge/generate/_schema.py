"""JSON schemas to regular expressions, refusing the keywords a regex cannot enforce.

JSON is generated compact (no whitespace between tokens): a small model left free
to add whitespace tends to emit it forever. Schema keywords that the regex cannot
enforce (``minimum``, ``uniqueItems``, ``not``...) are refused with a
``GenerateError`` rather than silently ignored, so constrained output always
validates against the schema it was asked for.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

from slmforge.errors import GenerateError
from slmforge.generate._automaton import _CONSTRAINTS, Constraint, _canonical, _compile, _eos_key

# No whitespace between JSON tokens: small models loop on free whitespace.
_WHITESPACE = ""
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
# Look-around and back-references: a "pattern" using them is not a regular language.
_NON_REGULAR = re.compile(r"\(\?<?[=!]|(?<!\\)(?:\\\\)*\\[1-9]|\\k<")
# An unescaped \d in the builder's regex (Rust reads it as any Unicode digit).
_UNICODE_DIGIT = re.compile(r"(?<!\\)((?:\\\\)*)\\d")


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
