"""API key digests, shared by the public API and the app (kept apart so neither imports the other's deps)."""

from __future__ import annotations

import hashlib


def hash_api_key(key: str) -> str:
    """The SHA-256 hex digest of a key: the server keeps and compares only digests."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()
