"""Ollama export: a ``Modelfile`` next to a GGUF file, so ``ollama create NAME -f Modelfile`` works.

Ollama does not run the Jinja chat template stored in the GGUF file; it needs a
Go-template ``TEMPLATE``. We translate the one template we know exactly, our
built-in ChatML (``slmforge.tokenizer._chat``), with the tokenizer's own role
markers, and refuse any other template rather than guess.

BOS: Ollama tokenizes the rendered prompt with the GGUF file's
``tokenizer.ggml.add_bos_token`` (true for our tokenizers), so the Go template
leaves BOS out, where our Jinja template writes ``{{ bos_token }}`` itself.
``render_ollama_template`` renders the Go template in Python (Ollama is not
needed) with the same data Ollama passes it; tests check that BOS + its output
is exactly ``tokenizer.apply_chat_template(..., add_generation_prompt=True)``.

One difference stays: Ollama merges consecutive messages of the same role into
one (joined by a blank line) before rendering; transformers renders each.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from slmforge.config import SamplingProfile
from slmforge.errors import ModelError

__all__ = ["ollama_template", "render_ollama_template", "write_modelfile", "ollama_create_command"]

MODELFILE = "Modelfile"

_GO_CHATML = """\
{{- range .Messages }}@START@{{ .Role }}
{{ .Content }}@END@
{{ end }}@START@assistant
"""


def ollama_template(chat_start: str = "<|im_start|>", chat_end: str = "<|im_end|>") -> str:
    """Our ChatML template in Ollama's Go-template syntax (without BOS: Ollama adds it)."""
    return _GO_CHATML.replace("@START@", chat_start).replace("@END@", chat_end)


def render_ollama_template(
    messages: list[dict[str, str]],
    system: str | None = None,
    template: str | None = None,
) -> str:
    """The prompt Ollama would build from a chat, rendered in Python.

    Mirrors Ollama's chat handling: the Modelfile's SYSTEM becomes the first message when the
    conversation has none, consecutive messages of one role are merged, and the template sees
    ``.Messages`` (role, content) and ``.System`` (all system messages joined).

    Args:
        messages: ``[{"role": ..., "content": ...}]``.
        system: The Modelfile's SYSTEM message, if any.
        template: A Go template (default: ``ollama_template()``); the subset ``{{ if }}``,
            ``{{ else }}``, ``{{ range }}``, ``{{ end }}``, ``.Field`` and ``-`` trimming is understood.

    Returns:
        The prompt text, without BOS (Ollama's tokenizer adds it).
    """
    msgs = [dict(m) for m in messages]
    if system and (not msgs or msgs[0].get("role") != "system"):
        msgs.insert(0, {"role": "system", "content": system})
    collated: list[dict[str, str]] = []
    for m in msgs:
        if collated and collated[-1]["role"] == m["role"] and m["role"] != "tool":
            collated[-1]["content"] += "\n\n" + m["content"]
        else:
            collated.append({"role": m["role"], "content": m["content"]})
    data = {
        "System": "\n\n".join(m["content"] for m in msgs if m["role"] == "system"),
        "Messages": [{"Role": m["role"], "Content": m["content"]} for m in collated],
        "Prompt": "",
        "Response": "",
    }
    return _render_go(template if template is not None else ollama_template(), data)


def write_modelfile(
    gguf_file: str | Path,
    out_dir: str | Path,
    template_source_tokenizer_dir: str | Path,
    profile: SamplingProfile,
    system: str | None = None,
) -> Path:
    """Write ``out_dir/Modelfile`` (and ``README.md``) for a GGUF file.

    The GGUF file is copied into ``out_dir`` (hard-linked when possible) unless it is already
    there, so ``FROM ./<file>`` resolves next to the Modelfile.

    Args:
        gguf_file: The model, written by ``export_gguf``.
        out_dir: The folder that will hold the Modelfile.
        template_source_tokenizer_dir: A tokenizer (or model) folder whose chat template is our
            ChatML; its role markers and end-of-sequence token become the TEMPLATE and stop strings.
        profile: Sampling profile written as PARAMETER lines.
        system: The SYSTEM message (none when None).

    Returns:
        The Modelfile's path.

    Raises:
        ModelError: The GGUF file is missing, the chat template is not our ChatML, or a text
            cannot be written in a Modelfile (contains triple quotes).
    """
    source = Path(gguf_file).expanduser()
    if not source.is_file():
        raise ModelError(f"GGUF file {source} does not exist; run `slmforge export gguf` first.")
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    target = out / source.name
    if source.resolve() != target.resolve():
        target.unlink(missing_ok=True)
        try:
            os.link(source, target)
        except OSError:
            shutil.copy2(source, target)

    chat_start, chat_end, eos = _chatml_markers(Path(template_source_tokenizer_dir).expanduser())
    template = ollama_template(chat_start, chat_end)
    lines = [
        f"# Ollama Modelfile written by slmforge for {source.name}.",
        f"# Create the model:  {ollama_create_command('NAME')}",
        f"FROM ./{source.name}",
        "",
        f'TEMPLATE """{_triple_quoted(template, "TEMPLATE")}"""',
        "",
    ]
    stops = list(dict.fromkeys([chat_end, *([eos] if eos else []), *profile.stop]))
    lines += [f"PARAMETER stop {json.dumps(s, ensure_ascii=False)}" for s in stops]
    lines += [f"PARAMETER {key} {value}" for key, value in _parameters(profile)]
    if system:
        lines += ["", f'SYSTEM """{_triple_quoted(system, "SYSTEM")}"""']
    modelfile = out / MODELFILE
    modelfile.write_text("\n".join(lines) + "\n", encoding="utf-8")
    (out / "README.md").write_text(
        f"# {source.stem} for Ollama\n\n"
        f"`{source.name}` with a Modelfile (chat template, stop tokens and sampling parameters).\n\n"
        "In this folder:\n\n"
        "```bash\n"
        f"{ollama_create_command(source.stem)}\n"
        f"ollama run {source.stem}\n"
        "```\n",
        encoding="utf-8",
    )
    return modelfile


def ollama_create_command(name: str, modelfile: str | Path = MODELFILE) -> str:
    """The command that registers the model with Ollama (run in the Modelfile's folder)."""
    return f"ollama create {name} -f {modelfile}"


# --------------------------------------------------------------------------- helpers


def _parameters(profile: SamplingProfile) -> list[tuple[str, str]]:
    """PARAMETER lines: every knob set, so Ollama's defaults (top_k 40, top_p 0.9, repeat 1.1 over 64
    tokens) never stand in for a profile's "off"."""
    params = [
        ("temperature", _number(profile.temperature)),
        ("top_k", str(profile.top_k or 0)),  # 0 = off
        ("top_p", _number(profile.top_p if profile.top_p is not None else 1.0)),
        ("min_p", "0"),
        ("repeat_penalty", _number(profile.repetition_penalty)),
        ("repeat_last_n", "-1"),  # the whole context, as transformers penalises
        ("num_predict", str(profile.max_new_tokens)),
    ]
    if profile.seed is not None:
        params.append(("seed", str(profile.seed)))
    return params


def _number(value: float) -> str:
    return f"{float(value):g}"


def _triple_quoted(text: str, what: str) -> str:
    if '"""' in text:
        raise ModelError(f'The {what} text contains """, which a Modelfile cannot hold; remove it.')
    return text


def _chatml_markers(folder: Path) -> tuple[str, str, str | None]:
    """(chat_start, chat_end, eos) of a tokenizer folder whose template is our ChatML.

    Raises:
        ModelError: No chat template, or one that is not our ChatML.
    """
    from slmforge.tokenizer import chatml_template

    template = None
    if (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    config: dict[str, Any] = {}
    if (folder / "tokenizer_config.json").is_file():
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
        template = template or config.get("chat_template")
    if not isinstance(template, str):
        raise ModelError(f"{folder} has no chat template, so there is nothing to translate into an Ollama TEMPLATE.")
    start = re.search(r'\{\{- ("(?:[^"\\]|\\.)*") \+ \'assistant\\n\' \}\}', template)
    end = re.search(r'\+ ("(?:[^"\\]|\\.)*") \}\}\{% endgeneration %\}', template)
    if start and end:
        chat_start, chat_end = json.loads(start.group(1)), json.loads(end.group(1))
        if chatml_template(chat_start, chat_end) == template:
            eos = config.get("eos_token")
            eos = eos.get("content") if isinstance(eos, dict) else eos
            return chat_start, chat_end, eos if isinstance(eos, str) else None
    raise ModelError(
        f"The chat template in {folder} is not slmforge's built-in ChatML, and only that one is translated "
        "into Ollama's Go-template syntax. Write the Modelfile's TEMPLATE by hand for this template."
    )


# --------------------------------------------------------------------------- a Go-template subset

_ACTION = re.compile(r"\{\{(-\s)?\s*(.*?)\s*(\s-)?\}\}", re.S)


def _render_go(template: str, data: dict[str, Any]) -> str:
    """Render the subset of Go's text/template our templates use: text, ``{{ .A.B }}``, ``{{ $.A }}``,
    ``{{ if X }}``/``{{ else }}``/``{{ end }}``, ``{{ range X }}``/``{{ end }}``, and ``{{-``/``-}}`` trimming."""
    tokens: list[tuple[str, str]] = []  # ("text", s) or ("action", s)
    pos = 0
    for m in _ACTION.finditer(template):
        text = template[pos : m.start()]
        if m.group(1):
            text = text.rstrip(" \t\r\n")
        tokens.append(("text", text))
        tokens.append(("action", m.group(2)))
        pos = m.end()
        if m.group(3):
            rest = template[pos:]
            pos += len(rest) - len(rest.lstrip(" \t\r\n"))
    tokens.append(("text", template[pos:]))
    tree, i = _parse(tokens, 0)
    if i != len(tokens):
        raise ModelError("Unbalanced {{ end }} in the Go template.")
    out: list[str] = []
    _eval(tree, data, data, out)
    return "".join(out)


def _parse(tokens: list[tuple[str, str]], i: int, stop: tuple[str, ...] = ()) -> tuple[list, int]:
    nodes: list = []
    while i < len(tokens):
        kind, value = tokens[i]
        if kind == "text":
            nodes.append(("text", value))
            i += 1
            continue
        word = value.split(maxsplit=1)[0] if value else ""
        if word in stop:
            return nodes, i
        if word in ("if", "range"):
            body, i = _parse(tokens, i + 1, ("else", "end"))
            other: list = []
            if i < len(tokens) and tokens[i][1] == "else":
                other, i = _parse(tokens, i + 1, ("end",))
            if i >= len(tokens) or tokens[i][1] != "end":
                raise ModelError(f"{{{{ {value} }}}} has no {{{{ end }}}} in the Go template.")
            nodes.append((word, value.split(maxsplit=1)[1], body, other))
            i += 1
            continue
        if word in ("else", "end"):
            raise ModelError(f"Unexpected {{{{ {value} }}}} in the Go template.")
        nodes.append(("value", value))
        i += 1
    return nodes, i


def _lookup(expr: str, dot: Any, root: dict[str, Any]) -> Any:
    expr = expr.strip()
    if expr == ".":
        return dot
    base: Any = root if expr.startswith("$.") else dot
    for part in expr.removeprefix("$").strip(".").split("."):
        if not re.fullmatch(r"[A-Za-z_]\w*", part):
            raise ModelError(f"The Go-template subset here does not support {expr!r}.")
        base = base.get(part) if isinstance(base, dict) else None
    return base


def _eval(nodes: list, dot: Any, root: dict[str, Any], out: list[str]) -> None:
    for node in nodes:
        if node[0] == "text":
            out.append(node[1])
        elif node[0] == "value":
            value = _lookup(node[1], dot, root)
            out.append("" if value is None else str(value))
        elif node[0] == "if":
            _eval(node[2] if _lookup(node[1], dot, root) else node[3], dot, root, out)
        else:  # range
            items = _lookup(node[1], dot, root) or []
            if not items:
                _eval(node[3], dot, root, out)
            for item in items:
                _eval(node[2], item, root, out)
