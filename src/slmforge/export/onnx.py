"""ONNX export: a causal LM with a KV cache, runnable by ONNX Runtime and onnxruntime-genai.

    from slmforge.export.onnx import export_onnx, parity_report, optimization_table, format_optimization_table
    onnx_file = export_onnx("runs/sft", "runs/export-onnx", precision="int4")
    print(parity_report("runs/sft", onnx_file.parent, ["asyncio is"]))
    print(format_optimization_table(optimization_table(onnx_file)))

The graph comes from onnxruntime-genai's model builder (run as a subprocess on the
local model folder): GroupQueryAttention with rotary embeddings inside, fused
skip-RMSNorm, and for int8/int4 ``MatMulNBits`` block-quantized weights (block 32,
symmetric). optimum cannot export with transformers 5, and the builder's graph is
what onnxruntime-genai expects (``genai_config.json``).

After building, the chosen ONNX Runtime optimization level is applied offline and
the graph is made standard where it is not: the builder writes ONNX Runtime's
``SimplifiedLayerNormalization`` in the standard ONNX domain, which onnx.checker
rejects; it is replaced by ONNX's own ``RMSNormalization`` (opset 23, the same
computation; ONNX Runtime has CPU and CUDA kernels for it). The result passes
``onnx.checker`` with full shape inference.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from slmforge.errors import ModelError

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
]

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
_EXTERNAL_DATA_MIN_BYTES = 1024  # smaller tensors stay inside model.onnx


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
            MatMul (``MatMulNBits``); activations and the KV cache stay fp32.
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
        built = _run_builder(model_dir, Path(tmp) / "build", precision, execution_provider, Path(tmp) / "cache")
        source = built / MODEL_FILE
        if optimization != "disabled":
            source = _bake_optimization(source, Path(tmp) / "optimized", optimization, execution_provider)
        import onnx

        model = onnx.load(str(source))  # with its external data
        _standardize(model)
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


def _run_builder(model_dir: Path, out: Path, precision: str, target: str, cache: Path) -> Path:
    """Run onnxruntime-genai's model builder on a local folder; returns its output folder."""
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(model_dir), "-o", str(out),
           "-p", precision, "-e", target, "-c", str(cache)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # -i is a local folder: nothing to download
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0 or not (out / MODEL_FILE).is_file() or not (out / "genai_config.json").is_file():
        log = (proc.stdout + proc.stderr).strip()[-1500:]
        raise ModelError(
            f"onnxruntime-genai's model builder could not export {model_dir} ({precision}, {target}); "
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


# --------------------------------------------------------------------------- optimization levels


def optimization_table(
    onnx_file: str | Path,
    runs: int = 5,
    seq_len: int = 16,
    threads: int | None = None,
    providers: list[str] | None = None,
) -> list[dict[str, Any]]:
    """What each ONNX Runtime graph optimization level does to a graph.

    For each level (disabled, basic, extended, all) the graph is optimized and saved through
    ``SessionOptions.optimized_model_filepath``; its operators are counted and its size
    measured, and one forward over ``seq_len`` tokens (empty KV cache) is timed. Run it on an
    export made with ``optimization: disabled`` to see what every level adds; the builder's
    graph is already fused (GroupQueryAttention, SkipSimplifiedLayerNormalization), so
    the differences are small.

    Args:
        onnx_file: A decoder graph (``model.onnx`` of an export).
        runs: Timed forwards per level (after one warm-up); the median is reported.
        seq_len: Tokens in the timed forward.
        threads: Intra-op threads (None = ONNX Runtime's default).
        providers: Execution providers (see ``choose_providers``).

    Returns:
        One dict per level: ``level``, ``nodes``, ``fused_nodes`` (nodes of operators ONNX
        does not define: ONNX Runtime's fused and contrib kernels), ``op_counts``,
        ``size_bytes`` (graph + external data), ``latency_ms`` (median), ``provider``.
    """
    import numpy as np
    import onnx
    import onnxruntime as ort

    from slmforge.generate import ORT_LEVELS, DecoderLayout, choose_providers as choose

    onnx_file = Path(onnx_file)
    if not onnx_file.is_file():
        raise ModelError(f"{onnx_file} does not exist; export a model first (`slmforge export onnx`).")
    layout = DecoderLayout.read(onnx_file.parent) if (onnx_file.parent / "genai_config.json").is_file() else None
    rows = []
    with tempfile.TemporaryDirectory(prefix="slmforge-ort-levels-") as tmp:
        for level, ort_level in ORT_LEVELS.items():
            saved = Path(tmp) / f"{level}.onnx"
            so = ort.SessionOptions()
            so.graph_optimization_level = ort_level
            so.optimized_model_filepath = str(saved)
            so.add_session_config_entry("session.optimized_model_external_initializers_file_name", saved.name + ".data")
            so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes",
                                        str(_EXTERNAL_DATA_MIN_BYTES))
            so.log_severity_level = 3
            if threads:
                so.intra_op_num_threads = threads
            session = ort.InferenceSession(str(onnx_file), so, providers=choose(providers))
            graph = onnx.load(str(saved), load_external_data=False).graph
            counts = Counter(node.op_type for node in graph.node)
            fused = sum(1 for node in graph.node if not _is_standard_op(node.op_type, node.domain))
            data = saved.with_name(saved.name + ".data")
            feeds = _forward_feeds(session, seq_len, np.random.default_rng(0), layout)
            session.run(None, feeds)  # warm-up: first-run allocations
            times = []
            for _ in range(runs):
                t0 = time.perf_counter()
                session.run(None, feeds)
                times.append(time.perf_counter() - t0)
            rows.append({
                "level": level,
                "nodes": len(graph.node),
                "fused_nodes": fused,
                "op_counts": dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))),
                "size_bytes": saved.stat().st_size + (data.stat().st_size if data.is_file() else 0),
                "latency_ms": statistics.median(times) * 1000,
                "provider": session.get_providers()[0],
            })
    return rows


def _is_standard_op(op_type: str, domain: str) -> bool:
    import onnx

    return domain in ("", "ai.onnx") and onnx.defs.has(op_type)


def _forward_feeds(session, seq_len: int, rng, layout=None) -> dict[str, Any]:
    """Inputs for one forward of ``seq_len`` random tokens with an empty KV cache, from the graph's own inputs."""
    import numpy as np

    outputs = {o.name: o for o in session.get_outputs()}
    vocab = outputs["logits"].shape[-1] if "logits" in outputs and isinstance(outputs["logits"].shape[-1], int) else 2
    feeds: dict[str, Any] = {}
    for inp in session.get_inputs():
        if inp.name == "input_ids":
            feeds[inp.name] = rng.integers(0, vocab, size=(1, seq_len), dtype=np.int64)
        elif inp.name == "attention_mask":
            feeds[inp.name] = np.ones((1, seq_len), np.int64)
        elif inp.name == "position_ids":
            feeds[inp.name] = np.arange(seq_len, dtype=np.int64)[None]
        elif inp.name.startswith("past_key_values"):
            _, heads, _, head_size = inp.shape  # (batch, kv_heads, past, head_size); head_size may be symbolic
            if not isinstance(head_size, int):
                if layout is None:
                    raise ModelError(f"The graph's {inp.name} has a symbolic head size and no genai_config.json "
                                     "beside it says what it is.")
                head_size = layout.head_size
            dtype = np.float16 if inp.type == "tensor(float16)" else np.float32
            feeds[inp.name] = np.zeros((1, heads, 0, head_size), dtype)
        else:
            raise ModelError(f"optimization_table does not know how to feed the graph input {inp.name!r}.")
    return feeds


def format_optimization_table(rows: list[dict[str, Any]]) -> str:
    """The rows of ``optimization_table`` as a text table, with what changed at each level."""
    head = f"{'level':<10}{'nodes':>7}{'fused':>7}{'size':>11}{'latency ms':>12}  changes vs previous level"
    lines = [head, "-" * len(head)]
    previous: dict[str, int] = {}
    for row in rows:
        counts = row["op_counts"]
        changes = []
        if previous:
            for op in sorted(set(previous) | set(counts)):
                delta = counts.get(op, 0) - previous.get(op, 0)
                if delta:
                    changes.append(f"{'+' if delta > 0 else '-'}{op} x{abs(delta)}")
        lines.append(f"{row['level']:<10}{row['nodes']:>7}{row['fused_nodes']:>7}{_fmt_bytes(row['size_bytes']):>11}"
                     f"{row['latency_ms']:>12.3f}  {', '.join(changes) or ('-' if previous else '(the input graph)')}")
        previous = counts
    if rows:
        lines.append(f"provider: {rows[0]['provider']}; fused = operators ONNX does not define "
                     "(ONNX Runtime's contrib and fused kernels)")
    return "\n".join(lines)


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GB"


# --------------------------------------------------------------------------- profiling


def profile_onnx(
    onnx_dir: str | Path,
    prompt: str,
    top_n: int = 10,
    max_new_tokens: int = 16,
    trace_dir: str | Path | None = None,
    providers: list[str] | None = None,
    threads: int | None = None,
) -> tuple[list[dict[str, Any]], Path]:
    """Profile greedy generation of a prompt with ONNX Runtime's profiler.

    Args:
        onnx_dir: The export's folder.
        prompt: Plain-text prompt.
        top_n: Operators to return, the most time-consuming first.
        max_new_tokens: Tokens generated after the prompt's forward.
        trace_dir: Folder for the trace (None = the current folder, as ONNX Runtime does).
        providers: Execution providers (see ``choose_providers``).
        threads: Intra-op threads.

    Returns:
        (rows, trace_file): one dict per operator type (``op_type``, ``calls``, ``total_ms``,
        ``mean_us``, ``share`` of all kernel time, ``providers``), and the Chrome trace JSON
        (open it in chrome://tracing or https://ui.perfetto.dev).

    Raises:
        ModelError: The folder is not an export.
    """
    from slmforge.generate import OnnxGenerator, SamplingParams

    folder = Path(trace_dir).expanduser() if trace_dir is not None else Path.cwd()
    folder.mkdir(parents=True, exist_ok=True)
    gen = OnnxGenerator(onnx_dir, providers=providers, threads=threads,
                        profile_prefix=(folder / "onnx_profile").resolve())
    gen.complete(prompt, SamplingParams(max_new_tokens=max_new_tokens))
    trace = Path(gen.session.end_profiling())
    return top_operators(trace, top_n), trace


def top_operators(trace_file: str | Path, top_n: int = 10) -> list[dict[str, Any]]:
    """Kernel time per operator type in an ONNX Runtime profiler trace, largest first."""
    events = json.loads(Path(trace_file).read_text(encoding="utf-8"))
    total_us: Counter[str] = Counter()
    calls: Counter[str] = Counter()
    where: dict[str, set[str]] = {}
    for event in events:
        if event.get("cat") != "Node" or not str(event.get("name", "")).endswith("_kernel_time"):
            continue  # fence events and session-level events
        args = event.get("args", {})
        op = args.get("op_name", "?")
        total_us[op] += float(event.get("dur", 0))
        calls[op] += 1
        where.setdefault(op, set()).add(args.get("provider", "?"))
    grand = sum(total_us.values()) or 1.0
    return [
        {
            "op_type": op,
            "calls": calls[op],
            "total_ms": us / 1000,
            "mean_us": us / calls[op],
            "share": us / grand,
            "providers": sorted(where[op]),
        }
        for op, us in total_us.most_common(top_n)
    ]


def format_profile(rows: list[dict[str, Any]]) -> str:
    """The rows of ``profile_onnx`` as a text table."""
    head = f"{'operator':<36}{'calls':>7}{'total ms':>10}{'mean us':>10}{'share':>8}  provider"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['op_type']:<36}{r['calls']:>7}{r['total_ms']:>10.3f}{r['mean_us']:>10.1f}"
                     f"{r['share']:>8.1%}  {', '.join(p.removesuffix('ExecutionProvider') for p in r['providers'])}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- I/O binding


def io_binding_benchmark(
    onnx_dir: str | Path,
    prompt: str,
    new_tokens: int = 64,
    runs: int = 3,
    providers: list[str] | None = None,
    threads: int | None = None,
) -> dict[str, Any]:
    """Time a decode loop with plain ``session.run`` against one with I/O binding.

    Both decode the prompt and the same ``new_tokens`` tokens (the greedy continuation),
    one session shared; the plain loop copies the growing KV cache in and out every step,
    the bound one updates pre-allocated buffers in place.

    Returns:
        ``plain_ms_per_token``, ``io_binding_ms_per_token`` (medians of ``runs``), ``speedup``,
        ``max_abs_diff`` of their logits (0 on the CPU), ``prompt_tokens``, ``new_tokens``,
        ``provider``.
    """
    import numpy as np

    from slmforge.generate import Decoder, OnnxGenerator

    gen = OnnxGenerator(onnx_dir, providers=providers, threads=threads)
    ids = list(gen.tokenizer(prompt)["input_ids"])
    # The greedy continuation, ignoring end-of-sequence so that every run has new_tokens steps.
    decoder = Decoder(gen.session, gen.layout, rows=1, max_len=len(ids) + new_tokens)
    logits = decoder(np.asarray([ids]))[:, -1]
    follow: list[int] = []
    for _ in range(new_tokens):
        follow.append(int(logits[0].argmax()))
        if len(follow) < new_tokens:
            logits = decoder(np.asarray([[follow[-1]]]))[:, -1]
    results, timings = {}, {}
    for mode in (False, True):
        gen.io_binding = mode
        results[mode] = gen.decode_logits(ids, follow)  # warm-up, and the logits to compare
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            gen.decode_logits(ids, follow)
            times.append(time.perf_counter() - t0)
        timings[mode] = statistics.median(times) * 1000 / max(len(follow), 1)
    return {
        "prompt_tokens": len(ids),
        "new_tokens": len(follow),
        "plain_ms_per_token": timings[False],
        "io_binding_ms_per_token": timings[True],
        "speedup": timings[False] / timings[True] if timings[True] else float("nan"),
        "max_abs_diff": float(np.abs(results[False] - results[True]).max()),
        "provider": gen.providers[0],
    }
