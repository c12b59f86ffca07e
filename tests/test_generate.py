"""Generation: sampling controls, stop strings, streaming, chat, batches, profiles,
LoRA adapters, and the `generate` / `chat` commands, on a tiny random Llama.

The model's output head is scaled up and its rows for special and single-byte
tokens are zeroed, so greedy text is made of whole merged tokens (ASCII words)
and has clear argmax margins; otherwise a random 32-wide model emits near-uniform
byte soup whose prefixes do not decode to prefixes of the text.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from slmforge.config import GenerateConfig, ProjectConfig, SamplingProfile
from slmforge.errors import GenerateError
from slmforge.generate import (
    Completion,
    Generator,
    SamplingParams,
    TorchGenerator,
    default_model_dir,
    profiles_from_model,
    resolve_profile,
)
from slmforge.model import load_causal_lm
from slmforge.tokenizer import load_tokenizer

from conftest import TINY, build_peaky_model, build_tiny_tokenizer

EXE = Path(sys.executable).parent / "slmforge"
PROMPTS = ["The garden was", "Bread is", "hello"]


def greedy(max_new_tokens: int = 30, **kw) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new_tokens, **kw)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    yield


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("gen")


@pytest.fixture(scope="module")
def tokenizer_dir(workdir) -> Path:
    return build_tiny_tokenizer(workdir, vocab_size=400)


@pytest.fixture(scope="module")
def model_dir(workdir, tokenizer_dir) -> Path:
    return build_peaky_model(tokenizer_dir, workdir / "model", TINY)


@pytest.fixture(scope="module")
def gen(model_dir) -> TorchGenerator:
    return TorchGenerator.from_pretrained(model_dir, device="cpu")


@pytest.fixture(scope="module")
def adapter_dirs(workdir, model_dir) -> dict[str, Path]:
    from peft import LoraConfig, get_peft_model

    out = {}
    for name, seed in (("alpha", 1), ("beta", 2)):
        base, _ = load_causal_lm(model_dir)
        torch.manual_seed(seed)
        lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                          init_lora_weights=False)
        get_peft_model(base, lora).save_pretrained(workdir / f"adapter-{name}")
        out[name] = workdir / f"adapter-{name}"
    return out


def repeats(gen: TorchGenerator, text: str) -> int:
    ids = gen.tokenizer(text, add_special_tokens=False)["input_ids"]
    return len(ids) - len(set(ids))


# --------------------------------------------------------------------------- sampling


def test_torch_generator_implements_the_protocol(gen):
    assert isinstance(gen, Generator)


def test_greedy_is_deterministic_and_ignores_the_folders_default_profile(gen, model_dir):
    a = gen.complete(PROMPTS[0], greedy())
    assert a == gen.complete(PROMPTS[0], greedy())
    assert len(a) == 1 and isinstance(a[0], Completion) and a[0].text.strip()
    # Plain transformers with the same settings: the saved default profile (repetition_penalty 1.1)
    # must not leak into a request that asked for 1.0.
    model, tok = load_causal_lm(model_dir)
    ids = tok(PROMPTS[0], return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=30, do_sample=False, repetition_penalty=1.0)
    assert a[0].text == tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def test_top_k_1_and_a_tiny_top_p_sample_the_greedy_text(gen):
    want = gen.complete(PROMPTS[0], greedy())[0].text
    for seed in (0, 1, 2):
        assert gen.complete(PROMPTS[0], greedy(temperature=1.5, top_k=1, seed=seed))[0].text == want
        assert gen.complete(PROMPTS[0], greedy(temperature=1.5, top_p=1e-6, seed=seed))[0].text == want


def test_same_seed_same_sample_different_seeds_differ(gen):
    texts = [gen.complete(PROMPTS[0], greedy(temperature=1.0, seed=s))[0].text for s in (1, 2, 3, 4)]
    assert texts[0] == gen.complete(PROMPTS[0], greedy(temperature=1.0, seed=1))[0].text
    assert len(set(texts)) == 4
    # A seeded request leaves torch's global random state as it found it.
    state = torch.random.get_rng_state()
    gen.complete(PROMPTS[0], greedy(temperature=1.0, seed=7))
    assert torch.equal(state, torch.random.get_rng_state())


def test_stop_string_cuts_before_it(gen):
    full = gen.complete(PROMPTS[0], greedy())[0]
    stop = full.text[10:14]
    assert stop.strip() and full.text.find(stop) > 0
    cut = gen.complete(PROMPTS[0], greedy(stop=[stop]))[0]
    assert cut.text == full.text[: full.text.find(stop)]
    assert cut.finish_reason == "stop" and cut.tokens < full.tokens
    # The earliest of several stop strings wins; one that never appears changes nothing.
    assert gen.complete(PROMPTS[0], greedy(stop=["never-there", stop]))[0].text == cut.text
    assert gen.complete(PROMPTS[0], greedy(stop=["never-there"]))[0] == full


def test_max_new_tokens_is_respected(gen):
    for n in (1, 7, 25):
        c = gen.complete(PROMPTS[1], greedy(n))[0]
        assert c.tokens == n and c.finish_reason == "length"
    short = gen.complete(PROMPTS[1], greedy(7))[0].text
    assert gen.complete(PROMPTS[1], greedy(25))[0].text.startswith(short)


def test_n_samples_and_the_greedy_n_error(gen):
    out = gen.complete(PROMPTS[0], greedy(12, temperature=1.0, seed=0, n=3))
    assert len(out) == 3 and all(c.tokens == 12 for c in out) and len({c.text for c in out}) == 3
    with pytest.raises(GenerateError, match=r"temperature > 0.*num_beams >= 3"):
        gen.complete(PROMPTS[0], greedy(n=3))


def test_beam_search_returns_distinct_beams(gen):
    out = gen.complete(PROMPTS[0], greedy(12, num_beams=4, n=3))
    assert len(out) == 3 and len({c.text for c in out}) == 3
    assert gen.complete(PROMPTS[0], greedy(12, num_beams=4, n=3)) == out
    with pytest.raises(GenerateError, match="num_beams >= 5"):
        gen.complete(PROMPTS[0], greedy(12, num_beams=4, n=5))


def test_repetition_penalty_reduces_repeated_tokens(gen):
    for prompt in PROMPTS:
        plain = gen.complete(prompt, greedy(40))[0].text
        penalised = gen.complete(prompt, greedy(40, repetition_penalty=1.5))[0].text
        assert repeats(gen, penalised) < repeats(gen, plain), (prompt, plain, penalised)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("max_new_tokens", 0, "max_new_tokens"),
        ("temperature", -0.5, "temperature"),
        ("top_k", 0, "top_k"),
        ("top_p", 1.5, "top_p"),
        ("num_beams", 0, "num_beams"),
        ("repetition_penalty", 0.0, "repetition_penalty"),
        ("n", 0, "n must be"),
        ("stop", [""], "stop strings"),
    ],
)
def test_invalid_sampling_parameters_are_clear_errors(gen, field, value, message):
    with pytest.raises(GenerateError, match=message):
        gen.complete(PROMPTS[0], SamplingParams(**{field: value}))


# --------------------------------------------------------------------------- streaming, chat, batches


def test_stream_pieces_join_to_the_completion(gen):
    for params in (greedy(), greedy(stop=[gen.complete(PROMPTS[0], greedy())[0].text[10:14]])):
        pieces = list(gen.stream(PROMPTS[0], params))
        assert len(pieces) > 3
        assert "".join(pieces) == gen.complete(PROMPTS[0], params)[0].text
    with pytest.raises(GenerateError, match="n=1 and num_beams=1"):
        gen.stream(PROMPTS[0], greedy(num_beams=2))


def test_stream_stopped_early_ends_the_generation_thread(gen):
    import threading

    it = gen.stream(PROMPTS[0], greedy(200))
    next(it)
    it.close()
    assert not any(t.name == "slmforge-generate" for t in threading.enumerate())


def test_chat_renders_the_template_and_matches_plain_generate(gen, model_dir, monkeypatch):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}]
    seen = []
    render = gen.render_chat
    monkeypatch.setattr(gen, "render_chat", lambda m: seen.append(render(m)) or seen[-1])
    reply = gen.chat(messages, greedy(20))[0]
    assert seen[0].endswith("<|im_start|>assistant\n") and "<|im_start|>user\nhello<|im_end|>" in seen[0]
    model, tok = load_causal_lm(model_dir)
    enc = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**enc, max_new_tokens=20, do_sample=False, repetition_penalty=1.0)
    assert reply.text == tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    monkeypatch.undo()
    assert "".join(gen.stream(messages, greedy(20))) == reply.text


def test_chat_without_a_template_or_with_bad_messages_is_a_clear_error(gen, model_dir):
    tok = load_tokenizer(model_dir)
    tok.chat_template = None
    bare = TorchGenerator(gen.model, tok, device="cpu")
    with pytest.raises(GenerateError, match="no chat template"):
        bare.chat([{"role": "user", "content": "hi"}], greedy())
    assert bare.complete(PROMPTS[0], greedy()) == gen.complete(PROMPTS[0], greedy())
    with pytest.raises(GenerateError, match="Message 0"):
        gen.chat([{"role": "user"}], greedy())


def test_complete_batch_equals_one_prompt_at_a_time(gen):
    batch = gen.complete_batch(PROMPTS, greedy())
    assert batch == [gen.complete(p, greedy()) for p in PROMPTS]
    sampled = gen.complete_batch(PROMPTS, greedy(8, temperature=1.0, seed=0, n=2))
    assert [len(x) for x in sampled] == [2, 2, 2] and all(c.tokens == 8 for x in sampled for c in x)
    assert gen.complete_batch([], greedy()) == []


# --------------------------------------------------------------------------- profiles


def test_profiles_are_read_from_the_model_folder(model_dir, workdir):
    saved = profiles_from_model(model_dir)
    assert saved == GenerateConfig().profiles
    assert profiles_from_model(workdir / "runs" / "data") == {}
    assert resolve_profile(None, model_dir) == saved["factual"]
    assert resolve_profile("balanced", model_dir).top_p == 0.9
    assert resolve_profile(None) == SamplingProfile()


def test_model_profiles_come_before_the_projects(model_dir):
    cfg = GenerateConfig(
        profiles={"balanced": SamplingProfile(temperature=0.2), "terse": SamplingProfile(max_new_tokens=8)},
        default_profile="terse",
    )
    assert resolve_profile("balanced", model_dir, cfg).temperature == 0.7  # the model's copy
    assert resolve_profile("terse", model_dir, cfg).max_new_tokens == 8  # only in the project
    assert resolve_profile(None, model_dir, cfg) == GenerateConfig().profiles["factual"]  # the model's default
    assert resolve_profile(None, None, cfg).max_new_tokens == 8


def test_unknown_profile_lists_the_known_names(model_dir):
    cfg = GenerateConfig(profiles={"terse": SamplingProfile(max_new_tokens=8)})
    with pytest.raises(GenerateError) as info:
        resolve_profile("precise", model_dir, cfg)
    for name in ("precise", "factual", "balanced", "creative", "terse"):
        assert name in str(info.value)


def test_from_profile_takes_explicit_overrides_and_ignores_none():
    profile = GenerateConfig().profiles["creative"]
    params = SamplingParams.from_profile(profile, temperature=None, top_k=5, stop=["\n"], n=2)
    assert (params.temperature, params.top_k, params.top_p, params.stop, params.n) == (1.0, 5, 0.95, ["\n"], 2)
    with pytest.raises(TypeError, match="temprature"):
        SamplingParams.from_profile(profile, temprature=1.0)


def test_default_model_dir_prefers_sft_then_train(tmp_path):
    cfg = ProjectConfig().rooted_at(tmp_path)
    with pytest.raises(GenerateError, match="--model"):
        default_model_dir(cfg)
    (tmp_path / "runs" / "train").mkdir(parents=True)
    assert default_model_dir(cfg) == tmp_path / "runs" / "train"
    (tmp_path / "runs" / "sft").mkdir()
    assert default_model_dir(cfg) == tmp_path / "runs" / "sft"


def test_importing_the_package_does_not_import_torch():
    code = "import sys, slmforge.generate; assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# --------------------------------------------------------------------------- LoRA adapters


def test_lora_adapters_switch_the_output(gen, model_dir, adapter_dirs):
    multi = TorchGenerator.from_pretrained(model_dir, adapters=adapter_dirs, device="cpu")
    assert multi.adapters == ["alpha", "beta"]
    texts = {}
    for name in ("alpha", "beta", None):
        multi.set_adapter(name)
        texts[name] = multi.complete(PROMPTS[0], greedy())[0].text
    base = gen.complete(PROMPTS[0], greedy())[0].text
    assert texts[None] == base
    assert len({texts["alpha"], texts["beta"], base}) == 3
    multi.set_adapter("alpha")
    assert multi.complete(PROMPTS[0], greedy())[0].text == texts["alpha"]
    # An adapter folder alone loads its base model with the adapter on.
    alone = TorchGenerator.from_pretrained(adapter_dirs["beta"], device="cpu")
    assert alone.adapters == ["default"] and alone.complete(PROMPTS[0], greedy())[0].text == texts["beta"]
    with pytest.raises(GenerateError, match="alpha, beta"):
        multi.set_adapter("gamma")
    with pytest.raises(GenerateError, match="No adapter named"):
        gen.set_adapter("alpha")


# --------------------------------------------------------------------------- CLI


def slm(*args: str, stdin: str | None = None, ok: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([str(EXE), *args], input=stdin, capture_output=True, text=True, timeout=300, env=env)
    if ok:
        assert proc.returncode == 0, f"slmforge {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def test_cli_generate_profiles_samples_and_errors(gen, model_dir):
    factual = SamplingParams.from_profile(resolve_profile("factual", model_dir), max_new_tokens=12)
    proc = slm("generate", PROMPTS[0], "--model", str(model_dir), "--max-new-tokens", "12", "--stream")
    assert proc.stdout == gen.complete(PROMPTS[0], factual)[0].text + "\n"  # the folder's default profile

    creative = SamplingParams.from_profile(resolve_profile("creative", model_dir), max_new_tokens=6, seed=3, n=2)
    proc = slm("generate", PROMPTS[0], "-m", str(model_dir), "--profile", "creative", "--max-new-tokens", "6",
               "--seed", "3", "-n", "2")
    want = gen.complete(PROMPTS[0], creative)
    assert proc.stdout == (f"--- sample 1/2 (6 tokens, length) ---\n{want[0].text}\n\n"
                           f"--- sample 2/2 (6 tokens, length) ---\n{want[1].text}\n")
    assert "12 tokens" in proc.stderr and "Loading weights" not in proc.stderr

    bad = slm("generate", "x", "-m", str(model_dir), "--profile", "precise", ok=False)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert all(name in bad.stderr for name in ("'precise'", "factual", "balanced", "creative"))
    bad = slm("generate", "x", "-m", str(model_dir), "-n", "2", ok=False)
    assert bad.returncode == 1 and "temperature > 0" in bad.stderr and "Traceback" not in bad.stderr


def test_cli_chat_streams_answers_and_resets(gen, model_dir):
    proc = slm("chat", "--model", str(model_dir), "--max-new-tokens", "10", stdin="hello\n/reset\nhello\n/exit\nlost\n")
    answers = proc.stdout.splitlines()
    params = SamplingParams.from_profile(resolve_profile(None, model_dir), max_new_tokens=10)
    want = gen.chat([{"role": "user", "content": "hello"}], params)[0].text
    assert answers == [want, want]  # the same first turn twice: /reset forgot the first exchange
    assert "history cleared" in proc.stderr

    proc = slm("chat", "-m", str(model_dir), "--max-new-tokens", "10", "--system", "Be brief.",
               stdin="hello\nmore please\n")  # EOF ends the chat too
    history = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}]
    first = gen.chat(history, params)[0].text
    history += [{"role": "assistant", "content": first}, {"role": "user", "content": "more please"}]
    assert proc.stdout.splitlines() == [first, gen.chat(history, params)[0].text]


def test_ignore_eos_generates_exactly_max_new_tokens(gen):
    from slmforge.generate import SamplingParams

    out = gen.complete("def f(", SamplingParams(max_new_tokens=12, ignore_eos=True))[0]
    assert out.tokens == 12 and out.finish_reason == "length"


def test_torch_chat_keeps_to_a_json_schema_greedy_and_sampled(gen):
    """The torch engine constrains chat replies by our decoding constraint (Capabilities.grammar): every
    reply, greedy or sampled, streamed or not, parses and validates, closed within the token budget."""
    import jsonschema

    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                               "n": {"type": "integer"}}, "required": ["city", "n"],
              "additionalProperties": False}
    messages = [{"role": "user", "content": "Give a city as JSON."}]
    free = gen.chat(messages, greedy(24))[0].text
    with pytest.raises(json.JSONDecodeError):
        json.loads(free)  # unconstrained, the peaky model writes words
    for params in (greedy(24), SamplingParams(max_new_tokens=24, temperature=1.0, n=3, seed=1)):
        for reply in gen.chat(messages, params, json_schema=schema):
            jsonschema.validate(json.loads(reply.text), schema)
    streamed = "".join(gen.stream(messages, greedy(24), json_schema=schema))
    assert streamed == gen.chat(messages, greedy(24), json_schema=schema)[0].text
    with pytest.raises(GenerateError, match="num_beams"):
        gen.chat(messages, greedy(8, num_beams=2), json_schema=schema)


def test_chat_with_tools_forces_a_valid_call_on_a_grammar_engine(gen):
    from slmforge.generate import chat_with_tools

    tools = [{"type": "function", "function": {"name": "add", "description": "Add two integers.",
              "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                             "required": ["a", "b"]}}}]
    messages = [{"role": "user", "content": "What is 2 + 3?"}]
    forced = chat_with_tools(gen, messages, tools, "required", greedy(40))[0]
    assert forced.tool_calls and forced.tool_calls[0]["name"] == "add"
    assert set(forced.tool_calls[0]["arguments"]) == {"a", "b"}
    free = chat_with_tools(gen, messages, tools, "auto", greedy(12))[0]
    assert free.tool_calls is None and free.text  # the peaky model answers in words
    with pytest.raises(GenerateError, match="tool_choice"):
        chat_with_tools(gen, messages, tools, "sometimes", greedy(4))
