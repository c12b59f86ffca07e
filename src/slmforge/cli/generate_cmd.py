"""`slmforge generate` and `slmforge chat`: text from a model, in the terminal.

Plain functions with typer annotations; ``cli/main.py`` registers them. Model
output goes to stdout untouched (no rich markup or emoji codes); status lines
go to stderr, so `slmforge generate ... > out.txt` captures only the text.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from slmforge.cli._options import ConfigOpt, SetOpt, err

ModelOpt = Annotated[
    str | None,
    typer.Option(
        "--model", "-m",
        help="Model folder, .gguf file or hub id (default: <project.out_dir>/sft if it exists, else .../train).",
    ),
]
ProfileOpt = Annotated[
    str | None,
    typer.Option(
        help="Sampling profile: the model's saved ones, then generate.profiles (default: the model's default)."
    ),
]
AdapterOpt = Annotated[
    Path | None, typer.Option("--adapter", help="A LoRA adapter folder (peft) to apply over the model.")
]
DeviceOpt = Annotated[str, typer.Option(help="auto (CUDA when present), cpu, cuda or cuda:N.")]
MaxNewOpt = Annotated[int | None, typer.Option("--max-new-tokens", min=1, help="Most tokens to generate.")]
TemperatureOpt = Annotated[
    float | None, typer.Option(min=0.0, help="0 = greedy; higher = more random (overrides the profile).")
]
TopKOpt = Annotated[int | None, typer.Option("--top-k", min=1, help="Sample from the k most likely tokens.")]
TopPOpt = Annotated[
    float | None, typer.Option("--top-p", min=0.0, max=1.0, help="Nucleus sampling: smallest set with this mass.")
]
BeamsOpt = Annotated[int | None, typer.Option("--beams", min=1, help="Beam search width (1 = off).")]
RepPenaltyOpt = Annotated[
    float | None, typer.Option("--repetition-penalty", min=0.0, help="> 1 discourages repeating tokens.")
]
StopOpt = Annotated[
    list[str] | None, typer.Option("--stop", help="Stop at this string, not included (repeatable).")
]
SeedOpt = Annotated[int | None, typer.Option(help="Seed for sampling, for reproducible output.")]


def _prepare(config, set_, model, profile, **overrides):
    """The model reference, the sampling parameters and the endpoints' key settings; fails before any model loads."""
    from slmforge.config import load_config
    from slmforge.generate import SamplingParams, default_model_dir, resolve_profile

    cfg = load_config(config, set_ or [])
    model_ref = model or str(default_model_dir(cfg))
    params = SamplingParams.from_profile(resolve_profile(profile, model_ref, cfg.generate), **overrides)
    params.validate()
    return model_ref, params, cfg.generate.endpoints


def load_model(model_ref: str, adapter: Path | None, device: str, endpoints=None):
    from transformers.utils import logging as hf_logging

    from slmforge.generate import engine_for, load_generator

    hf_logging.disable_progress_bar()  # a weights bar for a model that loads in a second is noise
    adapters = {adapter.name or "adapter": adapter} if adapter else None
    t0 = time.perf_counter()
    gen = load_generator(model_ref, adapters=adapters, device=device, endpoints=endpoints)
    err.print(f"model {model_ref}" + (f" + adapter {adapter}" if adapter else "")
              + f" ({engine_for(model_ref)}, {getattr(gen, 'device', 'cpu')}, {time.perf_counter() - t0:.1f} s)",
              style="dim")
    return gen


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def generate(
    prompt: Annotated[str, typer.Argument(help="The prompt (with --chat: the user's message); - reads stdin.")],
    model: ModelOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    profile: ProfileOpt = None,
    max_new_tokens: MaxNewOpt = None,
    temperature: TemperatureOpt = None,
    top_k: TopKOpt = None,
    top_p: TopPOpt = None,
    beams: BeamsOpt = None,
    repetition_penalty: RepPenaltyOpt = None,
    stop: StopOpt = None,
    seed: SeedOpt = None,
    n: Annotated[int, typer.Option("-n", "--num-samples", min=1, help="Completions to return.")] = 1,
    chat: Annotated[
        bool, typer.Option("--chat", help="Send the prompt as one user message through the chat template.")
    ] = False,
    stream: Annotated[bool, typer.Option("--stream", help="Print the text as it is produced (n=1, no beams).")] = False,
    system: Annotated[str | None, typer.Option(help="With --chat: a system message put first.")] = None,
    adapter: AdapterOpt = None,
    device: DeviceOpt = "auto",
) -> None:
    """Complete a prompt with a model: greedy, sampling or beam search, with a named profile and overrides."""
    if prompt == "-":
        prompt = sys.stdin.read()
    if system is not None and not chat:
        raise typer.BadParameter("--system needs --chat", param_hint="--system")
    if stream and n > 1:
        raise typer.BadParameter("--stream prints one completion; drop -n or --stream", param_hint="--stream")
    model_ref, params, endpoints = _prepare(
        config, set_, model, profile, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
        top_p=top_p, num_beams=beams, repetition_penalty=repetition_penalty, stop=stop, seed=seed, n=n,
    )
    if stream and params.num_beams > 1:
        raise typer.BadParameter("beam search cannot stream; drop --stream or use --beams 1", param_hint="--stream")
    gen = load_model(model_ref, adapter, device, endpoints)
    request = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    t0 = time.perf_counter()
    if stream:
        for piece in gen.stream(request if chat else prompt, params):
            _write(piece)
        _write("\n")
        err.print(f"[{time.perf_counter() - t0:.1f} s]", style="dim")
        return
    completions = gen.chat(request, params) if chat else gen.complete(prompt, params)
    seconds = time.perf_counter() - t0
    for i, c in enumerate(completions):
        if len(completions) > 1:
            _write(f"{'' if i == 0 else chr(10)}--- sample {i + 1}/{len(completions)} "
                   f"({c.tokens} tokens, {c.finish_reason}) ---\n")
        _write(c.text + "\n")
    tokens = sum(c.tokens for c in completions)
    err.print(
        f"[{tokens} tokens in {seconds:.2f} s, {tokens / max(seconds, 1e-9):.1f} tokens/s; "
        f"finish: {', '.join(c.finish_reason for c in completions)}]",
        style="dim",
    )


def chat(
    model: ModelOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    profile: ProfileOpt = None,
    system: Annotated[str | None, typer.Option(help="A system message put first in the conversation.")] = None,
    adapter: AdapterOpt = None,
    max_new_tokens: MaxNewOpt = None,
    temperature: TemperatureOpt = None,
    top_k: TopKOpt = None,
    top_p: TopPOpt = None,
    beams: BeamsOpt = None,
    repetition_penalty: RepPenaltyOpt = None,
    stop: StopOpt = None,
    seed: SeedOpt = None,
    device: DeviceOpt = "auto",
) -> None:
    """Chat with a model in the terminal, answers streamed; /reset clears the history, /exit or Ctrl-D quits.

    Reads one message per line from stdin, so it also works in a pipe: printf 'hi\\n/exit\\n' | slmforge chat
    """
    model_ref, params, endpoints = _prepare(
        config, set_, model, profile, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
        top_p=top_p, num_beams=beams, repetition_penalty=repetition_penalty, stop=stop, seed=seed,
    )
    gen = load_model(model_ref, adapter, device, endpoints)
    gen.render_chat([{"role": "user", "content": "hi"}])  # no chat template: fail now, not after the first message
    start = [{"role": "system", "content": system}] if system else []
    history = list(start)
    interactive = sys.stdin.isatty()
    if interactive:
        err.print("Type a message and press Enter. /reset clears the history; /exit or Ctrl-D quits.", style="dim")
    while True:
        try:
            line = input("> ") if interactive else sys.stdin.readline()
        except (EOFError, KeyboardInterrupt):
            break
        if not interactive and line == "":
            break  # end of input
        message = line.strip()
        if not message:
            continue
        if message in ("/exit", "/quit"):
            break
        if message == "/reset":
            history = list(start)
            err.print("(history cleared)", style="dim")
            continue
        history.append({"role": "user", "content": message})
        try:
            if params.num_beams > 1:  # beams cannot stream: print the best one when it is done
                answer = gen.chat(history, params)[0].text
                _write(answer)
            else:
                pieces = []
                it = gen.stream(history, params)
                try:
                    for piece in it:
                        pieces.append(piece)
                        _write(piece)
                finally:
                    getattr(it, "close", lambda: None)()  # stops the generation thread at once on Ctrl-C
                answer = "".join(pieces)
        except KeyboardInterrupt:  # Ctrl-C stops this answer, not the chat
            history.pop()
            _write("\n")
            err.print("(interrupted; that message was dropped from the history)", style="dim")
            continue
        _write("\n")
        history.append({"role": "assistant", "content": answer})
