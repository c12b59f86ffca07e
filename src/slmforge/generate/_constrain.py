"""Constrained decoding: JSON schemas, regular expressions and OpenAI-style tool calls.

A ``Constraint`` is a regular expression compiled once against a tokenizer's vocabulary;
each generated sequence walks it with its own ``ConstraintState``, which allows only tokens
that keep the text a prefix of a match (and, given a token budget, only those after which a
complete text still fits). The work is split by layer, each module importing only the ones
before it:

- ``_vocab``: token ids to the bytes they stand for (byte-level BPE, SentencePiece), cached.
- ``_automaton``: ``Constraint``, ``ConstraintState``, batched logits masking, the per-state
  budget distance tables, compilation and its cache; ``regex_constraint``.
- ``_schema``: JSON schema to regex, refusing keywords a regex cannot enforce;
  ``json_schema_constraint``, ``validate_json``.
- ``_tools``: OpenAI ``tools``/``tool_choice`` checks, the tool-call schema and constraint,
  the tools system prompt, chat history for a ChatML template, parsing calls back.

This module is the one place the rest of ``generate/`` (and its public lazy table) imports
them from.
"""

from __future__ import annotations

from slmforge.generate._automaton import Constraint, ConstraintState, mask_logits_rows_, regex_constraint
from slmforge.generate._schema import json_schema_constraint, validate_json
from slmforge.generate._tools import (
    chat_messages_for_template,
    check_tools,
    parallel_calls,
    parse_tool_call,
    parse_tool_calls,
    tool_call_schema,
    tool_constraint,
    tools_system_prompt,
)

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
