"""The real OptiLLM in front of `slmforge serve`, next to our own proxy, on the same model and questions.

    python benchmarks/optillm_interop.py [MODEL] [--questions 5] [--approaches bon,self_consistency]

MODEL is a model folder (default quickstart/runs/sft, made by ``make demo``). OptiLLM 0.4.0 pins
transformers < 5.13 (ours is 5.24), so it runs from its own virtual environment, ``.venv-optillm``, which
this script makes when it is missing (torch 2.13.0 CPU first, then optillm: ~3 GB, ~10 minutes).

For each approach (OptiLLM's convention: the approach prefixes the model name, ``bon-sft``), the official
``openai`` client asks OptiLLM, OptiLLM asks our server, and our server's ``GET /v1/usage`` says how many
requests and tokens that cost; then the same through ``slmforge proxy`` (``bon3-sft``: three samples, the
best by the model's log-likelihood; ``sc5-sft``). Prints a table and writes
benchmarks/results/optillm_interop.json.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _common import save

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv-optillm"
QUESTIONS = ["What does the len function return?", "How do I open a file for reading?",
             "What is a list comprehension?", "How do I sort a dictionary by value?",
             "What does the json module do?", "How do I read environment variables?",
             "What is a generator?", "How do I format a string with f-strings?"]
OURS = {"bon": "bon3", "self_consistency": "sc5"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait(url: str, proc: subprocess.Popen, seconds: float = 300) -> None:
    import httpx

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{proc.args[0]} exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"{url} did not come up in {seconds} s")


def ensure_venv() -> Path:
    exe = VENV / "bin" / "optillm"
    if not exe.exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        pip = str(VENV / "bin" / "pip")
        subprocess.run([pip, "install", "-q", "torch==2.13.0"], check=True)  # CPU wheel first, never the CUDA one
        subprocess.run([pip, "install", "-q", "optillm==0.4.0"], check=True)
    return exe


def usage(url: str) -> tuple[int, int, int]:
    import httpx

    rows = httpx.get(f"{url}/v1/usage").json()["data"]
    return (sum(r["requests"] for r in rows), sum(r["prompt_tokens"] for r in rows),
            sum(r["completion_tokens"] for r in rows))


def ask(base: str, model: str, questions: list[str], upstream: str, max_tokens: int) -> dict:
    import openai

    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", timeout=600)
    before, seconds, ok, reported = usage(upstream), [], 0, []
    for q in questions:
        t0 = time.perf_counter()
        reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": q}],
                                               max_tokens=max_tokens)
        seconds.append(time.perf_counter() - t0)
        ok += bool(reply.choices and reply.choices[0].message.content is not None)
        reported.append(reply.usage.completion_tokens if reply.usage else 0)
    after = usage(upstream)
    n = len(questions)
    return {"model": model, "answered": ok, "questions": n,
            "upstream_requests_per_question": (after[0] - before[0]) / n,
            "upstream_completion_tokens_per_question": (after[2] - before[2]) / n,
            "reported_completion_tokens_per_question": sum(reported) / n,
            "seconds_median": statistics.median(seconds)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", nargs="?", default="quickstart/runs/sft")
    ap.add_argument("--questions", type=int, default=5)
    ap.add_argument("--approaches", default="bon,self_consistency")
    ap.add_argument("--max-tokens", type=int, default=48)
    args = ap.parse_args()
    name = Path(args.model).name
    optillm = ensure_venv()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SLMFORGE_NO_PROGRESS": "1"}
    serve_port, opt_port, proxy_port = free_port(), free_port(), free_port()
    upstream = f"http://127.0.0.1:{serve_port}"
    slm = str(Path(sys.executable).parent / "slmforge")
    procs = [subprocess.Popen([slm, "serve", args.model, "--port", str(serve_port)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        wait(f"{upstream}/health", procs[0])
        procs.append(subprocess.Popen([str(optillm), "--base-url", f"{upstream}/v1", "--port", str(opt_port),
                                       "--model", name], env={**env, "OPENAI_API_KEY": "unused"},
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        procs.append(subprocess.Popen([slm, "proxy", "--upstream", f"{upstream}/v1", "--port", str(proxy_port),
                                       "--strategy", "none"], env=env, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL))
        wait(f"http://127.0.0.1:{opt_port}/health", procs[1])
        wait(f"http://127.0.0.1:{proxy_port}/health", procs[2])
        questions = (QUESTIONS * 4)[: args.questions]
        rows = []
        for approach in args.approaches.split(","):
            for who, base, model in (("optillm", f"http://127.0.0.1:{opt_port}", f"{approach}-{name}"),
                                     ("slmforge proxy", f"http://127.0.0.1:{proxy_port}", f"{OURS[approach]}-{name}")):
                row = {"via": who, "approach": approach, **ask(base, model, questions, upstream, args.max_tokens)}
                rows.append(row)
                print(row, flush=True)
    finally:
        for p in reversed(procs):
            p.terminate()
            p.wait(timeout=60)
    print(f"\n{args.model}, {args.questions} questions, max_tokens {args.max_tokens}")
    print("| via | model | answered | upstream requests / q | upstream completion tokens / q | "
          "reported completion tokens / q | median s / q |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['via']} | `{r['model']}` | {r['answered']}/{r['questions']} | "
              f"{r['upstream_requests_per_question']:.1f} | {r['upstream_completion_tokens_per_question']:.0f} | "
              f"{r['reported_completion_tokens_per_question']:.0f} | {r['seconds_median']:.2f} |")
    print(f"wrote {save('optillm_interop', {'model': args.model, 'rows': rows})}")


if __name__ == "__main__":
    main()
