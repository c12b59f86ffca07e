"""The server's model table: what each ``model`` name a client sends is routed to."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from slmforge.config import ProjectConfig, SamplingProfile, ServeModelConfig
from slmforge.errors import ConfigError, GenerateError
from slmforge.generate import as_engine


@dataclass
class ServedModel:
    """One name clients can ask for.

    ``kind`` says which field is set: ``generate`` (``generator``, and ``batch`` when the engine (torch,
    ONNX Runtime) batches continuously; ``adapter`` picks a LoRA adapter inside it), ``embed`` (``embedder``) or
    ``upstream`` (``upstream``: a proxied OpenAI-compatible endpoint, e.g. a managed vLLM).
    """

    name: str
    kind: Literal["generate", "embed", "upstream"]
    generator: Any = None
    batch: Any = None  # serve._batch.BatchEngine
    adapter: str | None = None
    profiles: dict[str, SamplingProfile] = field(default_factory=dict)
    profile: str | None = None  # the default profile's name
    embedder: Any = None
    upstream: Any = None
    engine: str = "torch"
    knowledge: str | None = None  # answer every request from this knowledge base (serve/_knowledge.py)

    # What the server asks of the engine behind a name: the engine contract (slmforge.generate.Engine)
    # and its declared capabilities, read here so that a route handler reads the same for every engine.

    def card(self, created: int) -> dict[str, Any]:
        """The model's entry in ``/v1/models`` (OpenAI's fields, and ours: engine, kind, profiles)."""
        return {"id": self.name, "object": "model", "created": created, "owned_by": "slmforge",
                "engine": self.engine, "kind": self.kind, **({"adapter": self.adapter} if self.adapter else {}),
                **({"knowledge": self.knowledge} if self.knowledge else {}),
                "profiles": sorted(self.profiles), "default_profile": self.profile}

    def sampling_profile(self, name: str | None) -> SamplingProfile | None:
        """The profile a request names (else the model's default, else None: OpenAI's defaults).

        Raises:
            ApiError: 400 for a profile the model does not have.
        """
        from slmforge.serve.protocol import ApiError

        name = name or self.profile
        if name is None:
            return None
        if name not in self.profiles:
            raise ApiError(400, f"Unknown profile {name!r} for model {self.name!r}; known: "
                           f"{', '.join(sorted(self.profiles)) or '(none)'}.", "invalid_request_error", "profile")
        return self.profiles[name]

    @property
    def slots(self) -> int:
        """How many requests an engine without our batching takes at once (llama.cpp: its ``parallel``)."""
        return 1 if self.generator is None else max(1, int(as_engine(self.generator).parallel))

    @property
    def prompt_logprobs(self) -> bool:
        """Whether the engine scores a prompt's own tokens (``echo`` with ``logprobs``: the torch engine)."""
        return self.generator is not None and as_engine(self.generator).capabilities.prompt_logprobs

    @property
    def grammar(self) -> bool:
        """Whether the engine constrains output by its own grammar engine (llama.cpp) rather than ours."""
        return self.batch is None and self.generator is not None and as_engine(self.generator).capabilities.grammar

    def context_length(self) -> int | None:
        """The model's context window in tokens, where the engine knows one."""
        return None if self.generator is None else as_engine(self.generator).context_length

    def count_tokens(self, text: str, special: bool) -> int:
        """Tokens in a prompt, by the engine's tokenizer (llama.cpp: its own ``tokenize``); 0 for an engine
        that has none."""
        if self.generator is None:
            return 0
        try:
            return as_engine(self.generator).count_tokens(text, special)
        except Exception:  # usage is informative only; never fail a request over it
            return 0

    def fim_prompt(self, prefix: str, suffix: str) -> str | None:
        """The engine's fill-in-the-middle prompt, or None for a model without FIM tokens."""
        return None if self.generator is None else as_engine(self.generator).fim_prompt(prefix, suffix)

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        """The chat prompt as the engine renders it; for an engine that renders its own, the contents
        joined (only for counting tokens).

        Raises:
            ApiError: 400 (``param`` messages) for messages the chat template refuses.
        """
        from slmforge.serve.protocol import ApiError

        try:
            return as_engine(self.generator).render_chat(messages)
        except GenerateError as exc:
            raise ApiError(400, str(exc), "invalid_request_error", "messages") from None


def wrap_models(models: dict[str, Any], max_batch_size: int) -> dict[str, ServedModel]:
    """Plain engines -> served models: torch and ONNX generators get a continuous-batching engine (one per
    generator, shared by every name that points at it), embedders and upstreams their kinds."""
    from slmforge.embed import Embedder

    engines: dict[int, Any] = {}
    out: dict[str, ServedModel] = {}
    for name, value in models.items():
        if isinstance(value, ServedModel):
            out[name] = value
        elif isinstance(value, Embedder):
            out[name] = ServedModel(name, "embed", embedder=value, engine="embedding")
        elif hasattr(value, "post") and hasattr(value, "stream") and hasattr(value, "aclose"):
            out[name] = ServedModel(name, "upstream", upstream=value, engine="openai")
        else:
            engine = as_engine(value)
            served = ServedModel(name, "generate", generator=value, engine=engine.engine)
            if engine.capabilities.batching:
                if id(value) not in engines:
                    engines[id(value)] = _batch_engine(value, max_batch_size)
                served.batch = engines[id(value)]
            if engine.capabilities.adapters:
                # loaded from an adapter folder: served through that adapter; a bare base model: none
                served.adapter = engine.active_adapter
            out[name] = served
    return out


def _batch_engine(gen: Any, max_batch_size: int):
    from slmforge.serve._batch import BatchEngine

    return BatchEngine(gen, max_batch_size=max_batch_size)


def model_configs(cfg: ProjectConfig, refs: list[tuple[str, str]], adapters: dict[str, str]) -> list[ServeModelConfig]:
    """The models to serve: command-line ``refs`` (name, path) when given, else the project file's
    ``serve.models``, else the project's sft (or train) output. ``adapters`` from the command line
    go over the first model."""
    if refs:
        models = [ServeModelConfig(name=n, path=p) for n, p in refs]
    elif cfg.serve.models:
        models = [m.model_copy(deep=True) for m in cfg.serve.models]
    else:
        from slmforge.generate import default_model_dir

        try:
            folder = default_model_dir(cfg)
        except Exception as exc:
            raise ConfigError(f"No model to serve: {exc} Or list models under serve.models in the project file.") from None
        models = [ServeModelConfig(name=folder.name, path=str(folder))]
    if adapters:
        models[0].adapters.update(adapters)
    names = [m.name for m in models] + [a for m in models for a in m.adapters]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"Two served models (or adapters) are named {', '.join(dupes)}; every name must be unique.")
    return models


def load_models(cfg: ProjectConfig, models: list[ServeModelConfig], device: str,
                max_batch_size: int) -> tuple[dict[str, ServedModel], list[Any]]:
    """Load every model of the table. Returns (name -> served model, things to stop on shutdown).

    Raises:
        ConfigError: A model entry is incomplete (no path, no base_url) or names an unknown profile.
        ModelError: A model cannot be loaded.
    """
    from slmforge.generate import ENGINES, GenerateError, engine_for, load_generator, resolve_profile, saved_profiles

    out: dict[str, ServedModel] = {}
    closers: list[Any] = []
    first_of: dict[tuple[str, str], str] = {}  # (path, engine) -> the name that loaded it (no adapters)
    for m in models:
        where = f"serve.models[{m.name}]"
        path = _resolve(cfg, m.path) if m.path else None
        if m.engine in ("openai", "vllm"):
            from slmforge.serve._upstream import VllmServer, upstream_from_config

            timeout = cfg.serve.request_timeout_s or 600.0
            if m.engine == "openai":
                upstreams = {m.name: upstream_from_config(m, timeout_s=timeout)}
            else:
                if not path:
                    raise ConfigError(f"{where}: engine vllm needs path (a model folder or hub id).")
                vllm = VllmServer(m, resolve=lambda p: _resolve(cfg, p), request_timeout_s=timeout)
                vllm.start()
                closers.append(vllm)
                upstreams = vllm.upstreams()  # the base model and each LoRA adapter under its own name
            for name, upstream in upstreams.items():
                closers.insert(0, upstream)  # clients close before the vLLM process stops
                out[name] = ServedModel(name, "upstream", upstream=upstream, engine=m.engine)
            continue
        if not path:
            raise ConfigError(f"{where}: give path (a model folder, .gguf file, ONNX export or hub id).")
        if m.engine == "embedding":
            from slmforge.embed import Embedder

            out[m.name] = ServedModel(m.name, "embed", embedder=Embedder.load(path, device="cpu" if device == "auto"
                                                                               else device), engine="embedding")
            continue
        adapters = {name: _resolve(cfg, p) for name, p in m.adapters.items()}
        if not adapters and (path, m.engine) in first_of:  # another name for a loaded model (e.g. grounded)
            out[m.name] = replace(out[first_of[path, m.engine]], name=m.name, knowledge=m.knowledge)
            continue
        kind = engine_for(path) if m.engine == "auto" else m.engine
        if adapters and not ENGINES[kind].capabilities.adapters:
            raise ConfigError(f"{where}: LoRA adapters need the torch engine (got engine {kind}).")
        gen = load_generator(path, adapters=adapters or None, device=device, endpoints=cfg.generate.endpoints,
                             engine=kind, parallel=max_batch_size)
        if adapters:
            gen.set_adapter(None)  # the base name serves the bare base; each adapter name its adapter
        profiles = _profiles(cfg, path)
        # No profile named: the model folder's own default (saved with it), else OpenAI's request defaults.
        profile = m.profile if m.profile is not None else saved_profiles(path)[1]
        if m.profile is not None:
            try:
                resolve_profile(m.profile, path, cfg.generate)
            except GenerateError as exc:
                raise ConfigError(f"{where}.profile: {exc}") from None
        table = wrap_models({m.name: gen}, max_batch_size)
        base = table[m.name]
        base.profiles, base.profile = profiles, profile if profile in profiles else None
        base.knowledge = m.knowledge
        out[m.name] = base
        if not adapters:
            first_of[path, m.engine] = m.name
        for adapter in adapters:
            out[adapter] = ServedModel(adapter, "generate", generator=gen, batch=base.batch, adapter=adapter,
                                       profiles=profiles, profile=base.profile, engine=base.engine)
    return out, closers


def describe(served: dict[str, ServedModel]) -> list[str]:
    """One line per served name: engine, batching, adapter and default profile (the server's start-up log)."""
    lines = []
    for name, m in served.items():
        bits = [m.engine]
        if m.slots > 1:
            bits.append(f"{m.slots} {m.engine} slots")
        kv = as_engine(m.generator).kv_cache_bytes if m.generator is not None else None
        if kv is not None:  # llama.cpp: every slot holds a whole context; say what that costs
            bits.append(f"KV cache {kv / 2**20:,.0f} MiB")
        if m.batch is not None:
            bits.append(f"continuous batching up to {m.batch.max_batch_size}")
        if m.adapter:
            bits.append(f"LoRA adapter {m.adapter}")
        if m.profile:
            bits.append(f"profile {m.profile}")
        lines.append(f"{name}: {', '.join(bits)}")
    return lines


def _resolve(cfg: ProjectConfig, path: str) -> str:
    """A path from the project file, against the file's folder; what does not exist there (a hub id) as is."""
    resolved = cfg.resolve(path)
    return str(resolved) if resolved.exists() or Path(path).expanduser().is_absolute() else path



def _profiles(cfg: ProjectConfig, path: str) -> dict[str, SamplingProfile]:
    """Profiles a request may name: the project's, then the model folder's (which win)."""
    from slmforge.generate import profiles_from_model

    return {**cfg.generate.profiles, **profiles_from_model(path)}
