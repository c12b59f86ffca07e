"""Structured output within max_tokens: how many JSON-schema replies parse, with and without the budget.

    python benchmarks/structured_budget.py [MODEL] [--requests 10] [--max-tokens 32,60,128] [--temperature 1.0]
                                           [--synthetic-vocab 262144]

MODEL is a model folder (default quickstart/runs/sft, made by ``make demo``). For each max_tokens,
``--requests`` chat replies per schema are decoded by the server's batching engine
(``BatchEngine``, in process) under the schema's constraint, seeded 0..N-1, twice:

- without budget: the constraint as before budget-awareness (``Constraint.start()`` with no token
  budget): a reply still inside a string or number at max_tokens is cut there;
- with budget: the constraint steers each reply to a complete value within max_tokens.

A reply counts as parsed when ``json.loads`` succeeds and jsonschema validates it. Also printed: the
compile time of each schema's constraint for this model's tokenizer (outlines-core index) and what the
distance table adds to it (median of 3), and the same for a synthetic byte-level vocabulary of
``--synthetic-vocab`` tokens (random printable strings; Gemma 3's vocabulary size by default, 0 skips
it): the cost that grows with the vocabulary. Prints tables and writes
benchmarks/results/structured_budget.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from _common import machine, median, save

DEFAULT_MODEL = Path("quickstart/runs/sft")
SCHEMAS = {
    "function": {"type": "object", "properties": {"function": {"type": "string"}, "arguments": {"type": "integer"}},
                 "required": ["function", "arguments"]},
    "person": {"type": "object", "properties": {
        "name": {"type": "string"}, "age": {"type": "integer"}, "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string"}}, "score": {"type": "number"}},
        "required": ["name", "age", "role", "tags"]},
    "summary": {"type": "object", "properties": {"title": {"type": "string"}, "summary": {"type": "string"},
                                                 "keywords": {"type": "array", "items": {"type": "string"}}},
                "required": ["title", "summary", "keywords"]},
}
QUESTIONS = ["Describe len as JSON", "What does zip do? Answer in JSON", "Summarise the os module as JSON",
             "Describe a user of this library", "What is a coroutine? JSON please"]


class _NoBudget:
    """A constraint that starts without a token budget: decoding as it was before budget-awareness."""

    def __init__(self, constraint) -> None:
        self.constraint = constraint

    def start(self, max_tokens: int | None = None):
        return self.constraint.start()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", nargs="?", type=Path, default=DEFAULT_MODEL, help="a model folder (torch engine)")
    parser.add_argument("--requests", type=int, default=10, help="replies per schema and max_tokens")
    parser.add_argument("--max-tokens", default="32,60,128", help="token budgets to try")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--synthetic-vocab", type=int, default=262144, help="also time compiling for this many tokens")
    args = parser.parse_args()
    if not (args.model / "config.json").is_file():
        parser.error(f"{args.model} is not a model folder; make one with `make demo` (quickstart/runs/sft)")
    budgets = [int(n) for n in args.max_tokens.split(",")]

    import jsonschema
    import outlines_core as oc
    import torch

    from slmforge.generate import SamplingParams, TorchGenerator
    from slmforge.generate._automaton import Constraint
    from slmforge.generate._schema import _schema_regex, json_schema_constraint
    from slmforge.generate._vocab import _vocabulary
    from slmforge.serve._batch import BatchEngine, BatchRequest

    gen = TorchGenerator.from_pretrained(args.model, device="cpu")
    tok, eos = gen.tokenizer, tuple(gen.eos_token_ids)
    compile_rows = []
    tokenizers = [(tok, eos)] + ([(_synthetic_tokenizer(args.synthetic_vocab), (0,))] if args.synthetic_vocab else [])
    for t, ends in tokenizers:
        for name, schema in SCHEMAS.items():
            regex, vocab = _schema_regex(schema), _vocabulary(t, ends)
            index_s, dist_s = [], []
            for _ in range(3 if t is tok else 1):
                t0 = time.perf_counter()
                index = oc.Index(regex, vocab)
                t1 = time.perf_counter()
                c = Constraint(regex, index, ends)  # builds the distance table, nothing else
                index_s.append(t1 - t0)
                dist_s.append(time.perf_counter() - t1)
            compile_rows.append({"vocab": len(t), "schema": name, "index_s": round(median(index_s), 4),
                                 "distances_s": round(median(dist_s), 4), "states": len(c._max_next),
                                 "min_tokens": c.min_tokens})

    engine = BatchEngine(gen, max_batch_size=16)
    prompts = [engine.encode(engine.render_chat([{"role": "user", "content": q}]), False) for q in QUESTIONS]
    rows = []
    for max_tokens in budgets:
        for mode in ("without budget", "with budget"):
            parsed = total = length = tokens = 0
            for name, schema in SCHEMAS.items():
                constraint = json_schema_constraint(tok, schema, eos_ids=eos)
                if mode == "without budget":
                    constraint = _NoBudget(constraint)
                handles = [engine.submit(BatchRequest(prompts[i % len(prompts)], SamplingParams(
                    max_new_tokens=max_tokens, temperature=args.temperature, seed=i), constraint=constraint))
                    for i in range(args.requests)]
                for h in handles:
                    text, fin, _ = h.wait()
                    assert fin.error is None, fin.error
                    total += 1
                    length += fin.finish_reason == "length"
                    tokens += fin.completion_tokens
                    try:
                        jsonschema.validate(json.loads(text), schema)
                        parsed += 1
                    except (json.JSONDecodeError, jsonschema.ValidationError):
                        pass
            rows.append({"max_tokens": max_tokens, "mode": mode, "replies": total, "parsed": parsed,
                         "finish_length": length, "mean_tokens": round(tokens / total, 1)})
    engine.stop()

    m = machine()
    print(f"\n{args.model}: temperature {args.temperature}, {args.requests} replies per schema "
          f"({', '.join(SCHEMAS)}); torch threads {torch.get_num_threads()}; machine: {m['cpu']}, "
          f"{m['cores']} cores, load avg {os.getloadavg()[0]:.2f}\n")
    print("| max_tokens | decoding | parse and validate | finish_reason length | mean tokens |")
    print("|---:|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['max_tokens']} | {r['mode']} | {r['parsed']}/{r['replies']} | {r['finish_length']} "
              f"| {r['mean_tokens']} |")
    print("\nconstraint compile time:\n")
    print("| vocabulary | schema | states | shortest reply (tokens) | outlines-core index | distance table | overhead |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for r in compile_rows:
        print(f"| {r['vocab']} | {r['schema']} | {r['states']} | {r['min_tokens']} | {r['index_s'] * 1000:.0f} ms "
              f"| {r['distances_s'] * 1000:.0f} ms | {100 * r['distances_s'] / r['index_s']:.0f}% |")
    path = save("structured_budget", {
        "settings": {"model": str(args.model), "requests": args.requests, "max_tokens": budgets,
                     "temperature": args.temperature, "vocab_size": len(tok), "schemas": SCHEMAS,
                     "torch_threads": torch.get_num_threads(), "load_average_1min": os.getloadavg()[0]},
        "results": rows, "compile": compile_rows,
    })
    print(f"\nwrote {path}")


def _synthetic_tokenizer(size: int):
    """A byte-level tokenizer of ``size`` tokens: the 256 bytes, then random printable strings of 2-8
    characters (only its vocabulary matters to constrained decoding); id 0 is the end token."""
    import random

    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    to_char, rng = bytes_to_unicode(), random.Random(0)
    vocab = {"<eos>": 0, **{to_char[b]: b + 1 for b in range(256)}}
    printable = [to_char[b] for b in range(32, 127)]
    while len(vocab) < size:
        vocab.setdefault("".join(rng.choice(printable) for _ in range(rng.randint(2, 8))), len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>")


if __name__ == "__main__":
    main()
