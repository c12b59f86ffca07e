"""ONNX export: a causal LM with a KV cache, runnable by ONNX Runtime and onnxruntime-genai.

    from slmforge.export.onnx import export_onnx, parity_report, optimization_table, format_optimization_table
    onnx_file = export_onnx("runs/sft", "runs/export-onnx", precision="int4")
    print(parity_report("runs/sft", onnx_file.parent, ["asyncio is"]))
    print(format_optimization_table(optimization_table(onnx_file)))

The graph comes from onnxruntime-genai's model builder (run as a subprocess on the
local model folder): GroupQueryAttention with rotary embeddings inside, fused
skip-RMSNorm, and for int8/int4 ``MatMulNBits`` block-quantized weights (block 32,
symmetric; at int4 the input embedding too, ``GatherBlockQuantized``). optimum cannot export with transformers 5, and the builder's graph is
what onnxruntime-genai expects (``genai_config.json``). Where the builder cannot read
a config transformers 5 writes (Gemma 3's RoPE per layer type), it is handed a copy
of the folder whose config.json it can read (``_builder_input``); the weights are linked.

After building, the chosen ONNX Runtime optimization level is applied offline and
the graph is made standard where it is not: the builder writes ONNX Runtime's
``SimplifiedLayerNormalization`` in the standard ONNX domain, which onnx.checker
rejects; it is replaced by ONNX's own ``RMSNormalization`` (opset 23, the same
computation; ONNX Runtime has CPU and CUDA kernels for it), and a table the optimizer
folded into a second copy (a tied embedding) is stored once (``_share_folded_copies``).
The result passes ``onnx.checker`` with full shape inference.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from slmforge.errors import ModelError
from slmforge.export._onnx_measure import (
    _EXTERNAL_DATA_MIN_BYTES,  # smaller tensors stay inside model.onnx
    format_optimization_table,
    format_profile,
    io_binding_benchmark,
    optimization_table,
    profile_onnx,
    top_operators,
)

__all__ = [
    "PRECISIONS",
    "OPTIMIZATION_LEVELS",
    "export_onnx",
    "check_onnx",
    "parity_report",
    "optimization_table",
    "format_optimization_table",
    "profile_onnx",
    "format_profile",
    "io_binding_benchmark",
    "choose_providers",
    "top_operators",
]
# The measurements (optimization levels, profiling, I/O binding) live in the private _onnx_measure.

PRECISIONS = ("fp32", "int8", "int4")
OPTIMIZATION_LEVELS = ("disabled", "basic", "extended", "all")
# The builder's -e values, and the ONNX Runtime provider that bakes optimizations for each.
BUILDER_TARGETS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
# Copied from the model folder next to the graph: what the tokenizer and the sampling profiles need.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "generation_config.json",
)
MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"


def choose_providers(preferred: list[str] | None = None) -> list[str]:
    """The available execution providers of ``preferred``, in order, ending with the CPU provider.

    See ``slmforge.generate._onnx.choose_providers``.
    """
    from slmforge.generate import choose_providers as choose

    return choose(preferred)


# --------------------------------------------------------------------------- export


def export_onnx(
    model_dir: str | Path,
    out_dir: str | Path,
    precision: str = "fp32",
    optimization: str = "all",
    execution_provider: str = "cpu",
) -> Path:
    """Export a causal LM folder to ONNX with a KV cache, plus its tokenizer and profiles.

    Writes into ``out_dir``: ``model.onnx`` and ``model.onnx.data`` (the weights),
    ``genai_config.json`` (so onnxruntime-genai and ``OnnxGenerator`` can run it), the
    tokenizer files and ``generation_config.json`` (the sampling profiles).

    Args:
        model_dir: A Hugging Face model folder (``config.json`` + safetensors) of an architecture
            the onnxruntime-genai builder supports (Llama, Qwen, Gemma, Phi, Mistral, ...).
        out_dir: Output folder (created; files of an earlier export are replaced).
        precision: ``fp32``; ``int8`` or ``int4``: weight-only block quantization of every
            MatMul (``MatMulNBits``), at int4 the input embedding too (``GatherBlockQuantized``,
            which has no int8 form; a tied embedding is one table with ``lm_head``); activations
            and the KV cache stay fp32.
        optimization: ONNX Runtime graph optimization level baked into the saved graph:
            ``disabled`` keeps the builder's graph, ``basic`` adds provider-independent
            rewrites, ``extended``/``all`` add fusions chosen for ``execution_provider``
            (``all`` may include hardware-specific layouts: run the model where it was exported).
        execution_provider: ``cpu`` or ``cuda``: the provider the builder shapes the graph for
            (cuda: int8/int4 only, with fp16 activations and KV cache).

    Returns:
        The path of ``model.onnx``.

    Raises:
        ModelError: A bad argument, not a model folder, the builder failed, or the result
            does not pass ``onnx.checker``.
    """
    model_dir, out_dir = Path(model_dir).expanduser(), Path(out_dir).expanduser()
    _check_choice("precision", precision, PRECISIONS)
    _check_choice("optimization", optimization, OPTIMIZATION_LEVELS)
    _check_choice("execution_provider", execution_provider, tuple(BUILDER_TARGETS))
    if execution_provider == "cuda" and precision == "fp32":
        raise ModelError(
            "onnxruntime-genai 0.18's builder writes an fp32 graph for CUDA that ONNX Runtime rejects (its "
            "attention nodes have no KV-cache outputs). Export int8 or int4 for cuda (fp16 activations), or fp32 "
            "for cpu."
        )
    if not (model_dir / "config.json").is_file():
        raise ModelError(
            f"{model_dir} is not a Hugging Face model folder (no config.json). ONNX export needs a local folder: "
            "point at the output of `slmforge train` (merge LoRA adapters first; save a .gguf model as a folder)."
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="slmforge-onnx-") as tmp:
        source = _builder_input(model_dir, Path(tmp) / "input")
        built = _run_builder(source, Path(tmp) / "build", precision, execution_provider, Path(tmp) / "cache",
                             name=model_dir)
        source = built / MODEL_FILE
        if optimization != "disabled":
            source = _bake_optimization(source, Path(tmp) / "optimized", optimization, execution_provider)
        import onnx

        model = onnx.load(str(source))  # with its external data
        _standardize(model)
        _share_folded_copies(model)
        for old in (out_dir / MODEL_FILE, out_dir / DATA_FILE):
            old.unlink(missing_ok=True)  # onnx.save appends to an existing data file
        onnx.save(model, str(out_dir / MODEL_FILE), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=DATA_FILE, size_threshold=_EXTERNAL_DATA_MIN_BYTES)
        shutil.copy2(built / "genai_config.json", out_dir / "genai_config.json")
        for name in TOKENIZER_FILES:
            for folder in (model_dir, built):  # the model's own files first, the builder's copies else
                if (folder / name).is_file():
                    shutil.copy2(folder / name, out_dir / name)
                    break
    check_onnx(out_dir / MODEL_FILE)
    return out_dir / MODEL_FILE


def check_onnx(onnx_file: str | Path) -> None:
    """Validate an ONNX file with ``onnx.checker`` (full check, shape inference included).

    The path form is used, so external weights are checked where they lie, not loaded.

    Raises:
        ModelError: The file is missing or invalid; the message carries the checker's reason.
    """
    import onnx

    onnx_file = Path(onnx_file)
    if not onnx_file.is_file():
        raise ModelError(f"{onnx_file} does not exist.")
    try:
        onnx.checker.check_model(str(onnx_file), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ModelError(f"{onnx_file} fails onnx.checker: {str(exc)[:800]}") from None


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ModelError(f"ONNX export: {name} {value!r} is not one of {', '.join(allowed)}.")


def _builder_input(model_dir: Path, scratch: Path) -> Path:
    """The folder to hand the builder: ``model_dir`` itself, or a copy it can read.

    transformers 5 writes Gemma 3's RoPE per layer type, ``rope_parameters: {"full_attention":
    {...}, "sliding_attention": {...}}``; onnxruntime-genai 0.18's builder reads the flat form of
    transformers 4 (``rope_parameters["rope_type"]``, then ``rope_theta`` for the full-attention
    layers and ``rope_local_base_freq`` for the sliding ones) and fails with ``KeyError: 'rope_type'``.
    The copy's config.json has the flat keys (the builder lifts each key of ``rope_parameters``
    onto the config; transformers, loading the weights for it, rebuilds the nested form beside
    them); every other file is a link to the original.

    Raises:
        ModelError: A RoPE scaling the builder would apply to both kinds of layer (it has one
            scaling for both, e.g. Gemma 3 4B's linear scaling of the global layers).
    """
    import json

    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    rope = config.get("rope_parameters")
    nested = isinstance(rope, dict) and set(rope) == {"full_attention", "sliding_attention"}
    if config.get("architectures", [None])[0] != "Gemma3ForCausalLM" or not nested:
        return model_dir
    full, sliding = rope["full_attention"], rope["sliding_attention"]
    if {full.get("rope_type"), sliding.get("rope_type")} != {"default"}:
        raise ModelError(
            f"{model_dir}: RoPE types {full.get('rope_type')!r} (full attention) and {sliding.get('rope_type')!r} "
            "(sliding attention); onnxruntime-genai 0.18's builder applies one RoPE scaling to both kinds of layer, "
            "so it can export Gemma 3 only with unscaled RoPE (270M, 1B) without changing the model."
        )
    config["rope_parameters"] = {**full, "rope_local_base_freq": sliding["rope_theta"]}
    scratch.mkdir(parents=True)
    for item in model_dir.iterdir():
        if item.name != "config.json":
            (scratch / item.name).symlink_to(item.resolve())
    (scratch / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return scratch


def _run_builder(model_dir: Path, out: Path, precision: str, target: str, cache: Path, name: Path) -> Path:
    """Run onnxruntime-genai's model builder on a local folder (``name`` in messages); returns its output folder."""
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(model_dir), "-o", str(out),
           "-p", precision, "-e", target, "-c", str(cache)]
    if precision == "int4":
        cmd += ["--extra_options", "op_types_to_quantize=MatMul/Gather"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # -i is a local folder: nothing to download
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0 or not (out / MODEL_FILE).is_file() or not (out / "genai_config.json").is_file():
        log = (proc.stdout + proc.stderr).strip()[-1500:]
        raise ModelError(
            f"onnxruntime-genai's model builder could not export {name} ({precision}, {target}); "
            f"exit code {proc.returncode}. Its output ends:\n{log}"
        )
    return out


def _bake_optimization(source: Path, dest: Path, level: str, target: str) -> Path:
    """Save the graph as ONNX Runtime optimizes it at ``level`` (the optimizer's own output)."""
    import onnxruntime as ort

    from slmforge.generate import ORT_LEVELS

    provider = BUILDER_TARGETS[target] if level in ("extended", "all") else "CPUExecutionProvider"
    if provider not in ort.get_available_providers():
        raise ModelError(
            f"Baking optimization {level!r} for {target} needs ONNX Runtime's {provider}, which this machine "
            "lacks. Export with optimization basic or disabled (the runtime still optimizes when it loads), "
            "or export on a machine with that provider."
        )
    dest.mkdir(parents=True, exist_ok=True)
    so = ort.SessionOptions()
    so.graph_optimization_level = ORT_LEVELS[level]
    so.optimized_model_filepath = str(dest / MODEL_FILE)
    so.add_session_config_entry("session.optimized_model_external_initializers_file_name", DATA_FILE)
    so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes",
                                str(_EXTERNAL_DATA_MIN_BYTES))
    so.log_severity_level = 3  # "all" warns that its layouts are hardware-specific; the docstring says so
    try:
        ort.InferenceSession(str(source), so, providers=[provider])
    except Exception as exc:  # onnxruntime's own error classes derive from Exception alone
        raise ModelError(f"ONNX Runtime could not optimize the exported graph at level {level!r}: {exc}") from None
    return dest / MODEL_FILE


def _standardize(model) -> None:
    """Make the builder's graph standard ONNX where it is not, in place.

    - ``SimplifiedLayerNormalization`` (ONNX Runtime's op, registered in the standard ONNX
      domain, which ONNX itself does not define) becomes ``RMSNormalization`` (ONNX opset 23):
      same inputs, attributes and result.
    - Shapes the builder declares for ``Constant`` outputs are dropped: some disagree with
      the constants' values (rank 0 declared for a 1-element vector), and full shape
      inference recomputes them exactly anyway.
    """
    import onnx

    renamed = 0
    for node in model.graph.node:
        if node.op_type == "SimplifiedLayerNormalization" and node.domain in ("", "ai.onnx") and len(node.output) == 1:
            node.op_type = "RMSNormalization"
            renamed += 1
    if renamed:
        for opset in model.opset_import:
            if opset.domain in ("", "ai.onnx") and opset.version < 23:
                opset.version = 23
        model.ir_version = max(model.ir_version, onnx.helper.find_min_ir_version_for(
            [o for o in model.opset_import if o.domain in ("", "ai.onnx")]))
    constants = {out for node in model.graph.node if node.op_type == "Constant" for out in node.output}
    kept = [v for v in model.graph.value_info if v.name not in constants]
    del model.graph.value_info[:]
    model.graph.value_info.extend(kept)


def _share_folded_copies(model) -> int:
    """Store once what constant folding stored twice; the number of copies removed, in place.

    A model with tied embeddings shares one table between the input embedding and ``lm_head``: at
    int4 one quantized table, shaped [vocab, blocks, bytes] for ``MatMulNBits`` and [vocab, bytes]
    for ``GatherBlockQuantized`` (the builder writes a ``Reshape``); at fp32 the embedding and its
    ``Transpose`` for the MatMul. ONNX Runtime's offline optimization folds that node into a second
    copy of the table (84 MB of Gemma 3 270M's 319 MB int4 export, 671 MB of its fp32 one). Each
    large initializer equal to another one, or to its transpose, becomes that node again. ONNX
    Runtime folds it once more when it loads the model, so this saves disk and download size, not
    memory; no existing tool undoes a fold, hence this pass.
    """
    import hashlib

    import numpy as np
    import onnx
    from onnx import numpy_helper

    graph = model.graph
    seen: dict[tuple[int, int], list[tuple[Any, str]]] = {}
    nodes = []
    for init in list(graph.initializer):
        if init.data_type == onnx.TensorProto.STRING:
            continue
        data = init.raw_data or numpy_helper.to_array(init).tobytes()
        if len(data) < _EXTERNAL_DATA_MIN_BYTES:
            continue
        digest = hashlib.blake2b(data, digest_size=16).hexdigest()
        group = seen.setdefault((init.data_type, len(data)), [])
        node = None
        for kept, kept_digest in group:
            if kept_digest == digest:
                shape = numpy_helper.from_array(np.asarray(init.dims, dtype=np.int64), f"{init.name}/shared_shape")
                graph.initializer.append(shape)
                node = onnx.helper.make_node("Reshape", [kept.name, shape.name], [init.name], name=f"{init.name}/shared")
            elif (len(init.dims) == 2 and list(init.dims) == list(kept.dims)[::-1]
                  and np.array_equal(numpy_helper.to_array(kept).T, numpy_helper.to_array(init))):
                node = onnx.helper.make_node("Transpose", [kept.name], [init.name], perm=[1, 0], name=f"{init.name}/shared")
            if node is not None:
                break
        if node is None:
            group.append((init, digest))
        else:
            nodes.append(node)
            graph.initializer.remove(init)
    for node in reversed(nodes):  # their inputs are initializers: first in topological order
        graph.node.insert(0, node)
    return len(nodes)


# --------------------------------------------------------------------------- parity


def parity_report(
    model_dir: str | Path,
    onnx_dir: str | Path,
    prompts: list[str],
    max_new_tokens: int = 32,
    providers: list[str] | None = None,
) -> dict[str, Any]:
    """Compare the exported graph with the PyTorch model it came from, logit by logit.

    For each prompt, PyTorch decodes ``max_new_tokens`` greedy tokens (end-of-sequence
    tokens included, so every prompt gives the same count); the ONNX model is then fed the
    same prompt (one forward) and the same tokens (one KV-cache step each), and the logits
    of every position are compared. Greedy decoding of the ONNX model gives PyTorch's
    tokens exactly when its argmax agrees at every generated position.

    Args:
        model_dir: The Hugging Face model folder that was exported.
        onnx_dir: The export's folder.
        prompts: Plain-text prompts (encoded with BOS, as generation does).
        max_new_tokens: Greedy tokens generated per prompt.
        providers: Execution providers for the ONNX side.

    Returns:
        ``max_abs_diff`` and ``mean_abs_diff`` of the logits, ``max_abs_logit`` (their scale),
        ``top1_agreement`` (share of all positions whose argmax agrees), ``greedy_agreement``
        (the same over generated positions only), ``greedy_identical`` (prompts whose whole
        greedy continuation is the same), ``prompts``, ``positions``, ``provider``.
    """
    import numpy as np
    import torch
    from transformers import DynamicCache

    from slmforge.generate import OnnxGenerator
    from slmforge.model import load_causal_lm

    model, tokenizer = load_causal_lm(model_dir)
    model.eval()
    gen = OnnxGenerator(onnx_dir, providers=providers)
    max_diff = total_diff = max_logit = 0.0
    positions = agree = gen_positions = gen_agree = identical = 0
    for prompt in prompts:
        ids = list(tokenizer(prompt)["input_ids"])
        with torch.inference_mode():
            cache = DynamicCache(config=model.config)  # filled in place by each forward
            parts, new = [model(input_ids=torch.tensor([ids]), cache=cache, use_cache=True).logits[0]], []
            for _ in range(max_new_tokens):
                new.append(int(parts[-1][-1].argmax()))
                parts.append(model(input_ids=torch.tensor([[new[-1]]]), cache=cache, use_cache=True).logits[0])
        ref = torch.cat(parts).float().numpy()  # (S + N, V): predictions after each position
        got = gen.decode_logits(ids, new)[0]  # the same positions, through the KV cache
        diff = np.abs(got - ref)
        max_diff, total_diff = max(max_diff, float(diff.max())), total_diff + float(diff.sum())
        max_logit = max(max_logit, float(np.abs(ref).max()))
        same = got.argmax(-1) == ref.argmax(-1)
        generated = same[len(ids) - 1 : len(ids) - 1 + len(new)]
        positions, agree = positions + same.size, agree + int(same.sum())
        gen_positions, gen_agree = gen_positions + generated.size, gen_agree + int(generated.sum())
        identical += int(generated.all())
    vocab = gen.layout.vocab_size
    return {
        "prompts": len(prompts),
        "positions": positions,
        "max_abs_diff": max_diff,
        "mean_abs_diff": total_diff / max(positions * vocab, 1),
        "max_abs_logit": max_logit,
        "top1_agreement": agree / max(positions, 1),
        "greedy_agreement": gen_agree / max(gen_positions, 1),
        "greedy_identical": identical,
        "provider": gen.providers[0],
    }
