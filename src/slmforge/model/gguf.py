"""Reading a GGUF file's header: architecture, tensor types, parameter count and metadata.

In the model layer because both sides of a GGUF need it: generate/ (the llama.cpp engine
reads the context length and chat template) and export/ (which writes the file and checks
it); ``slmforge.export.gguf`` re-exports both names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slmforge.errors import ModelError

__all__ = ["GgufInfo", "read_gguf_info"]


@dataclass
class GgufInfo:
    """What a GGUF file holds, read back with ``gguf.GGUFReader``."""

    architecture: str
    file_type: int
    tensor_types: dict[str, int]  # GGML type name -> number of tensors
    tensors: int
    params: int
    bytes: int
    metadata: dict[str, Any] = field(default_factory=dict)  # every key except the token arrays

    @property
    def chat_template(self) -> str | None:
        return self.metadata.get("tokenizer.chat_template")


def read_gguf_info(path: str | Path) -> GgufInfo:
    """Architecture, tensor types, parameter count and metadata of a GGUF file.

    Raises:
        ModelError: The file is missing or not a GGUF file.
    """
    import gguf

    file = Path(path).expanduser()
    if not file.is_file():
        raise ModelError(f"GGUF file {file} does not exist.")
    try:
        reader = gguf.GGUFReader(str(file))
    except (ValueError, OSError) as exc:
        raise ModelError(f"{file} is not a readable GGUF file: {exc}") from None
    meta: dict[str, Any] = {}
    for key, f in reader.fields.items():
        if key.startswith("GGUF.") or key in ("tokenizer.ggml.tokens", "tokenizer.ggml.scores",
                                               "tokenizer.ggml.token_type", "tokenizer.ggml.merges"):
            continue
        meta[key] = f.contents()
    counts: dict[str, int] = {}
    params = 0
    for t in reader.tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
        params += int(t.n_elements)
    return GgufInfo(
        architecture=meta.get("general.architecture", "?"),
        file_type=int(meta.get("general.file_type", -1)),
        tensor_types=counts,
        tensors=len(reader.tensors),
        params=params,
        bytes=file.stat().st_size,
        metadata=meta,
    )
