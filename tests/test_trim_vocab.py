"""Issue 14: `slmforge model trim-vocab` on a tiny byte-level BPE model, and the BPE surgery itself on a
SentencePiece-style (byte-fallback, several merges per token) tokenizer.

The trimmed model must tokenize the domain text identically (under new ids), give the same logits for the
kept tokens, fall back to bytes (never to unknown) off the domain, and be accepted by the GGUF and ONNX
exports, llama.cpp and the server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from slmforge.cli.main import app
from slmforge.config import ModelConfig
from slmforge.errors import TokenizerError
from slmforge.generate import SamplingParams, TorchGenerator
from slmforge.model.trim import trim_vocab
from slmforge.tokenizer import load_tokenizer
from slmforge.tokenizer.trim import trim_tokenizer

from conftest import PROSE, LiveServer, build_peaky_model, build_tiny_tokenizer

DOMAIN = PROSE[:3]  # garden, lighthouse, bread: the other sentences' tokens may go
OFF_DOMAIN = ["Zebras quantum-tunnel through 日本語 text 😀!", "Honey bees live in colonies.", "tabs\tand\nlines"]
ARCH = dict(preset="custom", hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128)


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    yield


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("trim")
    return build_peaky_model(build_tiny_tokenizer(work, vocab_size=500), work / "model", ModelConfig(**ARCH))


@pytest.fixture(scope="module")
def trimmed(model_dir: Path) -> Path:
    return trim_vocab(model_dir, DOMAIN, model_dir.parent / "trimmed", progress=False).path


def _order(model_dir: Path, trimmed: Path) -> list[int]:
    old, new = load_tokenizer(model_dir).get_vocab(), load_tokenizer(trimmed).get_vocab()
    return [old[t] for t, _ in sorted(new.items(), key=lambda kv: kv[1])]


def test_domain_text_keeps_its_tokens_and_logits(model_dir: Path, trimmed: Path):
    from transformers import AutoModelForCausalLM

    old_tok, new_tok = load_tokenizer(model_dir), load_tokenizer(trimmed)
    order = _order(model_dir, trimmed)
    new_id = {o: i for i, o in enumerate(order)}
    assert len(new_tok) == len(order) < len(old_tok)
    old_model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    new_model = AutoModelForCausalLM.from_pretrained(trimmed).eval()
    assert new_model.config.vocab_size == len(order)
    assert new_model.get_input_embeddings().weight.shape[0] == new_model.get_output_embeddings().weight.shape[0] == len(order)
    for text in DOMAIN:
        before = old_tok(text)["input_ids"]  # with the BOS the tokenizer adds
        after = new_tok(text)["input_ids"]
        assert after == [new_id[i] for i in before]
        with torch.no_grad():
            lo = old_model(torch.tensor([before])).logits[0][:, order]
            ln = new_model(torch.tensor([after])).logits[0]
        torch.testing.assert_close(ln, lo, atol=1e-5, rtol=1e-5)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):  # the special ids follow their tokens
        old_value, new_value = getattr(old_tok, name), getattr(new_tok, name)
        assert new_value == new_id[old_value]
    manifest = json.loads((trimmed / "manifest.json").read_text())
    assert manifest["kind"] == "model" and manifest["metrics"]["vocab_after"] == len(order)
    assert manifest["metrics"]["params_after"] < manifest["metrics"]["params_before"]


def test_other_text_falls_back_to_bytes_not_unknown(model_dir: Path, trimmed: Path):
    old_tok, new_tok = load_tokenizer(model_dir), load_tokenizer(trimmed)
    for text in OFF_DOMAIN:
        ids = new_tok(text, add_special_tokens=False)["input_ids"]
        assert new_tok.decode(ids) == text
        assert len(ids) >= len(old_tok(text, add_special_tokens=False)["input_ids"])  # shorter pieces at worst
        assert new_tok.unk_token_id is None or new_tok.unk_token_id not in ids
    messages = [{"role": "user", "content": "Bread is"}]  # the chat template's tokens are kept
    assert new_tok.apply_chat_template(messages, tokenize=False) == old_tok.apply_chat_template(messages, tokenize=False)


def test_the_trimmed_model_exports_and_serves(trimmed: Path, tmp_path: Path):
    from openai import OpenAI

    from slmforge.export.gguf import export_gguf
    from slmforge.export.onnx import export_onnx
    from slmforge.generate._llamacpp import LlamaCppGenerator
    from slmforge.generate._onnx import OnnxGenerator
    from slmforge.serve import create_app

    torch_gen = TorchGenerator.from_pretrained(trimmed, device="cpu")
    params = SamplingParams(max_new_tokens=12, repetition_penalty=1.0)
    expected = torch_gen.complete("The garden was", params)[0].text
    assert expected.strip()
    with LlamaCppGenerator(export_gguf(trimmed, tmp_path / "t.gguf", type="F32"), n_threads=1, n_ctx=256) as gen:
        assert gen.complete("The garden was", params)[0].text == expected
    onnx = OnnxGenerator(export_onnx(trimmed, tmp_path / "onnx").parent, threads=1)
    assert onnx.complete("The garden was", params)[0].text == expected
    with LiveServer(create_app({"trimmed": torch_gen})) as url:
        reply = OpenAI(base_url=f"{url}/v1", api_key="x").chat.completions.create(
            model="trimmed", messages=[{"role": "user", "content": "Bread is"}], max_tokens=8, temperature=0)
    assert reply.choices[0].message.content is not None and reply.usage.completion_tokens > 0


def test_cli_trims_to_text_files(model_dir: Path, tmp_path: Path):
    domain = tmp_path / "domain.txt"
    domain.write_text(PROSE[0])
    r = CliRunner().invoke(app, ["model", "trim-vocab", str(model_dir), "--out", str(tmp_path / "t"),
                                 "--text", str(domain), "--keep", "<|im_start|>"])
    assert r.exit_code == 0, r.output
    assert "vocabulary" in r.stdout and "->" in r.stdout
    r = CliRunner().invoke(app, ["model", "trim-vocab", str(model_dir), "--out", str(tmp_path / "u"),
                                 "--text", str(domain), "--keep", "no-such-token-xyz"])
    assert r.exit_code != 0 and "no-such-token-xyz" in str(r.exception or r.output)


def _sentencepiece_style() -> dict:
    """A byte-fallback BPE as converted from SentencePiece: '▁' for spaces, <0xNN> bytes, and two merges
    producing 'abc' (a+bc and ab+c)."""
    base = ["<unk>", "<s>", "</s>", *[f"<0x{b:02X}>" for b in range(256)], "a", "b", "c", "d", "▁"]
    merged = ["ab", "bc", "abc", "▁a", "▁abc", "cd", "dd"]
    vocab = {t: i for i, t in enumerate(base + merged)}
    merges = [["a", "b"], ["b", "c"], ["ab", "c"], ["a", "bc"], ["▁", "a"], ["▁", "abc"], ["c", "d"], ["d", "d"]]
    return {"version": "1.0", "truncation": None, "padding": None,
            "added_tokens": [{"id": 1, "content": "<s>", "single_word": False, "lstrip": False, "rstrip": False,
                              "normalized": False, "special": True}],
            "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
            "pre_tokenizer": None,
            "post_processor": {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                                                                      {"Sequence": {"id": "A", "type_id": 0}}],
                               "pair": [], "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}},
            "decoder": {"type": "Sequence", "decoders": [{"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
                                                         {"type": "ByteFallback"}, {"type": "Fuse"}]},
            "model": {"type": "BPE", "dropout": None, "unk_token": "<unk>", "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
                      "vocab": vocab, "merges": merges}}


def test_bpe_surgery_on_a_byte_fallback_tokenizer():
    from tokenizers import Tokenizer

    tok_json = _sentencepiece_style()
    old = Tokenizer.from_str(json.dumps(tok_json))
    domain = "abc abc ab"
    used = set(old.encode(domain).ids)
    new_json, order = trim_tokenizer(tok_json, used)
    new = Tokenizer.from_str(json.dumps(new_json))
    new_id = {o: i for i, o in enumerate(order)}
    assert new.encode(domain).ids == [new_id[i] for i in old.encode(domain).ids]  # <s> renumbered too
    kept = set(new_json["model"]["vocab"])
    assert {"ab", "bc", "abc", "▁abc"} <= kept and "▁a" not in kept  # every producer's parts, nothing more
    assert "cd" not in kept and "dd" not in kept and "d" not in kept
    assert all(f"<0x{b:02X}>" in kept for b in range(256)) and "<unk>" in kept
    assert new.decode(new.encode("dd cab").ids) == "dd cab"  # d was dropped: its bytes remain
    with pytest.raises(TokenizerError, match="Only BPE"):
        trim_tokenizer({**tok_json, "model": {"type": "WordPiece", "vocab": {}}}, set())
