"""GGUF export, the check: the written file loaded in llama.cpp and compared with the source model.

Private to ``slmforge.export.gguf``, which re-exports ``gguf_parity_report``, ``PARITY_TEXTS`` and
``PARITY_PROMPTS``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from slmforge.errors import ModelError
from slmforge.export._gguf_vocab import _END_OF_TURN

# Texts whose tokenization llama.cpp must reproduce: prose, code, whitespace runs, unicode, numbers,
# URLs and special tokens: the places where a pre-tokenizer or a byte mapping goes wrong first.
PARITY_TEXTS = (
    "The garden was planted in early spring.",
    "json.dumps(obj, *, indent=None) serializes obj to a JSON formatted str.",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "if (a && b) { return a[0]; } // done",
    "for i in range(10):\n\tprint(i ** 2)  # tab-indented",
    "  two leading spaces and trailing spaces   ",
    "multiple    spaces\t\ttabs\n\n\nblank lines\r\n",
    "Ünïcödé çharacters, naïve café, Straße",
    "日本語のテキストと中文",
    "emoji 😀🚀 and flags 🇩🇪",
    "numbers 1234567 3.14159 -42 1e-9 0x1F",
    "don't won't it's we'll I'm they're",
    "URL https://docs.python.org/3/library/json.html?q=a&b=c#x",
    "punctuation!!! ??? ... --- (((nested)))",
    "MiXeD CaSe WoRdS and ALLCAPS",
    "",
    " ",
    "\n",
)
PARITY_PROMPTS = ("def fibonacci(n):", "The standard library", "import json\n", "Question: What does len do?\nAnswer:",
                  "The garden was")


def gguf_parity_report(
    model_dir: str | Path,
    gguf_file: str | Path,
    prompts: list[str] | tuple[str, ...] = PARITY_PROMPTS,
    max_new_tokens: int = 16,
    texts: list[str] | tuple[str, ...] = PARITY_TEXTS,
    n_threads: int | None = None,
) -> dict[str, Any]:
    """Load the GGUF file in llama.cpp and compare it with the Hugging Face model it came from.

    The GGUF counterpart of ``export.onnx.parity_report`` (same key names, same meanings), through
    llama.cpp's own tokenizer and graph (xllamacpp), so the export claims only what llama.cpp did:

    - Tokenization: each text (``texts``, the prompts, and a chat rendered with the model's template)
      through llama.cpp's tokenizer and the source tokenizer, with and without special tokens.
    - Greedy parity: PyTorch decodes ``max_new_tokens`` greedy tokens per prompt (up to an end-of-turn
      token). llama.cpp is then asked for its next token after every prefix of the prompt and of
      PyTorch's tokens (teacher-forced: ``top1_agreement`` over all positions, ``greedy_agreement``
      over generated ones, and the log-probability it gives its pick next to PyTorch's), and decodes
      each prompt freely (``greedy_identical``: prompts whose whole continuation is PyTorch's).

    Quantized types are expected to disagree sometimes: the rates say how often, nothing is required.

    Args:
        model_dir: The Hugging Face model folder that was exported.
        gguf_file: The GGUF file.
        prompts: Plain-text prompts (llama.cpp gets PyTorch's token ids, BOS included).
        max_new_tokens: Greedy tokens per prompt.
        texts: Texts whose tokenization is compared.
        n_threads: CPU threads for llama.cpp (default: the machine's cores, at most 8).

    Returns:
        ``engine``, ``prompts``, ``positions`` (next-token predictions compared), ``top1_agreement``,
        ``greedy_agreement``, ``greedy_identical``, ``max_abs_logprob_diff`` (over llama.cpp's picks), ``tokenization``
        (``texts``, ``identical``, ``agreement``, ``mismatches``: up to 5 texts that differ).

    Raises:
        ModelError: llama.cpp cannot load the file, or the source model cannot be loaded.
    """
    from slmforge.errors import GenerateError
    from slmforge.generate import LlamaCppGenerator
    from slmforge.model import load_causal_lm

    model, tokenizer = load_causal_lm(model_dir)
    model.eval()
    refs = _torch_references(model, tokenizer, prompts, max_new_tokens)
    longest = max((len(ids) + len(new) for ids, new, _ in refs), default=1)
    try:
        gen = LlamaCppGenerator(gguf_file, n_threads=n_threads or max(1, min(os.cpu_count() or 2, 8)),
                                n_ctx=max(longest + 8, 64), cache_prompt=True)
    except GenerateError as exc:
        raise ModelError(f"The GGUF file was written, but llama.cpp cannot use it: {str(exc).rstrip('.')}. This is a "
                         "gap in slmforge's GGUF converter for this model; please report it with the model's "
                         "config.json.") from None
    with gen:
        tokenization = _tokenization_agreement(gen, tokenizer, [*texts, *prompts, *_chat_texts(tokenizer)])
        agreement = _next_token_agreement(gen, refs)
    return {
        "engine": "llama.cpp",
        "prompts": len(refs),
        "positions": agreement["positions"],
        "top1_agreement": agreement["top1_agreement"],
        "greedy_agreement": agreement["greedy_agreement"],
        "greedy_identical": agreement["greedy_identical"],
        "max_new_tokens": max_new_tokens,
        "max_abs_logprob_diff": agreement["max_abs_logprob_diff"],
        "tokenization": tokenization,
    }


def _torch_references(model, tokenizer, prompts, max_new_tokens: int) -> list[tuple[list[int], list[int], Any]]:
    """(prompt ids, greedy ids, log-probs after each position) per prompt: PyTorch's greedy decoding, up to an
    end token."""
    import torch
    from transformers import DynamicCache

    refs: list[tuple[list[int], list[int], Any]] = []
    stops = _end_ids(tokenizer, model)
    for prompt in prompts:
        ids = list(tokenizer(prompt)["input_ids"])
        with torch.inference_mode():
            cache = DynamicCache(config=model.config)  # filled in place by each forward
            parts, new = [model(input_ids=torch.tensor([ids]), cache=cache, use_cache=True).logits[0]], []
            while len(new) < max_new_tokens and (not new or new[-1] not in stops):
                new.append(int(parts[-1][-1].argmax()))
                parts.append(model(input_ids=torch.tensor([[new[-1]]]), cache=cache, use_cache=True).logits[0])
        # (S + N, V): the log-probabilities after each position, as numpy (no torch work between llama.cpp calls).
        refs.append((ids, new, torch.log_softmax(torch.cat(parts).float(), -1).numpy()))
    return refs


def _next_token_agreement(gen, refs: list[tuple[list[int], list[int], Any]]) -> dict[str, Any]:
    """llama.cpp's next token after every prefix (teacher-forced) and its free greedy decoding, against PyTorch's."""
    positions = agree = gen_positions = gen_agree = identical = 0
    max_logprob_diff = 0.0
    for ids, new, logprobs in refs:
        full = ids + new
        for k in range(1, len(full)):  # llama.cpp's next token after full[:k]
            got, logprob = _llama_next(gen, full[:k])
            same = got == int(logprobs[k - 1].argmax())
            positions, agree = positions + 1, agree + same
            if k >= len(ids):
                gen_positions, gen_agree = gen_positions + 1, gen_agree + same
            if logprob is not None:
                max_logprob_diff = max(max_logprob_diff, abs(logprob - float(logprobs[k - 1][got])))
        identical += _llama_greedy(gen, ids, len(new)) == new
    return {
        "positions": positions,
        "top1_agreement": agree / max(positions, 1),
        "greedy_agreement": gen_agree / max(gen_positions, 1),
        "greedy_identical": identical,
        "max_abs_logprob_diff": max_logprob_diff,
    }


def _end_ids(tokenizer, model) -> set[int]:
    """Token ids that end generation (EOS, end-of-turn): PyTorch's reference stops after one."""
    ends = {tokenizer.eos_token_id}
    gen_eos = getattr(model.generation_config, "eos_token_id", None)
    ends |= set(gen_eos) if isinstance(gen_eos, list) else {gen_eos}
    vocab = tokenizer.get_vocab()
    ends |= {vocab[t] for t in _END_OF_TURN if t in vocab}
    return {i for i in ends if isinstance(i, int)}


def _chat_texts(tokenizer) -> list[str]:
    """A short conversation rendered by the model's chat template (special tokens included), if it has one."""
    if not getattr(tokenizer, "chat_template", None):
        return []
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What does len do?"},
                {"role": "assistant", "content": "It returns the number of items."}]
    try:
        return [tokenizer.apply_chat_template(messages, tokenize=False)]
    except Exception:  # a template that needs other roles: the plain texts are compared anyway
        return []


def _tokenization_agreement(gen, tokenizer, texts: list[str]) -> dict[str, Any]:
    mismatches = []
    for text in texts:
        for special in (True, False):
            want = list(tokenizer(text, add_special_tokens=special)["input_ids"])
            if gen.tokenize(text, add_special=special) != want:
                mismatches.append(text)
                break
    return {"texts": len(texts), "identical": len(texts) - len(mismatches),
            "agreement": (len(texts) - len(mismatches)) / max(len(texts), 1),
            "mismatches": [t[:80] for t in mismatches[:5]]}


def _llama_steps(gen, ids: list[int], n: int) -> list[dict[str, Any]]:
    """llama.cpp's greedy decoding of up to ``n`` tokens after ``ids`` (token ids: nothing is added; it stops
    at end-of-generation tokens), one ``{id, logprob, ...}`` per token. Greedy with no penalty, whatever
    defaults the file's ``general.sampling.*`` keys hold."""
    body = {"prompt": ids, "max_tokens": n, "n_probs": 1, "temperature": 0.0, "top_k": 0, "top_p": 1.0,
            "min_p": 0.0, "repeat_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0,
            "dry_multiplier": 0.0, "cache_prompt": True}
    result = gen.server.handle_completions(body)
    if "choices" not in result:
        raise ModelError(f"llama.cpp could not decode with {gen.gguf_file}: {str(result.get('error', result))[:300]}")
    return result["choices"][0].get("logprobs", {}).get("content") or []


def _llama_next(gen, ids: list[int]) -> tuple[int, float | None]:
    """llama.cpp's greedy next token after ``ids`` and its log-probability."""
    step = _llama_steps(gen, ids, 1)[0]
    return int(step["id"]), step.get("logprob")


def _llama_greedy(gen, ids: list[int], n: int) -> list[int]:
    return [int(step["id"]) for step in _llama_steps(gen, ids, n)] if n else []
