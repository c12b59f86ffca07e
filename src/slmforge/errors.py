"""Typed errors. Library code raises these; only ``slmforge.cli`` turns them into
a message and an exit code.

Every message is meant to be read by a person: it says what was wrong, where
(file, line, key) and what to do about it, in one paragraph.
"""

from __future__ import annotations


class SlmForgeError(Exception):
    """Base class of every error slmforge raises on purpose."""

    exit_code = 1


class ConfigError(SlmForgeError):
    """The project file or a ``--set`` override is malformed or invalid."""

    exit_code = 2


class ArtifactError(SlmForgeError):
    """An artifact folder is missing, incomplete, or its manifest does not match its files."""


class DataError(SlmForgeError):
    """The data stage cannot run (no sources, no documents left, unreachable teacher...)."""


class TokenizerError(SlmForgeError):
    """Tokenizer training, extension, loading or analysis failed."""


class ModelError(SlmForgeError):
    """A model cannot be built, found or loaded."""


class TrainError(SlmForgeError):
    """Training cannot start or continue (bad data, incompatible checkpoint, missing hardware)."""


class GenerateError(SlmForgeError):
    """Generation was asked for something the engine or model cannot do."""


class EvalError(SlmForgeError):
    """An evaluation suite, model or gate is malformed, or a gate failed to parse."""


class GateFailed(SlmForgeError):
    """A quality gate failed: the numbers did not meet the project's bar."""

    exit_code = 3


class SandboxError(SlmForgeError):
    """The sandbox itself cannot run (bad limits, interpreter not runnable in the box).

    A program that misbehaves is never an error: it is a result with a status.
    """


class RagError(SlmForgeError):
    """A knowledge index cannot be built or read as asked (another embedder, another store, a damaged index)."""


class AgentError(SlmForgeError):
    """An agent or tool is misdefined (a tool without types, an unknown tool, a workspace outside its
    folder), or an agent run cannot start."""


class ReasoningError(SlmForgeError):
    """A reasoning strategy or the proxy got settings it cannot honour (unknown strategy, n < 1...)."""
