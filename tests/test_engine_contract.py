"""The engine contract (issue 11): every engine of ``ENGINES`` declares its name, context window, token
counting, chat rendering and capabilities; a capability is declared exactly when the engine implements
what it obliges; and ``load_generator`` and the server load through the same table.

No model is loaded: the checks read the engine classes, and the table tests swap in a scripted engine.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from slmforge.generate import (
    ENGINE_LOADERS,
    ENGINES,
    Capabilities,
    Completion,
    Engine,
    EngineBase,
    EngineSpec,
    Generator,
    SamplingParams,
    as_engine,
    load_generator,
)
from slmforge.generate._contract import CONTRACT, OWN, REQUIRED, has_member, missing_members

ENGINE_NAMES = list(ENGINES)


class Echo(EngineBase):
    """The smallest engine: echoes the prompt. Declares nothing, so it keeps the defaults."""

    engine = "onnx"  # stands in for a table entry in the table tests below

    def __init__(self, path: str = "", **options) -> None:
        self.path, self.options = path, options

    def complete(self, prompt, params):
        return [Completion(prompt, 1, "stop")] * params.n

    def chat(self, messages, params):
        return self.complete(messages[-1]["content"], params)

    def stream(self, prompt, params):
        yield prompt if isinstance(prompt, str) else prompt[-1]["content"]


def _load_echo(path, **options):
    return Echo(str(path), **options)


# --------------------------------------------------------------------------- each engine declares the contract


@pytest.mark.parametrize("name", ENGINE_NAMES)
def test_each_engine_keeps_the_whole_contract(name):
    cls = ENGINES[name].engine_class
    assert issubclass(cls, EngineBase), f"{cls.__name__} does not subclass EngineBase"
    assert cls.engine == name, f"{cls.__name__}.engine is {cls.engine!r}, its table name {name!r}"
    assert isinstance(cls.capabilities, Capabilities)
    for member in CONTRACT:
        assert has_member(cls, member), f"{cls.__name__} lacks the contract member {member}"
    for member in OWN:  # the Generator methods are the engine's own, not a default
        assert member in {m for k in cls.__mro__[:-2] for m in vars(k)}, f"{cls.__name__}.{member}"
    # Each Engine member is a member of the contract list, so the list cannot fall behind the Protocol.
    protocol = {m for m in vars(Engine) if not m.startswith("_")} | set(Engine.__annotations__)
    assert protocol <= set(CONTRACT)


@pytest.mark.parametrize("name", ENGINE_NAMES)
def test_a_capability_is_declared_exactly_when_implemented(name):
    """Declared without its members fails, and so does a member without its declaration (the server and
    the runner read the declaration, so an undeclared method is never used)."""
    cls = ENGINES[name].engine_class
    caps = cls.capabilities
    assert missing_members(cls, caps) == []
    for capability, members in REQUIRED.items():
        # members that only this capability obliges show that the engine implements it
        own = [m for m in members if not any(m in REQUIRED[c] for c in REQUIRED if c != capability)]
        if own:
            present = all(has_member(cls, m) for m in own)
            assert present == getattr(caps, capability), (
                f"{cls.__name__}: capability {capability} is {getattr(caps, capability)} but {', '.join(own)} "
                f"{'are' if present else 'are not'} implemented")
    # the torch internals that batching and perplexity read are there exactly on the engine declaring them
    assert caps.batching == has_member(cls, "encode")


def test_the_capabilities_of_each_engine():
    """What the server and the runner did by class name and attribute probes before, now declared."""
    declared = {name: spec.capabilities.declared() for name, spec in ENGINES.items()}
    assert declared == {
        "torch": ["batching", "loglikelihood", "grammar", "adapters", "beams", "prompt_logprobs", "perplexity"],
        "onnx": ["batching", "loglikelihood"],
        "llama.cpp": ["grammar"],
        "openai": ["tools"],
    }


def test_an_engine_declaring_what_it_lacks_fails_at_definition():
    with pytest.raises(TypeError, match=r"declares the capabilities loglikelihood but lacks loglikelihood"):
        class Bragging(Echo):
            capabilities = Capabilities(loglikelihood=True)

    with pytest.raises(TypeError, match=r"lacks chat\(json_schema\), stream\(json_schema\)"):
        class NoGrammar(Echo):
            capabilities = Capabilities(grammar=True)

    with pytest.raises(TypeError, match=r"without stream"):
        class Mute(EngineBase):
            def complete(self, prompt, params):
                return []

            def chat(self, messages, params):
                return []


def test_the_defaults_of_a_minimal_engine():
    gen, params = Echo(), SamplingParams(max_new_tokens=4)
    assert isinstance(gen, Generator) and isinstance(gen, Engine)
    assert as_engine(gen) is gen
    assert gen.capabilities == Capabilities() and gen.context_length is None and gen.parallel == 1
    assert gen.count_tokens("two words") == 0
    assert gen.render_chat([{"role": "system", "content": "a"}, {"role": "user", "content": "b"}]) == "a\nb"
    assert [c[0].text for c in gen.complete_batch(["x", "y"], params)] == ["x", "y"]
    assert [c[0].text for c in gen.chat_batch([[{"role": "user", "content": "z"}]], params)] == ["z"]


def test_a_plain_generator_gets_the_contract_from_as_engine():
    """A Generator written without the contract (a test's fake, a user's class) keeps working: what it
    has is read once, in as_engine, as the server and the runner read it before."""

    class Plain:
        parallel = 3

        def complete(self, prompt, params):
            return [Completion(prompt.upper(), 1, "stop")]

        def complete_batch(self, prompts, params):
            return [self.complete(p, params) for p in prompts]

        def chat(self, messages, params):
            return [Completion("reply", 1, "stop")]

        def stream(self, prompt, params):
            yield "x"

        def loglikelihood(self, requests, batch_size=8):
            return [-1.0 for _ in requests]

    engine = as_engine(Plain())
    params = SamplingParams()
    assert engine.engine == "Plain" and engine.parallel == 3 and engine.context_length is None
    assert engine.capabilities == Capabilities(loglikelihood=True)
    assert engine.loglikelihood([("a", "b")]) == [-1.0]
    assert engine.complete_batch(["a"], params)[0][0].text == "A"
    assert engine.chat_batch([[{"role": "user", "content": "q"}]] * 2, params)[1][0].text == "reply"
    assert engine.count_tokens("anything") == 0
    bare = as_engine(object())
    assert bare.capabilities == Capabilities() and bare.parallel == 1


# --------------------------------------------------------------------------- one table for everyone


def test_load_generator_loads_through_the_table(monkeypatch, tmp_path: Path):
    assert ENGINE_LOADERS == {name: spec.load for name, spec in ENGINES.items()}
    monkeypatch.setitem(ENGINES, "onnx", EngineSpec(__name__, "Echo", _load_echo))
    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "genai_config.json").write_text("{}")
    gen = load_generator(folder)  # engine_for picks onnx, the table says how to load it
    assert isinstance(gen, Echo) and gen.path == str(folder)
    assert gen.options == {"adapters": None, "device": "auto", "endpoints": None, "parallel": 1}
    assert isinstance(load_generator("anything", engine="onnx", parallel=4), Echo)
    from slmforge.errors import GenerateError

    with pytest.raises(GenerateError, match="Unknown engine 'nope'"):
        load_generator("anything", engine="nope")


def test_the_server_loads_through_the_same_table(monkeypatch, tmp_path: Path):
    """The server names no engine class: it loads with load_generator (so, ENGINES) and reads the
    engine's name and capabilities from the contract."""
    from slmforge.config import ProjectConfig, ServeModelConfig
    from slmforge.serve import _models

    monkeypatch.setitem(ENGINES, "onnx", EngineSpec(__name__, "Echo", _load_echo))
    cfg = ProjectConfig()
    models = [ServeModelConfig(name="m", path=str(tmp_path), engine="onnx")]
    served, _ = _models.load_models(cfg, models, device="cpu", max_batch_size=4)
    m = served["m"]
    assert isinstance(m.generator, Echo) and m.generator.options["parallel"] == 4
    assert (m.engine, m.batch, m.adapter, m.slots, m.grammar) == ("onnx", None, None, 1, False)
    assert m.context_length() is None and m.count_tokens("hi", special=True) == 0
    # adapters are refused by capability, before anything is loaded
    models = [ServeModelConfig(name="m", path=str(tmp_path), engine="onnx", adapters={"a": str(tmp_path)})]
    from slmforge.errors import ConfigError

    with pytest.raises(ConfigError, match="LoRA adapters need the torch engine"):
        _models.load_models(cfg, models, device="cpu", max_batch_size=4)
    source = inspect.getsource(_models)
    for cls in (spec.class_name for spec in ENGINES.values()):
        assert cls not in source, f"serve/_models.py names the engine class {cls}"
    assert "getattr(" not in source and "_adapter_disabled" not in source


def test_the_served_model_reads_the_contract():
    from slmforge.serve._models import ServedModel, wrap_models

    class Slotted(Echo):
        engine = "llama.cpp"
        capabilities = Capabilities(grammar=True)
        context_length = 64
        parallel = 3

        def chat(self, messages, params, json_schema=None):
            return super().chat(messages, params)

        def stream(self, prompt, params, json_schema=None):
            return super().stream(prompt, params)

        def count_tokens(self, text, special=True):
            return len(text.split()) + special

    m = wrap_models({"s": Slotted()}, max_batch_size=8)["s"]
    assert (m.engine, m.slots, m.grammar, m.context_length()) == ("llama.cpp", 3, True, 64)
    assert m.count_tokens("a b c", special=False) == 3 and m.count_tokens("a b c", special=True) == 4
    assert ServedModel("e", "embed").slots == 1


# --------------------------------------------------------------------------- the torch engine's members


def test_the_torch_engine_answers_the_contract(tmp_path: Path, one_torch_thread):
    """Context window, token counts and the active adapter come from TorchGenerator's public members
    (the server read ``model.config`` and the private ``_adapter_disabled`` before)."""
    from slmforge.generate import TorchGenerator
    from slmforge.serve._models import wrap_models

    from conftest import TINY, build_lora_adapter, build_peaky_model, build_tiny_tokenizer

    model_dir = build_peaky_model(build_tiny_tokenizer(tmp_path, vocab_size=400), tmp_path / "tiny", TINY)
    adapter = build_lora_adapter(model_dir, tmp_path / "lora", seed=1)
    gen = TorchGenerator.from_pretrained(model_dir, adapters={"a1": adapter}, device="cpu")
    assert isinstance(gen, Engine) and as_engine(gen) is gen
    assert gen.context_length == gen.model.config.max_position_embeddings > 0
    text = "The garden was planted in early spring."
    assert gen.count_tokens(text) == len(gen.tokenizer(text)["input_ids"]) == len(gen.encode(text))
    assert gen.count_tokens(text, special=False) == len(gen.encode(text, special=False))
    assert gen.active_adapter == "a1" and gen.adapters == ["a1"]
    served = wrap_models({"m": gen}, max_batch_size=2)["m"]
    try:
        assert (served.engine, served.adapter, served.batch.context_length) == ("torch", "a1", gen.context_length)
        assert served.batch.vocab_size == len(gen.tokenizer)
    finally:
        served.batch.stop()
    gen.set_adapter(None)
    assert gen.active_adapter is None
