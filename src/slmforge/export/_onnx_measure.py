"""ONNX export, the measurements: optimization levels compared, generation profiled, I/O binding timed.

Private to ``slmforge.export.onnx``, which re-exports ``optimization_table``, ``format_optimization_table``,
``profile_onnx``, ``top_operators``, ``format_profile`` and ``io_binding_benchmark``.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from slmforge.errors import ModelError

# Smaller tensors stay inside model.onnx: the export and the optimized graphs here split data the same way.
_EXTERNAL_DATA_MIN_BYTES = 1024

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
    # A windowed layer's past is never empty: ONNX Runtime wants room for the whole window (see Decoder).
    windowed = {past: layout.sliding_window for i, (past, _) in enumerate(layout.cache_names())
                if i // 2 in layout.sliding_layers} if layout is not None else {}
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
            feeds[inp.name] = np.zeros((1, heads, windowed.get(inp.name, 0), head_size), dtype)
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
