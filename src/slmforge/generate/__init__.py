"""Generation: the ``Generator`` protocol, engine-neutral sampling parameters,
named sampling profiles, and the in-process torch engine.

    from slmforge.generate import SamplingParams, TorchGenerator, resolve_profile
    gen = TorchGenerator.from_pretrained("runs/sft")
    params = SamplingParams.from_profile(resolve_profile("balanced", "runs/sft"), max_new_tokens=64, seed=0)
    print(gen.complete("asyncio is", params)[0].text)
    for piece in gen.stream([{"role": "user", "content": "What is a coroutine?"}], params):
        print(piece, end="", flush=True)

Evaluation, RAG, agents and reasoning depend only on ``Generator`` (four methods).
Every engine (torch, ONNX Runtime, llama.cpp, OpenAI-compatible HTTP) keeps the
whole ``Engine`` contract besides: its name, context window, token counting, chat
rendering and a declared set of ``Capabilities`` (batching, log-likelihood,
grammar, adapters, beams...), which the server and the evaluation runner read
through ``as_engine`` instead of probing for attributes. ``ENGINES`` is the one
table of engines, for ``load_generator`` and the server alike. torch and
transformers are imported only when ``TorchGenerator`` is first used.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from slmforge.config import GenerateConfig, ProjectConfig, SamplingProfile
from slmforge.errors import GenerateError, ModelError
from slmforge.generate._contract import Capabilities, EngineBase, as_engine

if TYPE_CHECKING:
    from slmforge.generate._torch import TorchGenerator

__all__ = [
    "SamplingParams",
    "Completion",
    "Generator",
    "Engine",
    "EngineBase",
    "Capabilities",
    "as_engine",
    "EngineSpec",
    "ENGINES",
    "TorchGenerator",
    "profiles_from_model",
    "resolve_profile",
    "default_model_dir",
    "saved_profiles",
    "engine_for",
    "load_generator",
    "ENGINE_LOADERS",
    # served lazily from private modules (see ENGINES and _SHARED below)
    "OnnxGenerator",
    "LlamaCppGenerator",
    "OpenAIGenerator",
    "Decoder",
    "DecoderLayout",
    "ORT_LEVELS",
    "choose_providers",
    "StopCutter",
    "draw_token",
    "chat_messages_for_template",
    "check_tools",
    "json_schema_constraint",
    "parallel_calls",
    "parse_tool_calls",
    "tool_call_schema",
    "tool_constraint",
    "chat_with_tools",
    "chat_json",
]

Message = dict[str, str]  # {"role": "system" | "user" | "assistant", "content": "..."}


@dataclass
class SamplingParams:
    """How to sample, independent of the engine.

    ``temperature`` 0 means greedy decoding (or plain beam search when
    ``num_beams`` > 1); ``top_k``/``top_p`` None mean off; ``n`` is the number of
    completions returned per prompt.
    """

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    num_beams: int = 1
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    n: int = 1
    ignore_eos: bool = False  # keep going to max_new_tokens (benchmarks: a fixed number of tokens)

    @classmethod
    def from_profile(cls, profile: SamplingProfile, **overrides: Any) -> SamplingParams:
        """The profile's values, with every override that is not None taking precedence.

        Raises:
            TypeError: An override that is not a field of SamplingParams.
        """
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise TypeError(f"SamplingParams has no field(s) {', '.join(unknown)}; fields: {', '.join(sorted(names))}.")
        values = {k: v for k, v in profile.model_dump().items() if k in names}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    @property
    def plain_greedy(self) -> bool:
        """Greedy, one beam, no repetition penalty: each step's token is the argmax of the model's logits
        (what the torch engine's certified head needs; a constraint, bias or logprobs rule it out too)."""
        return self.temperature == 0 and self.num_beams == 1 and self.repetition_penalty == 1.0

    def validate(self) -> None:
        """Check the values every engine relies on.

        Raises:
            GenerateError: A value out of range, or n > 1 that greedy decoding cannot honour.
        """
        problems = []
        if self.max_new_tokens < 1:
            problems.append(f"max_new_tokens must be >= 1 (got {self.max_new_tokens})")
        if self.temperature < 0:
            problems.append(f"temperature must be >= 0 (got {self.temperature})")
        if self.top_k is not None and self.top_k < 1:
            problems.append(f"top_k must be >= 1 or unset (got {self.top_k})")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1] or unset (got {self.top_p})")
        if self.num_beams < 1:
            problems.append(f"num_beams must be >= 1 (got {self.num_beams})")
        if self.repetition_penalty <= 0:
            problems.append(f"repetition_penalty must be > 0 (got {self.repetition_penalty})")
        if self.n < 1:
            problems.append(f"n must be >= 1 (got {self.n})")
        if any(not isinstance(s, str) or not s for s in self.stop):
            problems.append(f"stop strings must be non-empty strings (got {self.stop!r})")
        if problems:
            raise GenerateError("Invalid sampling parameters: " + "; ".join(problems) + ".")
        if self.n > 1 and self.num_beams > 1 and self.n > self.num_beams:
            raise GenerateError(
                f"n={self.n} completions need at least as many beams: set num_beams >= {self.n} (--beams), "
                f"or lower n to {self.num_beams}."
            )
        if self.n > 1 and self.temperature == 0 and self.num_beams == 1:
            raise GenerateError(
                f"n={self.n} with temperature 0 would return {self.n} identical greedy completions. Set "
                f"temperature > 0 to sample different ones, or num_beams >= {self.n} (--beams) for the "
                f"{self.n} best beams."
            )


@dataclass
class Completion:
    """One generated text."""

    text: str  # special tokens removed; cut before the first stop string
    tokens: int  # tokens generated (an end-of-sequence token counts)
    finish_reason: str  # "stop" (end-of-sequence token or stop string) or "length" (max_new_tokens reached)
    # The tool calls the reply is, [{"name", "arguments"}], when it came from ``chat_with_tools`` and is calls.
    tool_calls: list[dict[str, Any]] | None = None


@runtime_checkable
class Generator(Protocol):
    """What every engine offers: completion, chat, streaming and batches, with n samples."""

    def complete(self, prompt: str, params: SamplingParams) -> list[Completion]:
        """``params.n`` completions of a plain-text prompt."""
        ...

    def chat(self, messages: list[Message], params: SamplingParams) -> list[Completion]:
        """``params.n`` assistant replies to a conversation, rendered with the model's chat template."""
        ...

    def stream(self, prompt: str | list[Message], params: SamplingParams) -> Iterator[str]:
        """Text pieces of one completion (a str prompt) or one assistant reply (a message list), as produced."""
        ...

    def complete_batch(self, prompts: list[str], params: SamplingParams) -> list[list[Completion]]:
        """``params.n`` completions for each prompt, in prompt order."""
        ...


@runtime_checkable
class Engine(Generator, Protocol):
    """The contract every engine of ``ENGINES`` keeps (by subclassing ``EngineBase``), and what the server
    and the evaluation runner read, through ``as_engine(generator)``, instead of probing for attributes.

    A capability declared True obliges further members (``Capabilities`` and ``_contract.REQUIRED``):
    ``batching`` the torch internals the server's continuous batching drives (``model``, ``tokenizer``,
    ``device``, ``eos_token_ids``, ``pad_token_id``, ``encode``); ``loglikelihood`` and
    ``prompt_logprobs`` those methods; ``grammar`` a ``json_schema`` keyword on ``chat`` and ``stream``;
    ``adapters`` ``adapters``, ``set_adapter`` and ``active_adapter``; ``perplexity`` ``model`` and
    ``tokenizer``; ``beams`` nothing (num_beams > 1 is accepted).
    """

    engine: str  # the engine's name in ENGINES
    capabilities: Capabilities
    context_length: int | None  # the context window in tokens, where the engine knows one
    parallel: int  # requests the engine takes at once

    def chat_batch(self, conversations: list[list[Message]], params: SamplingParams) -> list[list[Completion]]:
        """``params.n`` replies per conversation, in order."""
        ...

    def count_tokens(self, text: str, special: bool = True) -> int:
        """Tokens the model sees for ``text`` (``special``: with BOS); 0 without a local tokenizer."""
        ...

    def render_chat(self, messages: list[Message]) -> str:
        """The prompt text the engine makes of a conversation (joined contents where it renders remotely)."""
        ...


# Helpers of those modules that the layers above use, served the same lazy way: this package's
# public API, so that serve/ and export/ never import a private module of generate/.
_SHARED = {
    # the ONNX Runtime pieces the exporter builds and checks the graph with
    "Decoder": "slmforge.generate._onnx",
    "DecoderLayout": "slmforge.generate._onnx",
    "ORT_LEVELS": "slmforge.generate._onnx",
    "choose_providers": "slmforge.generate._onnx",
    # stop strings over a token stream, for the batching server
    "StopCutter": "slmforge.generate._text",
    "draw_token": "slmforge.generate._sampling",
    # constrained output and tool calls, for the server's response_format and tools
    "chat_messages_for_template": "slmforge.generate._constrain",
    "check_tools": "slmforge.generate._constrain",
    "json_schema_constraint": "slmforge.generate._constrain",
    "parallel_calls": "slmforge.generate._constrain",
    "parse_tool_calls": "slmforge.generate._constrain",
    "tool_call_schema": "slmforge.generate._constrain",
    "tool_constraint": "slmforge.generate._constrain",
    # one tool-calling turn over any engine, for agents
    "chat_with_tools": "slmforge.generate._toolchat",
    "chat_json": "slmforge.generate._toolchat",
}


def __getattr__(name: str) -> Any:
    module = _ENGINE_CLASSES.get(name) or _SHARED.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


def engine_for(path: str | Path) -> str:
    """Which engine runs a model: ``openai`` for an http(s) endpoint (``URL#MODEL``), ``llama.cpp`` for a
    .gguf file, ``onnx`` for an exported ONNX folder, ``torch`` for anything else (Hugging Face folder,
    adapter folder, hub id)."""
    from slmforge.artifacts import is_endpoint

    if is_endpoint(path):
        return "openai"
    p = Path(str(path))
    if p.suffix == ".gguf" or (p.is_dir() and any(p.glob("*.gguf")) and not (p / "config.json").exists()):
        return "llama.cpp"
    if p.is_dir() and ((p / "genai_config.json").exists() or any(p.glob("*.onnx"))):
        return "onnx"
    return "torch"


# --------------------------------------------------------------------------- the engine table


def _load_torch(path: str | Path, adapters: dict[str, str | Path] | None, device: str, **_: Any) -> EngineBase:
    from slmforge.generate._torch import TorchGenerator

    return TorchGenerator.from_pretrained(path, adapters=adapters or None, device=device)


def _load_onnx(path: str | Path, **_: Any) -> EngineBase:
    from slmforge.generate._onnx import OnnxGenerator

    return OnnxGenerator(Path(str(path)))


def _load_llamacpp(path: str | Path, parallel: int = 1, **_: Any) -> EngineBase:
    from slmforge.generate._llamacpp import LlamaCppGenerator

    p = Path(str(path))
    # A folder's model file, not the multimodal projector (mmproj-*.gguf) beside it.
    files = [f for f in sorted(p.glob("*.gguf")) if not f.name.startswith("mmproj")] if p.is_dir() else [p]
    if not files:
        raise ModelError(f"{path} holds no .gguf model file; point at the .gguf file itself.")
    return LlamaCppGenerator(files[0], parallel=parallel)


def _load_openai(path: str | Path, endpoints: list[Any] | None = None, **_: Any) -> EngineBase:
    from slmforge.generate._openai import OpenAIGenerator

    return OpenAIGenerator.from_ref(str(path), endpoints or ())


@dataclass(frozen=True)
class EngineSpec:
    """One engine: the class that keeps the ``Engine`` contract (in a private module, imported on first
    use so that importing this package imports no torch, onnxruntime or llama.cpp) and its loader,
    ``load(path, adapters=, device=, endpoints=, parallel=)``, which takes what it needs of those."""

    module: str
    class_name: str
    load: Callable[..., Any]

    @property
    def engine_class(self) -> type[EngineBase]:
        """The engine's class (imports its module)."""
        import importlib

        cls: type[EngineBase] = getattr(importlib.import_module(self.module), self.class_name)
        return cls

    @property
    def capabilities(self) -> Capabilities:
        """What the engine declares it can do (imports its module)."""
        return self.engine_class.capabilities


# The one table of engines: engine name (what ``engine_for`` answers, each class's ``engine``) -> its
# class and loader. ``load_generator`` and the server both load through it; every name is also a choice
# of serve.models[].engine in config.py (tests/test_tables.py, tests/test_engine_contract.py).
ENGINES: dict[str, EngineSpec] = {
    "torch": EngineSpec("slmforge.generate._torch", "TorchGenerator", _load_torch),
    "onnx": EngineSpec("slmforge.generate._onnx", "OnnxGenerator", _load_onnx),
    "llama.cpp": EngineSpec("slmforge.generate._llamacpp", "LlamaCppGenerator", _load_llamacpp),
    "openai": EngineSpec("slmforge.generate._openai", "OpenAIGenerator", _load_openai),
}

# The loaders alone, by engine name (the table's older face).
ENGINE_LOADERS = {name: spec.load for name, spec in ENGINES.items()}

# Engine classes by name, served lazily by the module __getattr__ above.
_ENGINE_CLASSES = {spec.class_name: spec.module for spec in ENGINES.values()}


def load_generator(path: str | Path, adapters: dict[str, str | Path] | None = None, device: str = "auto",
                   endpoints: list[Any] | None = None, engine: str | None = None, parallel: int = 1) -> Any:
    """The right engine for a model path (or ``http(s)://HOST/v1#MODEL`` endpoint), behind the Generator protocol.

    Args:
        path: A model folder, adapter folder, .gguf file or folder, ONNX export, hub id or endpoint.
        adapters: LoRA adapters over the model, name -> folder (engines with the ``adapters`` capability).
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (the torch engine).
        endpoints: ``generate.endpoints`` of the project file: which key each endpoint gets; an endpoint
            not listed gets none (OpenAI's API: ``OPENAI_API_KEY``).
        engine: A name of ``ENGINES``; None picks one from the path (``engine_for``).
        parallel: Requests the engine decodes together, for engines with slots (llama.cpp); others ignore it.

    Raises:
        GenerateError: An unknown engine name, or an engine that cannot load the model.
        ModelError: The model cannot be found or loaded.
    """
    name = engine or engine_for(path)
    spec = ENGINES.get(name)
    if spec is None:
        raise GenerateError(f"Unknown engine {name!r}; the engines are {', '.join(ENGINES)}.")
    return spec.load(path, adapters=adapters, device=device, endpoints=endpoints, parallel=parallel)


# --------------------------------------------------------------------------- profiles


def _generation_config_file(path: str | Path) -> Path | None:
    """The generation_config.json of a model folder, or of the base model an adapter folder names."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        return None  # a .gguf file or a hub id: no slmforge profiles
    if (folder / "generation_config.json").is_file():
        return folder / "generation_config.json"
    adapter = folder / "adapter_config.json"
    if adapter.is_file():
        try:
            base = json.loads(adapter.read_text(encoding="utf-8")).get("base_model_name_or_path")
        except (OSError, json.JSONDecodeError):
            return None
        if base:
            base_dir = Path(base) if Path(base).is_absolute() else folder / base
            if (base_dir / "generation_config.json").is_file():
                return base_dir / "generation_config.json"
    return None


def saved_profiles(path: str | Path) -> tuple[dict[str, SamplingProfile], str | None]:
    """The sampling profiles saved with a model and the name of its default profile.

    Args:
        path: A model folder (an adapter folder reads its base model's), a .gguf file or a hub id.

    Returns:
        (profile name -> profile, default profile name or None); ``({}, None)`` when the model carries none.

    Raises:
        GenerateError: The file is not valid JSON or holds an invalid profile.
    """
    from slmforge.model import read_profiles

    file = _generation_config_file(path)
    if file is None:
        return {}, None
    try:
        raw, default = read_profiles(file.parent)
    except (OSError, json.JSONDecodeError) as exc:
        raise GenerateError(f"Could not read {file}: {exc}. Fix or delete the file.") from None
    profiles = {}
    for name, values in raw.items():
        try:
            profiles[name] = SamplingProfile.model_validate(values)
        except ValueError as exc:  # pydantic's ValidationError is a ValueError
            raise GenerateError(
                f"{file}: sampling profile {name!r} is invalid ({str(exc).splitlines()[0]}). "
                "Fix it in the file, or save the model again."
            ) from None
    return profiles, default if isinstance(default, str) else None


def profiles_from_model(path: str | Path) -> dict[str, SamplingProfile]:
    """The sampling profiles saved in a model folder's ``generation_config.json``.

    Args:
        path: A model folder (an adapter folder reads its base model's), a .gguf file or a hub id.

    Returns:
        Profile name -> profile; empty when the model carries none.

    Raises:
        GenerateError: The file is not valid JSON or holds an invalid profile.
    """
    return saved_profiles(path)[0]


def resolve_profile(
    name: str | None, model_path: str | Path | None = None, cfg: GenerateConfig | ProjectConfig | None = None
) -> SamplingProfile:
    """Find a sampling profile by name: the model's saved profiles first, then the project's.

    Args:
        name: The profile's name; None means the model's default profile, else ``cfg.default_profile``,
            else plain greedy defaults.
        model_path: The model folder whose ``generation_config.json`` may hold profiles.
        cfg: The ``generate`` section (or the whole project config).

    Returns:
        The profile.

    Raises:
        GenerateError: No profile of that name; the message lists the known names.
    """
    if isinstance(cfg, ProjectConfig):
        cfg = cfg.generate
    model_profiles, model_default = saved_profiles(model_path) if model_path is not None else ({}, None)
    cfg_profiles = cfg.profiles if cfg is not None else {}
    explicit = name is not None
    if name is None:
        name = model_default or (cfg.default_profile if cfg is not None else None)
        if name is None:
            return SamplingProfile()
    if name in model_profiles:
        return model_profiles[name]
    if name in cfg_profiles:
        return cfg_profiles[name]
    known = list(dict.fromkeys([*model_profiles, *cfg_profiles]))
    what = f"Unknown sampling profile {name!r}" if explicit else f"The default sampling profile {name!r} does not exist"
    raise GenerateError(
        f"{what}; known profiles: {', '.join(known) or '(none)'}. Pick one with --profile, or add it under "
        "generate.profiles in the project file."
    )


def default_model_dir(cfg: ProjectConfig) -> Path:
    """The model a project generates with by default: ``artifacts.default_model`` (the sft stage's
    output, else the train stage's).

    Raises:
        GenerateError: Neither folder exists.
    """
    from slmforge.artifacts import default_model

    return default_model(cfg, "generate with", "pass --model with a model folder, a .gguf file or a hub id",
                         GenerateError)
