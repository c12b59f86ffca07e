"""Which API key an OpenAI-compatible endpoint gets, and whether it may be sent at all.

One rule for every place that sends a key (the HTTP engine, the data teacher, the
server's upstream proxy), because a key sent to the wrong host is gone for good:

- A key goes only to the endpoint it is configured for: the environment variable
  named by that endpoint's ``api_key_env``. The one default is ``OPENAI_API_KEY``
  for OpenAI's own API (``https://api.openai.com``); no other host receives a key
  nobody named for it.
- Never in clear text across a network: plain ``http://`` to a host other than
  this machine (loopback) needs an explicit ``allow_insecure_http``.

Core module (no slmforge imports beyond errors), so data/, generate/ and serve/ share it.
"""

from __future__ import annotations

import ipaddress
import os
from urllib.parse import urlsplit

from slmforge.errors import ConfigError, SlmForgeError

__all__ = ["OPENAI_HOST", "endpoint_key", "is_loopback"]

OPENAI_HOST = "api.openai.com"


def is_loopback(host: str | None) -> bool:
    """Whether a host name or address is this machine only (``localhost``, 127.0.0.0/8, ``::1``)."""
    host = (host or "").strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def endpoint_key(
    base_url: str,
    api_key_env: str | None = None,
    allow_insecure_http: bool = False,
    api_key: str | None = None,
    where: str = "",
    error: type[SlmForgeError] = ConfigError,
) -> str | None:
    """The key to send to ``base_url``, or None to send none.

    Args:
        base_url: The endpoint, e.g. ``https://api.example.com/v1``.
        api_key_env: The environment variable holding this endpoint's key (never the key itself).
        allow_insecure_http: Allow sending the key over plain http to a host that is not loopback.
        api_key: A key the caller was handed explicitly for this endpoint (wins over ``api_key_env``).
        where: Where the endpoint was configured, for messages (e.g. ``data.synth.teacher``).
        error: The error type to raise (each layer raises its own).

    Returns:
        The explicit key, else the variable ``api_key_env`` names, else ``OPENAI_API_KEY`` when the
        endpoint is ``https://api.openai.com``, else None.

    Raises:
        error: ``api_key_env`` names an unset or empty variable, or a key would travel over plain
            http to a host that is not loopback without ``allow_insecure_http``.
    """
    parts = urlsplit(base_url)
    scheme, host = parts.scheme.lower(), (parts.hostname or "").lower()
    at = f"{where}: " if where else ""
    key = api_key or None
    if key is None and api_key_env:
        key = os.environ.get(api_key_env) or None
        if key is None:
            raise error(f"{at}the key for {_public(base_url)} is read from the environment variable {api_key_env} "
                        f"(api_key_env), which is not set or empty; export {api_key_env}, or drop api_key_env if "
                        "the endpoint needs no key.")
    elif key is None and scheme == "https" and host == OPENAI_HOST:
        key = os.environ.get("OPENAI_API_KEY") or None
    if key is not None and scheme == "http" and not is_loopback(host) and not allow_insecure_http:
        raise error(f"{at}refusing to send an API key in clear text to {_public(base_url)}: plain http to a host "
                    "other than this machine lets anyone on the path read it. Use https, or, if the network is "
                    "trusted, opt in with allow_insecure_http: true for this endpoint.")
    return key


def _public(url: str) -> str:
    """The URL without a user:password part (which must never reach a message)."""
    parts = urlsplit(url)
    if parts.username or parts.password:
        netloc = parts.hostname or ""
        if parts.port:
            netloc += f":{parts.port}"
        return parts._replace(netloc=netloc).geturl()
    return url
