"""The engine contract: what the server and the evaluation runner may ask of an engine.

``Generator`` (four methods) is what any caller may hand in. ``Engine`` (in ``slmforge.generate``) is
the whole contract that every engine of the table ``ENGINES`` keeps: its name, context window, token
counting, chat rendering, how many requests it takes at once, batches of chats, and a declared set of
``Capabilities``. A capability obliges members (``REQUIRED``): ``EngineBase.__init_subclass__`` refuses
an engine class that declares one without them, so a broken engine fails at import, not mid-request.

Nothing outside this module probes an engine with ``getattr``/``hasattr``. The one place that does is
``as_engine``: it lends the contract's defaults to a plain ``Generator`` written without it (a test's
scripted fake, a user's own class) and reads the few optional members such objects had before.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from slmforge.generate import Completion, Message, SamplingParams


@dataclass(frozen=True)
class Capabilities:
    """What an engine can do beyond the contract every engine keeps. Each True field obliges the
    members ``REQUIRED`` lists; the server and the evaluation runner read these, never the members."""

    batching: bool = False  # the server decodes it with continuous batching (serve._batch, a backend per engine)
    loglikelihood: bool = False  # loglikelihood(requests, batch_size): multiple-choice evaluation
    grammar: bool = False  # chat()/stream() take json_schema=: the engine's own grammar engine constrains output
    adapters: bool = False  # LoRA adapters: adapters, set_adapter(name | None), active_adapter
    beams: bool = False  # beam search (SamplingParams.num_beams > 1)
    prompt_logprobs: bool = False  # prompt_logprobs(ids, top, adapter): echo with logprobs
    perplexity: bool = False  # model and tokenizer: a transformers causal LM that evaluate.perplexity scores
    tools: bool = False  # chat_tools(messages, params, tools, tool_choice): the endpoint's own function calling

    def declared(self) -> list[str]:
        """The names of the capabilities set, in declaration order."""
        return [f.name for f in fields(self) if getattr(self, f.name)]


# The members each capability obliges; ``name(param)`` is a method that takes that keyword.
REQUIRED: dict[str, tuple[str, ...]] = {
    "batching": ("tokenizer", "eos_token_ids", "pad_token_id", "encode"),
    "loglikelihood": ("loglikelihood",),
    "grammar": ("chat(json_schema)", "stream(json_schema)"),
    "adapters": ("adapters", "set_adapter", "active_adapter"),
    "beams": (),
    "prompt_logprobs": ("prompt_logprobs",),
    "perplexity": ("model", "tokenizer"),
    "tools": ("chat_tools",),
}

# What every engine implements itself, and what every engine has (EngineBase gives the rest defaults).
OWN = ("complete", "chat", "stream")
CONTRACT = ("complete", "chat", "stream", "complete_batch", "chat_batch", "engine", "capabilities",
            "context_length", "parallel", "count_tokens", "render_chat")


def has_member(cls: type, member: str) -> bool:
    """Whether instances of ``cls`` have ``member``: a class attribute, a method or property, or an
    attribute annotated on the class (set in ``__init__``); ``name(param)`` checks a method's keyword."""
    name, _, param = member.partition("(")
    for klass in cls.__mro__:
        if klass is object:
            continue
        if name in vars(klass):
            if not param:
                return True
            return param.rstrip(")") in inspect.signature(vars(klass)[name]).parameters
        if not param and name in vars(klass).get("__annotations__", {}):
            return True
    return False


def missing_members(cls: type, capabilities: Capabilities) -> list[str]:
    """The members ``capabilities`` oblige that ``cls`` lacks."""
    return [m for c in capabilities.declared() for m in REQUIRED[c] if not has_member(cls, m)]


class EngineBase:
    """The contract's defaults, for an engine to subclass. A subclass sets ``engine`` (its name in
    ``ENGINES``) and ``capabilities``, and implements ``complete``, ``chat`` and ``stream``; it overrides
    the rest where it can do better (a local tokenizer counts tokens, a chat template renders chats).

    Raises:
        TypeError: At class definition, a subclass without ``complete``, ``chat`` or ``stream``, or a
            capability declared without the members it obliges.
    """

    engine: str = ""  # the engine's name in ENGINES (what engine_for answers, serve.models[].engine)
    capabilities: Capabilities = Capabilities()
    context_length: int | None = None  # the context window in tokens, where the engine knows one
    parallel: int = 1  # requests the engine takes at once (the server's semaphore for it)
    kv_cache_bytes: int | None = None  # memory its slots reserve for KV caches up front (llama.cpp), where known

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        own = [m for m in OWN if not has_member(cls, m)]
        if own:
            raise TypeError(f"{cls.__name__} is an engine without {', '.join(own)}: every engine implements "
                            f"{', '.join(OWN)} itself (slmforge.generate.Generator).")
        missing = missing_members(cls, cls.capabilities)
        if missing:
            raise TypeError(
                f"{cls.__name__} declares the capabilities {', '.join(cls.capabilities.declared())} but lacks "
                f"{', '.join(missing)} (slmforge.generate._contract.REQUIRED); implement them, or leave the "
                "capability False."
            )

    if TYPE_CHECKING:  # the engine's own (checked above); declared here for the type checker only

        def complete(self, prompt: str, params: SamplingParams) -> list[Completion]: ...

        def chat(self, messages: list[Message], params: SamplingParams) -> list[Completion]: ...

        def stream(self, prompt: str | list[Message], params: SamplingParams) -> Iterator[str]: ...

    def complete_batch(self, prompts: list[str], params: SamplingParams) -> list[list[Completion]]:
        """``params.n`` completions per prompt, one prompt after another."""
        return [self.complete(p, params) for p in prompts]

    def chat_batch(self, conversations: list[list[Message]], params: SamplingParams) -> list[list[Completion]]:
        """``params.n`` replies per conversation, one conversation after another."""
        return [self.chat(c, params) for c in conversations]

    def count_tokens(self, text: str, special: bool = True) -> int:
        """Tokens the model would see for ``text`` (``special``: with BOS as a plain prompt gets it);
        0 for an engine without a local tokenizer."""
        return 0

    def fim_prompt(self, prefix: str, suffix: str) -> str | None:
        """The prompt asking the model for the code between ``prefix`` and ``suffix`` (fill-in-the-middle,
        ``slmforge.tokenizer.fim``), or None when the model has no FIM sentinel tokens or the engine cannot tell."""
        return None

    def render_chat(self, messages: list[Message]) -> str:
        """The prompt text the engine makes of a conversation. An engine that renders chats out of sight
        (an HTTP endpoint) gives the contents joined, which is good enough to count and size them.

        Raises:
            GenerateError: Messages the chat template refuses.
        """
        return "\n".join(m["content"] for m in messages)


def as_engine(gen: Any) -> EngineBase:
    """``gen`` as the engine contract: itself when it keeps the contract (an ``EngineBase``), else a view
    that gives a plain ``Generator`` the contract's defaults."""
    return gen if isinstance(gen, EngineBase) else _Plain(gen)


class _Plain(EngineBase):
    """The contract over a plain ``Generator``. Such an object declares nothing, so what it offers is
    read from the members it has, as the server and the runner read every engine before the contract:
    ``loglikelihood``, ``parallel``, ``tokenizer``/``tokenize``, ``render_chat``, ``context_length``,
    ``model`` (perplexity). It is never batched, constrained or given adapters by the server."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.engine = type(inner).__name__
        self.capabilities = Capabilities(loglikelihood=callable(getattr(inner, "loglikelihood", None)),
                                         perplexity=hasattr(inner, "model"))
        self.parallel = max(1, int(getattr(inner, "parallel", 1)))
        self.context_length = _context_length(inner)

    def complete(self, prompt: str, params: SamplingParams) -> list[Completion]:
        return self.inner.complete(prompt, params)

    def chat(self, messages: list[Message], params: SamplingParams) -> list[Completion]:
        return self.inner.chat(messages, params)

    def stream(self, prompt: str | list[Message], params: SamplingParams) -> Iterator[str]:
        return self.inner.stream(prompt, params)

    def complete_batch(self, prompts: list[str], params: SamplingParams) -> list[list[Completion]]:
        if hasattr(self.inner, "complete_batch"):
            return self.inner.complete_batch(prompts, params)
        return super().complete_batch(prompts, params)

    def chat_batch(self, conversations: list[list[Message]], params: SamplingParams) -> list[list[Completion]]:
        if hasattr(self.inner, "chat_batch"):
            return self.inner.chat_batch(conversations, params)
        return super().chat_batch(conversations, params)

    def loglikelihood(self, requests: list[tuple[str, str]], batch_size: int = 8) -> list[float]:
        return self.inner.loglikelihood(requests, batch_size=batch_size)

    def count_tokens(self, text: str, special: bool = True) -> int:
        tokenizer = getattr(self.inner, "tokenizer", None)
        if callable(tokenizer):
            return len(tokenizer(text, add_special_tokens=special)["input_ids"])
        tokenize = getattr(self.inner, "tokenize", None)
        return len(tokenize(text, add_special=special)) if callable(tokenize) else 0

    def render_chat(self, messages: list[Message]) -> str:
        render = getattr(self.inner, "render_chat", None)
        return render(messages) if callable(render) else super().render_chat(messages)


def _context_length(gen: Any) -> int | None:
    for holder in (gen, getattr(getattr(gen, "model", None), "config", None)):
        for attr in ("context_length", "max_position_embeddings"):
            value = getattr(holder, attr, None)
            if isinstance(value, int) and value > 0:
                return value
    return None
