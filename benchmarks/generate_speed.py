"""Decode speed of the torch engine versus plain ``model.generate``, per model preset.

    python benchmarks/generate_speed.py [--runs 3] [--new-tokens 128] [--presets nano,micro,small,base]
    python benchmarks/generate_speed.py --models quickstart/runs/sft,quickstart/runs/quantize-int8_weight_only

For each preset: a randomly initialised model (vocabulary 8192), a 32-token
prompt, greedy decoding of exactly ``--new-tokens`` tokens at batch 1 (the
tokenizer has no end-of-sequence token, so nothing stops early), timed through
``TorchGenerator.complete`` and through ``model.generate`` on the same model and
input ids, alternating, median of ``--runs`` after one warm-up of each. The
ratio shows what the engine's own work costs (tokenizing, building the
generation config, decoding the text). Runs on one torch thread unless
``--threads`` says otherwise.

It also measures this machine's memory bandwidth (one thread, numpy triad:
``_common.bandwidth_gbs``) and puts each preset's speed beside the bound it
implies: a batch-1 decoder reads every fp32 weight once per token, so tokens/s
<= bandwidth / weight bytes (for weights larger than the CPU's caches). Prints
a table and writes benchmarks/results/generate_speed.json.

With ``--models`` it measures model folders instead of presets (a float folder
and the quantized folders made from it, say): each loaded as `slmforge generate`
loads it, all loaded first and then timed in rounds (each folder once a round),
a fixed English prompt, ``ignore_eos`` so that exactly ``--new-tokens`` come
out, weights = the bytes of the folder's safetensors files, and one more
column: how many leading greedy tokens agree with the first folder's (the
float parent's, when it is listed first). Writes
benchmarks/results/generate_speed_models.json (``--json NAME``: NAME.json).
"""

from __future__ import annotations

import argparse
import os
import time

from _common import bandwidth_gbs, machine, median, save

VOCAB = 8192
PROMPT_TOKENS = 32


def word_tokenizer():
    """A tokenizer of VOCAB plain words and no special tokens: generation can only stop at the length limit."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w0"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=raw, model_input_names=["input_ids", "attention_mask"])


def bench_preset(preset: str, tokenizer, runs: int, new_tokens: int, bandwidth: float) -> dict:
    from slmforge.config import ModelConfig
    from slmforge.generate import SamplingParams, TorchGenerator
    from slmforge.model import build_model

    model = build_model(ModelConfig(preset=preset), vocab_size=VOCAB, special_ids=None, seed=0)
    params_count = sum(p.numel() for p in model.parameters())
    gen = TorchGenerator(model, tokenizer, device="cpu")
    prompt = " ".join(f"w{(i * 37) % VOCAB + 1}" for i in range(PROMPT_TOKENS))
    params = SamplingParams(max_new_tokens=new_tokens)
    enc = tokenizer(prompt, return_tensors="pt")
    assert enc["input_ids"].shape[1] == PROMPT_TOKENS

    timed = time_decode(gen, prompt, params, enc, runs)
    return {"preset": preset, "params": params_count, **speed_row(timed, 4 * params_count, new_tokens, bandwidth)}


def decoders(gen, prompt: str, params, enc) -> tuple:
    """``(engine, plain, plain_ids)``: decode with the engine and with plain ``model.generate`` on the same
    input (each returns its text); ``plain_ids`` holds the last plain call's new token ids."""
    import torch

    model, tokenizer, new_tokens = gen.model, gen.tokenizer, params.max_new_tokens
    prompt_len = enc["input_ids"].shape[1]
    plain_ids: list[int] = []

    def engine():
        c = gen.complete(prompt, params)[0]
        assert c.tokens == new_tokens and c.finish_reason == "length", c
        return c.text

    def plain():
        with torch.inference_mode():
            # greedy as the engine decodes it: no repetition penalty from the folder's generation_config.json
            out = model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                 repetition_penalty=1.0)
        assert out.shape[1] == prompt_len + new_tokens
        plain_ids[:] = out[0, prompt_len:].tolist()
        return tokenizer.decode(out[0, prompt_len:], skip_special_tokens=True)

    return engine, plain, plain_ids


def time_rounds(fns: dict, runs: int) -> dict[str, list[float]]:
    """Seconds of each function per round, all of them once a round, so all see the same machine load."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def time_decode(gen, prompt: str, params, enc, runs: int) -> dict:
    """Times of the engine and of plain ``model.generate`` on the same input, alternating, after one
    warm-up of each; also the plain greedy token ids and whether both wrote the same text."""
    engine, plain, ids = decoders(gen, prompt, params, enc)
    same = engine() == plain()  # also the warm-up
    return {"times": time_rounds({"engine": engine, "plain": plain}, runs), "same": same, "ids": ids}


def speed_row(timed: dict, weight_bytes: int, new_tokens: int, bandwidth: float) -> dict:
    """Tokens/s of both, their ratio, and the share of the bandwidth bound ``weight_bytes`` implies."""
    times = timed["times"]
    engine_tps = new_tokens / median(times["engine"])
    plain_tps = new_tokens / median(times["plain"])
    bound = bandwidth * 1e9 / weight_bytes
    return {
        "weight_bytes": weight_bytes,
        "bandwidth_bound_tokens_per_s": round(bound, 1),
        "engine_share_of_bound": round(engine_tps / bound, 3),
        "engine_weight_gbs": round(engine_tps * weight_bytes / 1e9, 2),
        "new_tokens": new_tokens,
        "engine_tokens_per_s": round(engine_tps, 1),
        "plain_generate_tokens_per_s": round(plain_tps, 1),
        "engine_over_plain": round(engine_tps / plain_tps, 3),
        "same_greedy_output": timed["same"],
        "seconds": {k: [round(v, 4) for v in vs] for k, vs in times.items()},
    }


MODEL_PROMPT = "The built-in function len returns the number of items in a container. For example,"


def bench_models(folders: list[str], runs: int, new_tokens: int, bandwidth: float) -> list[dict]:
    """Model folders (float or quantized) through the torch engine, as `slmforge generate` loads them; all
    loaded first, then timed in rounds (every folder once a round), so a busy spell slows them alike."""
    from pathlib import Path

    from slmforge.generate import SamplingParams, load_generator

    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    fns, found = {}, []
    for folder in folders:
        gen = load_generator(folder, device="cpu")
        enc = gen.tokenizer(MODEL_PROMPT, return_tensors="pt")
        engine, plain, ids = decoders(gen, MODEL_PROMPT, params, enc)
        fns.update({(folder, "engine"): engine, (folder, "plain"): plain})
        same = engine() == plain()  # also the warm-up
        weight_bytes = sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))
        found.append((folder, enc["input_ids"].shape[1], same, ids, weight_bytes))
    times = time_rounds(fns, runs)
    rows = []
    for folder, prompt_tokens, same, ids, weight_bytes in found:
        timed = {"times": {k: times[(folder, k)] for k in ("engine", "plain")}, "same": same}
        rows.append({"model": folder, "prompt_tokens": prompt_tokens,
                     **speed_row(timed, weight_bytes, new_tokens, bandwidth), "greedy_ids": ids})
        print(f"  {folder}: engine {rows[-1]['engine_tokens_per_s']} tok/s", flush=True)
    return rows


def agreeing_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def models_table(rows: list[dict], args, bandwidth: float) -> None:
    import torch

    first = rows[0]["greedy_ids"]
    for r in rows:
        r["agreeing_prefix_with_first"] = agreeing_prefix(first, r.pop("greedy_ids"))
    head = (f"{'model':<48}{'weights MB':>11}{'engine tok/s':>14}{'generate tok/s':>16}{'same':>6}"
            f"{'= first (tokens)':>18}{'GB/s read':>11}")
    print(f"\nGreedy decode, batch 1, {rows[0]['prompt_tokens']}-token prompt, {args.new_tokens} new tokens "
          f"(ignore_eos), median of {args.runs} (torch threads {torch.get_num_threads()}, load avg "
          f"{os.getloadavg()[0]:.2f}); memory bandwidth {bandwidth:.1f} GB/s")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['model']:<48}{r['weight_bytes'] / 1e6:>11.2f}{r['engine_tokens_per_s']:>14.1f}"
              f"{r['plain_generate_tokens_per_s']:>16.1f}{'yes' if r['same_greedy_output'] else 'NO':>6}"
              f"{r['agreeing_prefix_with_first']:>12} / {args.new_tokens:<3}{r['engine_weight_gbs']:>11.2f}")
    path = save(args.json or "generate_speed_models", {
        "settings": {"runs": args.runs, "new_tokens": args.new_tokens, "prompt": MODEL_PROMPT,
                     "torch_threads": torch.get_num_threads(), "load_average_1min": os.getloadavg()[0],
                     "bandwidth_gbs": round(bandwidth, 2)},
        "results": rows,
    })
    print(f"\nwrote {path}  (machine: {machine()['cpu']}, {machine()['cores']} cores)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--presets", default="nano,micro,small,base")
    parser.add_argument("--models", default=None,
                        help="comma-separated model folders (float or quantized) to measure instead of the presets; "
                        "list the float parent first: the others' greedy tokens are compared with its")
    parser.add_argument("--json", default=None, help="name of the results file under benchmarks/results/ (--models)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (0 = torch's choice). 1 by default: on a small shared machine "
                        "two spinning OpenMP threads made timings swing 3x from run to run")
    args = parser.parse_args()

    import torch

    from slmforge.model import PRESETS

    if args.threads:
        torch.set_num_threads(args.threads)
    bandwidth = bandwidth_gbs()
    print(f"  memory bandwidth {bandwidth:.1f} GB/s (one thread, numpy triad)", flush=True)
    if args.models:
        models_table(bench_models(args.models.split(","), args.runs, args.new_tokens, bandwidth), args, bandwidth)
        return
    tokenizer = word_tokenizer()
    rows = []
    for preset in args.presets.split(","):
        if preset not in PRESETS:
            parser.error(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
        rows.append(bench_preset(preset, tokenizer, args.runs, args.new_tokens, bandwidth))
        r = rows[-1]
        print(f"  {preset}: engine {r['engine_tokens_per_s']} tok/s, plain {r['plain_generate_tokens_per_s']} tok/s",
              flush=True)

    head = (f"{'preset':<8}{'params':>12}{'TorchGenerator tok/s':>22}{'model.generate tok/s':>22}"
            f"{'ratio':>8}{'same':>6}{'weights MB':>12}{'GB/s read':>11}{'bound tok/s':>13}{'of bound':>10}")
    print(f"\nGreedy decode, batch 1, {PROMPT_TOKENS}-token prompt, {args.new_tokens} new tokens, "
          f"median of {args.runs} (torch threads {torch.get_num_threads()}, load avg {os.getloadavg()[0]:.2f}); "
          f"memory bandwidth {bandwidth:.1f} GB/s (one thread, numpy triad)")
    print(head)
    print("-" * len(head))
    for r in rows:
        same = "yes" if r["same_greedy_output"] else "NO"
        print(f"{r['preset']:<8}{r['params']:>12,}{r['engine_tokens_per_s']:>22.1f}"
              f"{r['plain_generate_tokens_per_s']:>22.1f}{r['engine_over_plain']:>8.3f}{same:>6}"
              f"{r['weight_bytes'] / 1e6:>12.1f}{r['engine_weight_gbs']:>11.2f}"
              f"{r['bandwidth_bound_tokens_per_s']:>13.1f}{r['engine_share_of_bound'] * 100:>9.1f}%")
    path = save("generate_speed", {
        "settings": {"runs": args.runs, "new_tokens": args.new_tokens, "prompt_tokens": PROMPT_TOKENS,
                     "vocab_size": VOCAB, "torch_threads": torch.get_num_threads(),
                     "load_average_1min": os.getloadavg()[0], "bandwidth_gbs": round(bandwidth, 2)},
        "results": rows,
    })
    print(f"\nwrote {path}  (machine: {machine()['cpu']}, {machine()['cores']} cores)")


if __name__ == "__main__":
    main()
