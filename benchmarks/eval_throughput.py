"""Throughput of the evaluation stage: a generation suite batched vs. unbatched
(items/s), and sandboxed code execution (executions/s).

    python benchmarks/eval_throughput.py [--runs 3] [--trivial 50] [--sandbox-only]
    python benchmarks/eval_throughput.py --against 1b0db77 [--runs 4]   # sandbox before/after

Generation rows: the arithmetic suite (48 items) on a random-init micro model,
one prompt per generate call vs. 8 left-padded prompts per call.

Sandbox rows: a trivial program (`pass`) and the 164 HumanEval canonical solutions
checked against their tests, sequentially and with 2 workers (run_many). The
baseline is what an unsandboxed harness pays: a bare `python -I -S -c pass`
subprocess. HumanEval rows go through check_program, so they include the verdict
harness (passed = the tests ran to the end, reported with a per-run token).
Prints a table and writes benchmarks/results/eval_throughput.json (keys "sandbox"
and "generation"); --sandbox-only skips the generation rows and writes
eval_throughput_sandbox.json instead.

--against REV compares the sandbox of git revision REV with the working tree's
on the HumanEval rows, interleaved round by round in one process (so both see the
same machine load, which on a shared 2-core machine moves wall times by 2x):
median ms per execution and median CPU ms of the whole box (bootstrap, init and
program, from RUSAGE_CHILDREN), with the ratio new/old. Writes
eval_throughput_against.json.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from _common import machine, median, save


def _timed(fn, runs: int) -> list[float]:
    secs = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        secs.append(time.perf_counter() - t0)
    return secs


def sandbox_benchmark(runs: int = 3, trivial: int = 50) -> dict:
    """Executions per second through the sandbox; median of ``runs``. Returns a JSON-able dict."""
    from slmforge.evaluate.sandbox import check_program, load_humaneval, run_many, run_python, sandbox_protections

    protections = sandbox_protections()  # probe outside the timed region
    problems = load_humaneval()
    jobs = [(p["prompt"] + p["canonical_solution"], p["test"], p["entry_point"]) for p in problems]

    def bare():
        for _ in range(trivial):
            subprocess.run([sys.executable, "-I", "-S", "-c", "pass"], check=True)

    def trivial_seq():
        for _ in range(trivial):
            assert run_python("pass").status == "passed"

    def trivial_par():
        with ThreadPoolExecutor(2) as pool:
            assert all(r.status == "passed" for r in pool.map(lambda _: run_python("pass"), range(trivial)))

    def humaneval_seq():
        assert all(check_program(*job).status == "passed" for job in jobs)

    def humaneval_par():
        assert all(r.status == "passed" for r in run_many(jobs, workers=2))

    cases = [
        ("bare subprocess, no sandbox (baseline)", bare, trivial, 1),
        ("trivial program", trivial_seq, trivial, 1),
        ("trivial program", trivial_par, trivial, 2),
        ("HumanEval canonical check", humaneval_seq, len(jobs), 1),
        ("HumanEval canonical check", humaneval_par, len(jobs), 2),
    ]
    rows = []
    for name, fn, n, workers in cases:
        secs = _timed(fn, runs)
        t = median(secs)
        rows.append({"case": name, "workers": workers, "executions": n, "seconds": round(t, 3),
                     "executions_per_s": round(n / t, 1), "ms_per_execution": round(1000 * t / n, 1),
                     "runs": [round(s, 3) for s in secs]})
    return {"runs": runs, "protections": protections, "rows": rows}


def print_sandbox(result: dict) -> None:
    print(f"sandbox protections: {', '.join(result['protections'])}")
    print(f"{'case':<40} {'workers':>7} {'execs':>6} {'s':>7} {'exec/s':>7} {'ms/exec':>8}")
    for r in result["rows"]:
        print(f"{r['case']:<40} {r['workers']:>7} {r['executions']:>6} {r['seconds']:>7.2f} "
              f"{r['executions_per_s']:>7.1f} {r['ms_per_execution']:>8.1f}")


def generation_benchmark(items: int = 48, batch_size: int = 8, runs: int = 3) -> dict:
    """Items/s of a generation suite (arithmetic, 48 new tokens) run one prompt at a time
    versus ``batch_size`` prompts per batched ``generate`` (left-padded), on a random-init
    `micro` model with a byte-level BPE trained on the suite's own text."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from slmforge.config import ModelConfig
    from slmforge.evaluate.runner import run_suite
    from slmforge.evaluate.suites import arithmetic_problems, load_suite
    from slmforge.generate import TorchGenerator
    from slmforge.model import build_model

    torch.set_num_threads(2)
    spec, base = load_suite("arithmetic")
    spec.limit = items
    texts = [p["input"] for p in arithmetic_problems(500, seed=1)]
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=1000, special_tokens=["<|bos|>", "<|eos|>", "<|pad|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>",
                                  model_input_names=["input_ids", "attention_mask"])
    model = build_model(ModelConfig(preset="micro"), len(tok), {"bos": 0, "eos": 1, "pad": 2})
    gen = TorchGenerator(model, tok, device="cpu")
    rows = []
    for bs in (1, batch_size):
        secs = []
        for _ in range(runs):
            t0 = time.perf_counter()
            run_suite(gen, spec, base, f"bench-{bs}", batch_size=bs, progress=False)
            secs.append(time.perf_counter() - t0)
        t = median(secs)
        rows.append({"batch_size": bs, "items": items, "seconds": round(t, 2), "items_per_s": round(items / t, 2)})
    return {"suite": "arithmetic", "model": "micro (random init)", "max_new_tokens": spec.max_new_tokens, "rows": rows}


def print_generation(result: dict) -> None:
    print(f"generation suite {result['suite']} on {result['model']}, {result['max_new_tokens']} new tokens per item")
    base = result["rows"][0]["items_per_s"]
    for r in result["rows"]:
        print(f"  batch {r['batch_size']:>2}: {r['items_per_s']:>6.2f} items/s  ({r['seconds']:.1f} s for {r['items']} items, "
              f"{r['items_per_s'] / base:.2f}x unbatched)")


def _sandbox_at(rev: str):
    """The sandbox module (and its helper modules) of git revision ``rev``, loaded from a temp folder."""
    import importlib.util
    import tempfile
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    folder = Path(tempfile.mkdtemp(prefix="sandbox-at-"))
    archive = subprocess.run(["git", "-C", str(root), "archive", rev, "src/slmforge/evaluate"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    spec = importlib.util.spec_from_file_location(f"sandbox_{rev}", folder / "src/slmforge/evaluate/sandbox.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def against_benchmark(rev: str, rounds: int = 4) -> dict:
    """HumanEval canonical checks through the sandbox at ``rev`` and the current one, interleaved."""
    import resource

    import slmforge.evaluate.sandbox as new

    old = _sandbox_at(rev)
    problems = new.load_humaneval()
    jobs = [(p["prompt"] + p["canonical_solution"], p["test"], p["entry_point"]) for p in problems]
    cases = {"sequential": lambda mod: [mod.check_program(*job) for job in jobs],
             "2 workers": lambda mod: mod.run_many(jobs, workers=2)}
    samples: dict = {name: {case: {"ms": [], "cpu_ms": []} for case in cases} for name in ("old", "new")}
    for i in range(rounds):
        order = [("old", old), ("new", new)] if i % 2 == 0 else [("new", new), ("old", old)]
        for name, mod in order:
            mod.sandbox_protections()
            for case, fn in cases.items():
                r0, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
                assert all(r.status == "passed" for r in fn(mod))
                r1, t1 = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
                cpu = r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime
                samples[name][case]["ms"].append(round(1000 * (t1 - t0) / len(jobs), 2))
                samples[name][case]["cpu_ms"].append(round(1000 * cpu / len(jobs), 2))
    rows = []
    for case in cases:
        row = {"case": f"HumanEval canonical check, {case}"}
        for key in ("ms", "cpu_ms"):
            o, n = median(samples["old"][case][key]), median(samples["new"][case][key])
            row.update({f"old_{key}": o, f"new_{key}": n, f"ratio_{key}": round(n / o, 3)})
        rows.append(row)
    return {"against": rev, "rounds": rounds, "rows": rows, "samples": samples}


def print_against(result: dict) -> None:
    print(f"sandbox at {result['against']} (old) vs working tree (new), {result['rounds']} interleaved rounds, "
          "medians per execution")
    print(f"{'case':<40} {'old ms':>7} {'new ms':>7} {'new/old':>7} {'old CPU':>8} {'new CPU':>8} {'new/old':>7}")
    for r in result["rows"]:
        print(f"{r['case']:<40} {r['old_ms']:>7.1f} {r['new_ms']:>7.1f} {r['ratio_ms']:>7.3f} "
              f"{r['old_cpu_ms']:>8.1f} {r['new_cpu_ms']:>8.1f} {r['ratio_cpu_ms']:>7.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--trivial", type=int, default=50, help="executions per trivial-program run")
    parser.add_argument("--sandbox-only", action="store_true", help="only the sandbox rows")
    parser.add_argument("--against", metavar="REV", help="compare the sandbox with the one at git revision REV")
    args = parser.parse_args()
    if args.against:
        result = against_benchmark(args.against, args.runs)
        print(f"machine: {machine()['cpu']}, {machine()['cores']} cores")
        print_against(result)
        print(f"wrote {save('eval_throughput_against', result)}")
        return
    result = sandbox_benchmark(args.runs, args.trivial)
    if args.sandbox_only:
        print(f"machine: {machine()['cpu']}, {machine()['cores']} cores; median of {args.runs} runs")
        print_sandbox(result)
        print(f"wrote {save('eval_throughput_sandbox', {'sandbox': result})}")
        return
    generation = generation_benchmark(runs=args.runs)
    print(f"machine: {machine()['cpu']}, {machine()['cores']} cores; median of {args.runs} runs")
    print_generation(generation)
    print_sandbox(result)
    path = save("eval_throughput", {"sandbox": result, "generation": generation})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
