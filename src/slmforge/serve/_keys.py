"""The API keys file: JSON lines, one key per line, holding a SHA-256 digest and never the key.

    {"name": "alice", "sha256": "9f86...", "created": "2026-11-28T19:50:00Z",
     "requests_per_min": 60, "tokens_per_min": 20000, "quota_tokens": null}

A line that is not JSON is an older plain key (one per line, ``#`` comments) and is accepted,
hashed on reading, named ``key-N`` and given no limits.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from slmforge.errors import ConfigError
from slmforge.serve._hash import hash_api_key

_FIELDS = ("name", "sha256", "created", "requests_per_min", "tokens_per_min", "quota_tokens")


@dataclass(frozen=True)
class ApiKey:
    """One accepted key: its name, digest and optional limits (None: unlimited)."""

    name: str
    sha256: str
    created: str = ""
    requests_per_min: int | None = None
    tokens_per_min: int | None = None
    quota_tokens: int | None = None  # prompt + completion tokens over the server's lifetime


def _lines(file: Path) -> list[str]:
    try:
        return file.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise ConfigError(f"Could not read the API keys file {file}: {exc.strerror or exc}.") from None


def read_keys_file(path: str | Path, allow_empty: bool = False) -> list[ApiKey]:
    """The keys in a keys file (JSON lines, or older plain keys one per line).

    Raises:
        ConfigError: The file is unreadable, has a malformed line or two keys of one name, or (unless
            ``allow_empty``) holds no key.
    """
    file = Path(path).expanduser()
    if not allow_empty and not file.exists():
        raise ConfigError(f"Could not read the API keys file {file}: it does not exist.")
    keys: list[ApiKey] = []
    for number, raw in enumerate(_lines(file), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if not line.startswith("{"):
            keys.append(ApiKey(name=f"key-{len(keys) + 1}", sha256=hash_api_key(line)))
            continue
        try:
            data = json.loads(line)
            unknown = set(data) - set(_FIELDS)
            if unknown:
                raise ValueError(f"unknown fields {sorted(unknown)}")
            key = ApiKey(**data)
            if not key.name or len(key.sha256) != 64:
                raise ValueError("needs a name and a 64-hex-digit sha256")
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{file}, line {number}: not a key record ({exc}).") from None
        keys.append(key)
    names = [k.name for k in keys]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"{file}: two keys are named {', '.join(dupes)}.")
    if not keys and not allow_empty:
        raise ConfigError(f"The API keys file {file} holds no key; add one with `slmforge keys add NAME`.")
    return keys


def _write(file: Path, lines: list[str]) -> None:
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_name(file.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # digests only, still kept private
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in lines))
    os.replace(tmp, file)


def add_key(path: str | Path, name: str, requests_per_min: int | None = None,
            tokens_per_min: int | None = None, quota_tokens: int | None = None) -> str:
    """Create a random key, append its record to the file and return the key (shown once, never stored).

    Raises:
        ConfigError: The name is empty or taken, a limit is below 1, or the file is malformed.
    """
    file = Path(path).expanduser()
    name = name.strip()
    if not name or any(c.isspace() for c in name):
        raise ConfigError(f"Bad key name {name!r}: use a non-empty name without spaces.")
    for label, value in (("--rpm", requests_per_min), ("--tpm", tokens_per_min), ("--quota", quota_tokens)):
        if value is not None and value < 1:
            raise ConfigError(f"{label} must be at least 1 (got {value}); leave it out for no limit.")
    if name in {k.name for k in read_keys_file(file, allow_empty=True)}:
        raise ConfigError(f"A key named {name!r} already exists in {file}; revoke it first or pick another name.")
    key = "sk-" + secrets.token_urlsafe(32)
    record = ApiKey(name=name, sha256=hash_api_key(key),
                    created=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                    requests_per_min=requests_per_min, tokens_per_min=tokens_per_min, quota_tokens=quota_tokens)
    _write(file, [*_lines(file), json.dumps(asdict(record))])
    return key


def revoke_key(path: str | Path, name: str) -> None:
    """Remove the key called ``name`` from the file (other lines, comments included, are kept).

    Raises:
        ConfigError: No key has that name.
    """
    file = Path(path).expanduser()
    read_keys_file(file, allow_empty=True)  # refuse to rewrite a malformed file
    kept, found = [], False
    for raw in _lines(file):
        line = raw.strip()
        if line.startswith("{") and json.loads(line).get("name") == name:
            found = True
            continue
        kept.append(raw)
    if not found:
        raise ConfigError(f"No key named {name!r} in {file} (plain keys without a name: edit the file).")
    _write(file, kept)
