"""ONNX export and the ONNX Runtime engine, on a tiny random Llama.

One export per precision (fp32 with optimization all, int8 disabled, int4 basic) is
shared by the module, plus an int4 export of the same model with tied embeddings (as
the presets have; the builder then shares one quantized table through GatherBlockQuantized).
As in test_generate, the output head is scaled up and its rows for special and
single-byte tokens are zeroed, so greedy text is made of whole merged tokens with
clear argmax margins.

Tolerances, from runs on these models (ORT 1.32, onnxruntime-genai 0.18, 4 prompts x 32 tokens):
  fp32: logits max-abs-diff ~4e-6 (logits up to ~13), every argmax the same -> < 1e-4, identical greedy.
  int8: max-abs-diff ~0.14, top-1 agreement 1.0            -> top-1 >= 0.95, diff <= 5% of the logit scale.
  int4: max-abs-diff ~2.3, top-1 agreement 0.92 (the input embedding int4 too; ~1.4-1.9 and 0.95-0.99 with
        it float)                                          -> top-1 >= 0.85, diff <= 20% of the logit scale.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from slmforge.config import GenerateConfig
from slmforge.errors import GenerateError, ModelError
from slmforge.export.onnx import (
    check_onnx,
    export_onnx,
    format_optimization_table,
    format_profile,
    io_binding_benchmark,
    optimization_table,
    parity_report,
    profile_onnx,
)
from slmforge.generate import Generator, SamplingParams, TorchGenerator, profiles_from_model
from slmforge.generate._onnx import Decoder, OnnxGenerator, choose_providers

from conftest import TINY, build_peaky_model, build_tiny_tokenizer

PROMPTS = ["The garden was", "Bread is", "hello", "The river flows"]
CUDA = "CUDAExecutionProvider" in ort.get_available_providers()


def greedy(max_new_tokens: int = 30, **kw) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new_tokens, **kw)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    yield


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("onnx")


@pytest.fixture(scope="module")
def tokenizer_dir(workdir) -> Path:
    return build_tiny_tokenizer(workdir, vocab_size=400)


def make_model(tokenizer_dir: Path, folder: Path, tied: bool) -> Path:
    return build_peaky_model(tokenizer_dir, folder, TINY.model_copy(update={"tie_embeddings": tied}))


@pytest.fixture(scope="module")
def model_dir(workdir, tokenizer_dir) -> Path:
    return make_model(tokenizer_dir, workdir / "model", tied=False)


@pytest.fixture(scope="module")
def fp32_dir(workdir, model_dir) -> Path:
    return export_onnx(model_dir, workdir / "onnx-fp32").parent  # optimization "all", the default


@pytest.fixture(scope="module")
def int8_dir(workdir, model_dir) -> Path:
    return export_onnx(model_dir, workdir / "onnx-int8", precision="int8", optimization="disabled").parent


@pytest.fixture(scope="module")
def int4_dir(workdir, model_dir) -> Path:
    return export_onnx(model_dir, workdir / "onnx-int4", precision="int4", optimization="basic").parent


@pytest.fixture(scope="module")
def onnx_gen(fp32_dir) -> OnnxGenerator:
    return OnnxGenerator(fp32_dir, threads=1)


@pytest.fixture(scope="module")
def torch_gen(model_dir) -> TorchGenerator:
    return TorchGenerator.from_pretrained(model_dir, device="cpu")


def op_counts(onnx_file: Path) -> dict[str, int]:
    graph = onnx.load(str(onnx_file), load_external_data=False).graph
    counts: dict[str, int] = {}
    for node in graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


# --------------------------------------------------------------------------- export


def test_export_writes_a_checked_model_with_its_tokenizer_and_profiles(fp32_dir, model_dir):
    assert sorted(p.name for p in fp32_dir.iterdir()) == [
        "chat_template.jinja", "genai_config.json", "generation_config.json", "model.onnx", "model.onnx.data",
        "tokenizer.json", "tokenizer_config.json",
    ]
    onnx.checker.check_model(str(fp32_dir / "model.onnx"), full_check=True)  # the path form: external data
    check_onnx(fp32_dir / "model.onnx")
    ops = op_counts(fp32_dir / "model.onnx")
    assert ops["GroupQueryAttention"] == 2 and "SimplifiedLayerNormalization" not in ops
    assert ops["RMSNormalization"] == 1 and "QuickGelu" in ops  # the "all" level's fusion is baked in
    for name in ("tokenizer.json", "generation_config.json"):
        assert (fp32_dir / name).read_bytes() == (model_dir / name).read_bytes()
    assert profiles_from_model(fp32_dir) == GenerateConfig().profiles


def test_check_onnx_rejects_what_the_checker_rejects(tmp_path):
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])
    node = onnx.helper.make_node("SimplifiedLayerNormalization", ["x", "x"], ["y"])  # not an ONNX op
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])
    onnx.save(onnx.helper.make_model(onnx.helper.make_graph([node], "g", [x], [y])), str(tmp_path / "bad.onnx"))
    with pytest.raises(ModelError, match="fails onnx.checker"):
        check_onnx(tmp_path / "bad.onnx")
    with pytest.raises(ModelError, match="does not exist"):
        check_onnx(tmp_path / "missing.onnx")


def test_export_errors_are_clear(tmp_path, model_dir):
    with pytest.raises(ModelError, match="no config.json"):
        export_onnx(tmp_path, tmp_path / "out")
    with pytest.raises(ModelError, match="precision 'int2' is not one of fp32, int8, int4"):
        export_onnx(model_dir, tmp_path / "out", precision="int2")
    with pytest.raises(ModelError, match="optimization 'max'"):
        export_onnx(model_dir, tmp_path / "out", optimization="max")
    with pytest.raises(ModelError, match="int8 or int4 for cuda"):
        export_onnx(model_dir, tmp_path / "out", execution_provider="cuda")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- parity


def test_fp32_logits_and_greedy_tokens_match_pytorch(model_dir, fp32_dir):
    report = parity_report(model_dir, fp32_dir, PROMPTS, max_new_tokens=32)
    print("fp32 parity:", report)
    assert report["positions"] > 4 * 32
    assert report["max_abs_diff"] < 1e-4 and report["max_abs_logit"] > 5
    assert report["top1_agreement"] == 1.0 and report["greedy_identical"] == len(PROMPTS)


def test_int8_and_int4_stay_within_their_tolerances(model_dir, fp32_dir, int8_dir, int4_dir):
    r8 = parity_report(model_dir, int8_dir, PROMPTS, max_new_tokens=32)
    r4 = parity_report(model_dir, int4_dir, PROMPTS, max_new_tokens=32)
    print("int8 parity:", r8, "\nint4 parity:", r4)
    assert r8["top1_agreement"] >= 0.95 and r8["max_abs_diff"] <= 0.05 * r8["max_abs_logit"]
    assert r4["top1_agreement"] >= 0.85 and r4["max_abs_diff"] <= 0.20 * r4["max_abs_logit"]
    assert 0 < r8["mean_abs_diff"] < r4["mean_abs_diff"]  # fewer bits, larger error
    for folder, bits in ((int8_dir, 8), (int4_dir, 4)):
        check_onnx(folder / "model.onnx")
        graph = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
        quantized = [n for n in graph.node if n.op_type == "MatMulNBits"]
        assert len(quantized) == 11 and all(onnx.helper.get_attribute_value(
            next(a for a in n.attribute if a.name == "bits")) == bits for n in quantized)
        # int4 quantizes the (untied) input embedding too, as GatherBlockQuantized; it has no int8 form
        assert op_counts(folder / "model.onnx").get("GatherBlockQuantized", 0) == (bits == 4)
    sizes = [(d / "model.onnx.data").stat().st_size for d in (fp32_dir, int8_dir, int4_dir)]
    assert sizes[0] > sizes[1] > sizes[2]


def stored_tables(onnx_file: Path) -> list[bytes]:
    """The bytes of every initializer stored in the external data file."""
    model = onnx.load(str(onnx_file))
    return [onnx.numpy_helper.to_array(t).tobytes() for t in model.graph.initializer if len(t.raw_data) >= 1024]


def test_tied_embeddings_export_shares_one_quantized_table(workdir, tokenizer_dir):
    tied = make_model(tokenizer_dir, workdir / "model-tied", tied=True)
    folder = export_onnx(tied, workdir / "onnx-int4-tied", precision="int4").parent
    ops = op_counts(folder / "model.onnx")
    assert ops["GatherBlockQuantized"] == 1 and ops["MatMulNBits"] == 11  # embedding + 10 MatMuls + lm_head
    report = parity_report(tied, folder, PROMPTS, max_new_tokens=32)
    print("int4 tied parity:", report)
    assert report["top1_agreement"] >= 0.85 and report["max_abs_diff"] <= 0.20 * report["max_abs_logit"]
    # ONNX Runtime's optimization folds the Reshape (int4) or Transpose (fp32) between the embedding
    # and lm_head into a second copy of the table; the export stores it once, as that node again.
    fp32 = export_onnx(tied, workdir / "onnx-fp32-tied").parent
    for onnx_file in (folder / "model.onnx", fp32 / "model.onnx"):
        tables = stored_tables(onnx_file)
        assert len(tables) == len(set(tables)) and ops.get("Reshape", 0) >= 1
    assert parity_report(tied, fp32, PROMPTS, max_new_tokens=8)["greedy_identical"] == len(PROMPTS)


def test_onnxruntime_genai_runs_the_export_with_the_same_greedy_tokens(fp32_dir, torch_gen):
    import onnxruntime_genai as og

    model = og.Model(str(fp32_dir))
    for prompt in PROMPTS[:2]:
        ids = torch_gen.tokenizer(prompt)["input_ids"]  # with BOS: og's own tokenizer adds none
        want = torch_gen.model.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False,
                                        repetition_penalty=1.0, eos_token_id=None)[0, len(ids):].tolist()
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(ids) + len(want), do_sample=False)
        generator = og.Generator(model, params)
        generator.append_tokens(ids)
        got = []
        while not generator.is_done():
            generator.generate_next_token()
            got.append(int(generator.get_next_tokens()[0]))
        assert got == want


# --------------------------------------------------------------------------- the engine


def test_onnx_generator_implements_the_protocol_and_matches_torch(onnx_gen, torch_gen):
    assert isinstance(onnx_gen, Generator)
    for prompt in PROMPTS:
        for params in (greedy(), greedy(repetition_penalty=1.3), greedy(7)):
            assert onnx_gen.complete(prompt, params) == torch_gen.complete(prompt, params), (prompt, params)
    full = torch_gen.complete(PROMPTS[0], greedy())[0]
    stop = full.text[10:14]
    assert stop.strip() and full.text.find(stop) > 0
    cut = onnx_gen.complete(PROMPTS[0], greedy(stop=[stop]))
    assert cut == torch_gen.complete(PROMPTS[0], greedy(stop=[stop]))
    assert cut[0].text == full.text[: full.text.find(stop)] and cut[0].finish_reason == "stop"
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}]
    assert onnx_gen.chat(messages, greedy(20)) == torch_gen.chat(messages, greedy(20))
    assert onnx_gen.complete_batch(PROMPTS[:3], greedy(12)) == torch_gen.complete_batch(PROMPTS[:3], greedy(12))
    assert onnx_gen.complete_batch([], greedy()) == []


def test_stream_pieces_join_to_the_completion(onnx_gen):
    for params in (greedy(), greedy(stop=[onnx_gen.complete(PROMPTS[0], greedy())[0].text[10:14]])):
        pieces = list(onnx_gen.stream(PROMPTS[0], params))
        assert len(pieces) > 3 and "".join(pieces) == onnx_gen.complete(PROMPTS[0], params)[0].text
    messages = [{"role": "user", "content": "hello"}]
    assert "".join(onnx_gen.stream(messages, greedy(20))) == onnx_gen.chat(messages, greedy(20))[0].text
    it = onnx_gen.stream(PROMPTS[0], greedy(200))
    next(it)
    it.close()  # stops decoding: nothing runs in the background
    with pytest.raises(GenerateError, match="n=1"):
        onnx_gen.stream(PROMPTS[0], greedy(temperature=1.0, n=2))


def test_sampling_controls(onnx_gen):
    want = onnx_gen.complete(PROMPTS[0], greedy())[0].text
    for seed in (0, 1):
        assert onnx_gen.complete(PROMPTS[0], greedy(temperature=1.5, top_k=1, seed=seed))[0].text == want
        assert onnx_gen.complete(PROMPTS[0], greedy(temperature=1.5, top_p=1e-6, seed=seed))[0].text == want
    texts = [onnx_gen.complete(PROMPTS[0], greedy(temperature=1.0, seed=s))[0].text for s in (1, 2, 3)]
    assert texts[0] == onnx_gen.complete(PROMPTS[0], greedy(temperature=1.0, seed=1))[0].text
    assert len(set(texts)) == 3
    out = onnx_gen.complete(PROMPTS[0], greedy(12, temperature=1.0, top_k=20, top_p=0.9, seed=0, n=3))
    assert len(out) == 3 and len({c.text for c in out}) == 3 and all(c.tokens == 12 for c in out)
    for n in (1, 9):
        c = onnx_gen.complete(PROMPTS[1], greedy(n))[0]
        assert c.tokens == n and c.finish_reason == "length"
    with pytest.raises(GenerateError, match="temperature > 0"):
        onnx_gen.complete(PROMPTS[0], greedy(n=2))
    with pytest.raises(GenerateError, match="no beam search"):
        onnx_gen.complete(PROMPTS[0], greedy(num_beams=2))
    with pytest.raises(GenerateError, match="exported for 1024 positions"):
        onnx_gen.complete("hello " * 1100, greedy())


def test_loglikelihood_matches_torch(onnx_gen, torch_gen):
    requests = [("The garden was", " planted in spring"), ("Bread is", " made from flour"), ("hello", "")]
    got, want = onnx_gen.loglikelihood(requests), torch_gen.loglikelihood(requests)
    assert got[2] == 0.0 and np.allclose(got, want, atol=1e-4)


# --------------------------------------------------------------------------- runtime tools


def test_optimization_table_lists_four_levels_with_operator_counts(int8_dir):
    rows = optimization_table(int8_dir / "model.onnx", runs=3, threads=1)
    print(format_optimization_table(rows))
    assert [r["level"] for r in rows] == ["disabled", "basic", "extended", "all"]
    disabled, extended = rows[0], rows[2]
    assert disabled["op_counts"]["MatMulNBits"] == 11 and disabled["op_counts"]["GroupQueryAttention"] == 2
    # Sigmoid * x (SiLU) becomes one QuickGelu at the extended level.
    assert "QuickGelu" not in disabled["op_counts"] and extended["op_counts"]["QuickGelu"] == 2
    assert extended["nodes"] < disabled["nodes"] and extended["fused_nodes"] > disabled["fused_nodes"]
    assert all(r["size_bytes"] > 100_000 and r["latency_ms"] > 0 for r in rows)
    table = format_optimization_table(rows)
    assert "+QuickGelu x2" in table and all(level in table for level in ("disabled", "basic", "extended", "all"))


def test_profiler_reports_top_operators_and_writes_a_chrome_trace(fp32_dir, tmp_path):
    rows, trace = profile_onnx(fp32_dir, PROMPTS[0], top_n=5, max_new_tokens=8, trace_dir=tmp_path, threads=1)
    print(format_profile(rows))
    assert trace.parent == tmp_path and trace.suffix == ".json"
    events = json.loads(trace.read_text())
    assert any(e.get("cat") == "Node" for e in events) and any(e.get("cat") == "Session" for e in events)
    assert len(rows) == 5 and [r["total_ms"] for r in rows] == sorted((r["total_ms"] for r in rows), reverse=True)
    assert 0 < sum(r["share"] for r in rows) <= 1 + 1e-9
    assert {"MatMul", "GroupQueryAttention"} <= {r["op_type"] for r in rows}
    assert rows[0]["providers"] == ["CPUExecutionProvider"] and rows[0]["calls"] >= 9  # prompt + 8 steps


def test_provider_fallback_reports_what_ran(fp32_dir):
    ladder = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    available = ort.get_available_providers()
    assert choose_providers(ladder) == [p for p in ladder if p in available]
    assert choose_providers([])[-1] == "CPUExecutionProvider" and choose_providers(None)[-1] == "CPUExecutionProvider"
    with pytest.raises(GenerateError, match="Unknown execution provider"):
        choose_providers(["CudaExecutionProvider"])
    gen = OnnxGenerator(fp32_dir, providers=ladder, threads=1)
    assert gen.providers[0] == choose_providers(ladder)[0]
    if not CUDA:
        assert choose_providers(ladder) == ["CPUExecutionProvider"] and gen.providers == ["CPUExecutionProvider"]


def test_io_binding_gives_the_same_logits_as_plain_run(onnx_gen, fp32_dir):
    ids, follow = onnx_gen.tokenizer(PROMPTS[0])["input_ids"], [300, 310, 320, 330, 340]
    bound = onnx_gen.decode_logits(ids, follow, rows=2)
    plain_gen = OnnxGenerator(fp32_dir, io_binding=False, threads=1)
    assert np.array_equal(bound, plain_gen.decode_logits(ids, follow, rows=2))
    # Bound but not in place: presents allocated by ONNX Runtime, as for graphs without GroupQueryAttention.
    decoder = Decoder(onnx_gen.session, replace(onnx_gen.layout, share_buffer=False), rows=2, max_len=len(ids) + 5)
    assert not decoder.in_place and decoder.io_binding
    steps = [decoder(np.tile(ids, (2, 1)))] + [decoder(np.full((2, 1), t)) for t in follow]
    assert np.array_equal(bound, np.concatenate(steps, axis=1))
    assert plain_gen.complete(PROMPTS[1], greedy()) == onnx_gen.complete(PROMPTS[1], greedy())
    bench = io_binding_benchmark(fp32_dir, PROMPTS[0], new_tokens=32, runs=2, threads=1)
    print("I/O binding:", bench)
    assert bench["max_abs_diff"] == 0 and bench["new_tokens"] == 32
    assert bench["plain_ms_per_token"] > 0 and bench["io_binding_ms_per_token"] > 0


def test_importing_the_onnx_modules_does_not_import_torch():
    code = ("import sys, slmforge.export.onnx, slmforge.generate._onnx; "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs onnxruntime-gpu with CUDAExecutionProvider")
def test_cuda_decoding_binds_device_buffers(workdir, model_dir):
    folder = export_onnx(model_dir, workdir / "onnx-int4-cuda", precision="int4", execution_provider="cuda").parent
    gen = OnnxGenerator(folder, providers=["CUDAExecutionProvider"])
    assert gen.providers[0] == "CUDAExecutionProvider"
    ids = gen.tokenizer(PROMPTS[0])["input_ids"]
    decoder = Decoder(gen.session, gen.layout, rows=1, max_len=len(ids) + 4)
    assert decoder.device == "cuda" and decoder.in_place and decoder.cache[0].device_name() == "cuda"
    bound = gen.decode_logits(ids, [300, 310, 320])
    gen.io_binding = False
    plain = gen.decode_logits(ids, [300, 310, 320])
    assert np.abs(bound - plain).max() < 1e-2 and (bound.argmax(-1) == plain.argmax(-1)).all()
    gen.io_binding = True
    report = parity_report(model_dir, folder, PROMPTS, providers=["CUDAExecutionProvider"])
    print("int4 CUDA parity:", report)
    assert report["provider"] == "CUDAExecutionProvider" and report["top1_agreement"] >= 0.85


def test_a_server_process_turns_off_idle_spinning(fp32_dir, monkeypatch):
    from slmforge.generate._onnx import make_session

    onnx_file = next(fp32_dir.glob("*.onnx"))
    with pytest.raises(RuntimeError, match="does not have configuration"):  # ONNX Runtime's default: spin
        make_session(onnx_file).get_session_options().get_session_config_entry("session.intra_op.allow_spinning")
    monkeypatch.setenv("SLMFORGE_ORT_SPINNING", "0")  # what `slmforge serve` sets before loading engines
    options = make_session(onnx_file).get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert options.get_session_config_entry("session.inter_op.allow_spinning") == "0"
