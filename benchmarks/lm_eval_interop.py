"""lm-evaluation-harness against slmforge, item by item: the commands `slmforge eval lm-eval-task` prints,
run as printed (the real `lm_eval` CLI, `--model hf` and `--model local-completions` against a real
`slmforge serve`), compared with `slmforge eval`'s own per-item scores.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/lm_eval_interop.py quickstart/runs/sft --suite arithmetic \\
        --suite sentiment --limit 20

Prints, per suite and lm-eval model, how many items got the same score (and, for generate suites, the same
raw output and extracted answer; for multiple choice, the largest log-likelihood difference), and writes
benchmarks/results/lm_eval_interop.json. The hf run reads a copy of the model folder without
generation_config.json's max_new_tokens, which transformers would prefer to lm-eval's max_length.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from _common import save

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def lm_eval(model: str, model_args: str, tasks: list[str], include: Path, limit: int, out: Path) -> dict:
    """The `lm_eval` CLI; returns {task: {doc id: sample}} from its --log_samples files."""
    subprocess.run([str(BIN / "lm_eval"), "--model", model, "--model_args", model_args, "--include_path",
                    str(include), "--tasks", ",".join(tasks), "--limit", str(limit), "--log_samples",
                    "--output_path", str(out)], check=True, capture_output=True, text=True,
                   env={**os.environ, "HF_DATASETS_OFFLINE": "1"})
    samples = {}
    for task in tasks:
        file = next(out.rglob(f"samples_{task}_*.jsonl"))
        samples[task] = {s["doc"]["id"]: s for s in map(json.loads, file.read_text().splitlines())}
    return samples


def compare(result, samples: dict) -> dict:
    """Per-item agreement of one lm-eval run with slmforge eval's result."""
    ours = {r["id"]: r for r in result.items}
    row = {"items": len(samples), "same_score": 0}
    if result.task == "generate":
        row |= {"same_output": 0, "same_answer": 0}
        key = "exact_match"
    else:
        row["max_abs_loglikelihood_diff"] = 0.0
        key = "accuracy"
    for doc_id, s in samples.items():
        mine = ours[doc_id]
        row["same_score"] += s["exact_match" if key == "exact_match" else "acc"] == mine["scores"][key]
        if result.task == "generate":
            row["same_output"] += s["resps"][0][0] == mine["output"]
            row["same_answer"] += s["filtered_resps"][0] == " ".join(mine["answer"].split()) or \
                s["filtered_resps"][0] == mine["answer"]
        else:
            lls = [float(r[0][0]) for r in s["resps"]]
            diff = max(abs(a - mine["loglikelihoods"][c]) for a, c in zip(lls, s["doc"]["choices"]))
            row["max_abs_loglikelihood_diff"] = max(row["max_abs_loglikelihood_diff"], diff)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", type=Path, help="A model folder (torch engine).")
    ap.add_argument("--suite", action="append", help="Suite name or YAML (repeatable; generate or multiple_choice).")
    ap.add_argument("--limit", type=int, default=20)
    args = ap.parse_args()
    suites = args.suite or ["arithmetic", "sentiment"]

    from slmforge.evaluate.runner import run_suite
    from slmforge.evaluate.suites import export_lm_eval_task, load_suite
    from slmforge.generate import TorchGenerator

    gen = TorchGenerator.from_pretrained(args.model, device="cpu")
    work = Path(tempfile.mkdtemp(prefix="lm_eval_interop-"))
    ours, tasks = {}, []
    for name in suites:
        spec, base = load_suite(name)
        spec.limit = args.limit
        ours[name] = run_suite(gen, spec, base, args.model, progress=False)
        tasks.append(export_lm_eval_task(spec, base, None, work / "tasks").stem)
    del gen

    hf_model = work / "hf-model"
    shutil.copytree(args.model, hf_model)
    config_file = hf_model / "generation_config.json"
    if config_file.is_file():
        config = json.loads(config_file.read_text())
        config.pop("max_new_tokens", None)
        config_file.write_text(json.dumps(config))
    runs, seconds = {}, {}
    t0 = time.perf_counter()
    runs["hf"] = lm_eval("hf", f"pretrained={hf_model},add_bos_token=True", tasks, work / "tasks", args.limit,
                         work / "out-hf")
    seconds["hf"] = time.perf_counter() - t0
    port = free_port()
    server = subprocess.Popen([str(BIN / "slmforge"), "serve", f"m={args.model}", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                raise SystemExit("slmforge serve did not come up")
            time.sleep(0.2)
        t0 = time.perf_counter()
        runs["local-completions"] = lm_eval(
            "local-completions", f"model=m,base_url=http://127.0.0.1:{port}/v1/completions,tokenizer_backend="
            f"huggingface,tokenizer={args.model},add_bos_token=True", tasks, work / "tasks", args.limit,
            work / "out-api")
        seconds["local-completions"] = time.perf_counter() - t0
    finally:
        server.terminate()
        server.wait(30)

    rows = []
    for name, task in zip(suites, tasks):
        for run, samples in runs.items():
            row = {"suite": name, "lm_eval_model": run, **compare(ours[name], samples[task]),
                   ours[name].primary: ours[name].metrics[ours[name].primary]}
            rows.append(row)
            print(" ".join(f"{k}={v:.2e}" if "diff" in k else f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in row.items()))
    print("seconds (lm_eval CLI, both suites; ~35 s of each is lm-eval indexing its own catalogue):",
          {k: round(v, 1) for k, v in seconds.items()})
    print("->", save("lm_eval_interop", {"model": str(args.model), "limit": args.limit, "rows": rows,
                                         "lm_eval_seconds": seconds}))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
