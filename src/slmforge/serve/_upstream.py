"""Forwarding to another OpenAI-compatible server: the ``openai`` (proxy) and ``vllm`` engines.

    up = upstream_from_config(model_cfg)                 # engine: openai
    reply = await up.post("/chat/completions", body)     # body["model"] becomes the upstream name
    events = await up.stream("/chat/completions", body)  # raises UpstreamError before the first byte
    async for event in events: ...                       # one whole SSE event per item; events.usage at the end

    server = VllmServer(model_cfg, resolve=cfg.resolve)  # engine: vllm
    up = server.start()                                  # spawns `vllm serve` on 127.0.0.1, waits for /health
    ...
    await up.aclose(); server.stop()                     # SIGTERM, then SIGKILL after a grace period

Our server keeps its own keys, limits, usage and metrics; the upstream only sees this server's
own key (never the client's), and its answers go back with ``model`` renamed to the served name.
Errors of every kind become an ``UpstreamError`` carrying an OpenAI error body; the upstream key
never appears in one.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import httpx

from slmforge.endpoints import endpoint_key, is_loopback
from slmforge.errors import ConfigError, SlmForgeError
from slmforge.serve._vllm import VLLM_ENV, VllmServer

if TYPE_CHECKING:
    from slmforge.config import ServeModelConfig

__all__ = ["Upstream", "UpstreamError", "UpstreamStream", "VllmServer", "upstream_from_config", "VLLM_ENV"]
# The vllm engine's process management lives in the private _vllm (VllmServer, VLLM_ENV re-exported here).


# --------------------------------------------------------------------------- errors


class UpstreamError(SlmForgeError):
    """The upstream server failed, refused, or could not be reached; carries an OpenAI error body.

    Attributes:
        status: The HTTP status to answer the client with.
        message, type, param, code: The fields of OpenAI's ``{"error": {...}}`` body.
        headers: Headers worth passing on (``Retry-After``), or None.
    """

    def __init__(self, status: int, body_or_message: dict[str, Any] | str,
                 headers: dict[str, str] | None = None) -> None:
        if isinstance(body_or_message, dict):
            inner = body_or_message.get("error", body_or_message)
            error: dict[str, Any] = inner if isinstance(inner, dict) else {"message": str(inner)}
        else:
            error = {"message": body_or_message}
        message = str(error.get("message") or "") or f"The upstream server answered HTTP {status} without a message."
        default_type = "invalid_request_error" if 400 <= status < 500 else "server_error"
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = str(error.get("type") or default_type)
        self.param = error.get("param") if isinstance(error.get("param"), str) else None
        code = error.get("code")
        self.code = str(code) if code is not None else None
        self.headers = headers

    @property
    def body(self) -> dict[str, Any]:
        """OpenAI's error body: ``{"error": {"message", "type", "param", "code"}}``."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _public_url(url: str) -> str:
    """The URL without user info, query or fragment: safe to put in an error message."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def _error_fields(content: bytes) -> dict[str, Any] | str:
    """The error of an upstream body: OpenAI's ``error`` object, FastAPI's ``detail``, or some text."""
    try:
        data = json.loads(content)
    except ValueError:
        text = content.decode("utf-8", errors="replace").strip()
        return " ".join(text.split())[:300]
    if isinstance(data, dict):
        if isinstance(data.get("error"), dict):
            return data["error"]
        for key in ("error", "detail", "message"):
            if data.get(key):
                value = data[key]
                return {"message": value if isinstance(value, str) else json.dumps(value)[:300]}
    return json.dumps(data)[:300]


# --------------------------------------------------------------------------- the client


class Upstream:
    """An OpenAI-compatible server this one forwards requests to.

    Args:
        base_url: The upstream's API root, e.g. ``https://api.example.com/v1``; request paths are
            relative to it (``/chat/completions``; a leading ``/v1`` is dropped when the root ends in it).
        upstream_model: The ``model`` sent upstream in place of the client's.
        api_key: Sent as ``Authorization: Bearer``; never put in an error message.
        timeout_s: Seconds to wait for the upstream's answer (for a stream: between two events).
        served_model: When given, the ``model`` field of answers (and of each streamed chunk) is
            renamed to it, so clients see the name they asked for.
        connect_timeout_s: Seconds to wait for a connection.
        allow_insecure_http: Allow sending ``api_key`` over plain http to a host that is not loopback.

    Use one instance within one event loop (its connection pool belongs to that loop).

    Raises:
        ConfigError: The base URL is not an http(s) URL, or the key would go over plain http to another
            machine without ``allow_insecure_http``.
    """

    def __init__(self, base_url: str, upstream_model: str, api_key: str | None = None, timeout_s: float = 600.0,
                 served_model: str | None = None, connect_timeout_s: float = 10.0,
                 allow_insecure_http: bool = False) -> None:
        if urlsplit(base_url).scheme not in ("http", "https") or not urlsplit(base_url).hostname:
            raise ConfigError(f"The upstream URL {_public_url(base_url)!r} is not an http(s) URL; give one like "
                              f"https://api.example.com/v1.")
        if api_key:
            endpoint_key(base_url, api_key=api_key, allow_insecure_http=allow_insecure_http)  # the clear-text rule
        self.base_url = base_url.rstrip("/")
        self.upstream_model = upstream_model
        self.served_model = served_model
        self.timeout_s = timeout_s
        self._api_key = api_key or None
        self._public = _public_url(self.base_url)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        loopback = is_loopback(urlsplit(base_url).hostname)
        self._client = httpx.AsyncClient(
            headers=headers,
            timeout=httpx.Timeout(timeout_s, connect=min(connect_timeout_s, timeout_s)),
            # Our own limits bound the concurrency; httpx's default pool of 100 would queue streams.
            limits=httpx.Limits(max_connections=1000, max_keepalive_connections=100),
            trust_env=not loopback,  # a local vLLM must not be reached through HTTP(S)_PROXY
        )

    def __repr__(self) -> str:
        return f"Upstream({self._public!r}, model={self.upstream_model!r})"

    # ------------------------------------------------------------------ requests

    async def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST a JSON body (non-streaming) and return the upstream's JSON answer.

        The ``usage`` block is returned unchanged; ``model`` is renamed to ``served_model``.

        Raises:
            UpstreamError: An error status, a non-JSON answer, no connection (502) or no answer in time (504).
        """
        url = self._url(path)
        try:
            response = await self._client.post(url, json=self._outgoing(body))
        except httpx.HTTPError as exc:
            raise self._transport_error(exc, url) from None
        if response.status_code >= 400:
            raise self._status_error(response.status_code, response.content, response.headers, url)
        try:
            data = response.json()
        except ValueError:
            raise UpstreamError(502, self._redact(f"The upstream {_public_url(url)} answered HTTP "
                                                  f"{response.status_code} with a body that is not JSON.")) from None
        if not isinstance(data, dict):
            raise UpstreamError(502, f"The upstream {_public_url(url)} answered JSON that is not an object.")
        return self._rename(data)

    async def stream(self, path: str, body: dict[str, Any], meter_usage: bool = True) -> UpstreamStream:
        """POST a streaming request; return its server-sent events once the upstream accepted it.

        Await this before starting the response: an upstream error raises here, before any byte
        went to the client. The returned iterator yields whole SSE events as bytes, ending with
        ``data: [DONE]``; an upstream that breaks off mid-stream ends it with an error event.

        Args:
            path: E.g. ``/chat/completions``.
            body: The client's request; ``model`` is replaced and ``stream`` set.
            meter_usage: Ask the upstream for its final usage chunk (``stream_options.include_usage``)
                whatever the client asked, and keep it in ``UpstreamStream.usage``. The usage chunk is
                passed on only when the client asked for it.

        Raises:
            UpstreamError: As ``post``.
        """
        url = self._url(path)
        payload = self._outgoing(body)
        payload["stream"] = True
        client_options = body.get("stream_options") if isinstance(body.get("stream_options"), dict) else {}
        client_wants_usage = bool(client_options.get("include_usage"))
        if meter_usage:
            payload["stream_options"] = {**client_options, "include_usage": True}
        request = self._client.build_request("POST", url, json=payload, headers={"Accept": "text/event-stream"})
        try:
            response = await self._client.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise self._transport_error(exc, url) from None
        try:
            if response.status_code >= 400:
                content = await response.aread()
                raise self._status_error(response.status_code, content, response.headers, url)
            if not response.headers.get("content-type", "").startswith("text/event-stream"):
                raise UpstreamError(502, f"The upstream {_public_url(url)} did not stream: it answered "
                                    f"{response.headers.get('content-type') or 'no content type'} instead of "
                                    f"text/event-stream.")
        except httpx.HTTPError as exc:
            await response.aclose()
            raise self._transport_error(exc, url) from None
        except BaseException:
            await response.aclose()
            raise
        return UpstreamStream(response, self, url, pass_usage=client_wants_usage or not meter_usage)

    async def models(self) -> list[str]:
        """The model ids the upstream lists at ``/models``.

        Raises:
            UpstreamError: As ``post``, or a body without a ``data`` list.
        """
        url = self._url("/models")
        try:
            response = await self._client.get(url)
        except httpx.HTTPError as exc:
            raise self._transport_error(exc, url) from None
        if response.status_code >= 400:
            raise self._status_error(response.status_code, response.content, response.headers, url)
        try:
            return [str(m["id"]) for m in response.json()["data"]]
        except (ValueError, KeyError, TypeError):
            raise UpstreamError(502, f"The upstream {_public_url(url)} answered a model list without "
                                f"data[].id.") from None

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._client.aclose()

    async def __aenter__(self) -> Upstream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # ------------------------------------------------------------------ helpers

    def _url(self, path: str) -> str:
        path = "/" + path.lstrip("/")
        if self.base_url.endswith("/v1") and (path == "/v1" or path.startswith("/v1/")):
            path = path[3:]
        return self.base_url + path

    def _outgoing(self, body: dict[str, Any]) -> dict[str, Any]:
        return {**body, "model": self.upstream_model}

    def _rename(self, data: dict[str, Any]) -> dict[str, Any]:
        if self.served_model is not None and "model" in data:
            data["model"] = self.served_model
        return data

    def _redact(self, text: str) -> str:
        return text.replace(self._api_key, "***") if self._api_key else text

    def _transport_error(self, exc: httpx.HTTPError, url: str) -> UpstreamError:
        where = _public_url(url)
        if isinstance(exc, httpx.TimeoutException):
            kind = "connect to" if isinstance(exc, httpx.ConnectTimeout) else "get an answer from"
            limit = self._client.timeout.connect if isinstance(exc, httpx.ConnectTimeout) else self.timeout_s
            return UpstreamError(504, {"message": f"Could not {kind} the upstream {where} within {limit:g} s.",
                                       "type": "timeout_error", "code": "upstream_timeout"})
        reason = self._redact(str(exc).strip() or type(exc).__name__)
        return UpstreamError(502, {"message": f"Could not reach the upstream {where}: {reason}.",
                                   "type": "server_error", "code": "upstream_unreachable"})

    def _status_error(self, status: int, content: bytes, headers: httpx.Headers, url: str) -> UpstreamError:
        where = _public_url(url)
        fields = _error_fields(content)
        if isinstance(fields, str):
            fields = {"message": fields}
        fields = {**fields, "message": self._redact(str(fields.get("message") or ""))}
        passed = {k: headers[k] for k in ("retry-after",) if k in headers}
        if status in (401, 403, 407):
            # The upstream refused *this server's* key: a 401 to the client would blame theirs.
            return UpstreamError(502, {"message": f"The upstream {where} refused this server's credentials "
                                       f"(HTTP {status}: {fields['message'] or 'no message'}); check the upstream "
                                       f"API key configured for this model.", "type": "server_error",
                                       "code": "upstream_auth_failed"})
        if status < 500:
            return UpstreamError(status, fields, passed or None)
        if status in (503, 504):
            return UpstreamError(status, {"message": f"The upstream {where} answered HTTP {status}: "
                                          f"{fields['message'] or 'no message'}", "type": "server_error",
                                          "code": "upstream_unavailable" if status == 503 else "upstream_timeout"},
                                 passed or None)
        return UpstreamError(502, {"message": f"The upstream {where} failed with HTTP {status}: "
                                   f"{fields['message'] or 'no message'}", "type": "server_error",
                                   "code": "upstream_error"})


class UpstreamStream:
    """The server-sent events of one upstream stream: ``async for event in stream`` (bytes).

    Each item is one whole event (``data: {...}\\n\\n``) with ``model`` renamed to the served name,
    the last one ``data: [DONE]\\n\\n`` (added after an error event when the upstream broke off or
    ended before its reply was finished). Close it (``aclose``) when the client goes away.

    Attributes:
        usage: The last ``usage`` block the upstream sent (its final usage chunk), or None.
        done: Whether the upstream ended with ``data: [DONE]``.
    """

    def __init__(self, response: httpx.Response, upstream: Upstream, url: str, pass_usage: bool) -> None:
        self._response, self._upstream, self._url, self._pass_usage = response, upstream, url, pass_usage
        self.usage: dict[str, Any] | None = None
        self.done = False
        self._finished = False
        self._events = self._generate()

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._events

    async def aclose(self) -> None:
        """Stop reading and release the upstream connection (which cancels the upstream's generation)."""
        await self._events.aclose()
        await self._response.aclose()

    async def _generate(self) -> AsyncIterator[bytes]:
        lines: list[str] = []
        try:
            async for line in self._response.aiter_lines():
                if line:
                    lines.append(line)
                    continue
                if lines:
                    event = self._event(lines)
                    lines = []
                    if event is not None:
                        yield event
            if lines:  # a last event without its blank line
                event = self._event(lines)
                if event is not None:
                    yield event
            if not self.done:
                if not self._finished:
                    yield self._error_event({"message": f"The upstream {_public_url(self._url)} ended the stream "
                                             f"before its reply was finished.", "type": "server_error",
                                             "code": "upstream_error"})
                yield b"data: [DONE]\n\n"
        except httpx.HTTPError as exc:
            error = self._upstream._transport_error(exc, self._url)
            yield self._error_event({**error.body["error"], "message": "The stream broke off: " + error.message})
            yield b"data: [DONE]\n\n"
        finally:
            await self._response.aclose()

    @staticmethod
    def _error_event(error: dict[str, Any]) -> bytes:
        body = {"message": error.get("message"), "type": error.get("type"), "param": None, "code": error.get("code")}
        return f"data: {json.dumps({'error': body}, ensure_ascii=False)}\n\n".encode()

    def _event(self, lines: list[str]) -> bytes | None:
        data_lines = [ln[5:].removeprefix(" ") for ln in lines if ln.startswith("data:")]
        other = [ln for ln in lines if not ln.startswith("data:")]
        if not data_lines:
            return ("\n".join(other) + "\n\n").encode()  # comments (keep-alives), bare event: or id: fields
        data = "\n".join(data_lines)
        if data.strip() == "[DONE]":
            self.done = True
            return b"data: [DONE]\n\n"
        try:
            chunk = json.loads(data)
        except ValueError:
            chunk = None
        if isinstance(chunk, dict):
            if chunk.get("usage"):
                self.usage = chunk["usage"]
            choices = chunk.get("choices")
            if "error" in chunk or (isinstance(choices, list) and any(
                    isinstance(c, dict) and c.get("finish_reason") for c in choices)):
                self._finished = True  # the reply (or an error event) is complete: no [DONE] is no loss
            if not self._pass_usage and "usage" in chunk:
                if chunk.get("choices") == []:
                    return None  # the usage-only chunk the client did not ask for
                del chunk["usage"]
            if "error" in chunk and isinstance(chunk["error"], dict) and chunk["error"].get("message"):
                chunk["error"]["message"] = self._upstream._redact(str(chunk["error"]["message"]))
            self._upstream._rename(chunk)
            data = json.dumps(chunk, ensure_ascii=False)
        head = "".join(ln + "\n" for ln in other)
        return f"{head}data: {data}\n\n".encode()


def upstream_from_config(model_cfg: ServeModelConfig, timeout_s: float = 600.0) -> Upstream:
    """The upstream of an ``engine: openai`` model of ``serve.models``.

    Args:
        model_cfg: The model's entry: ``base_url``, ``upstream_model`` (default: ``name``),
            ``api_key_env`` (the environment variable holding the upstream key; null = no key, except
            ``OPENAI_API_KEY`` for ``https://api.openai.com``) and ``allow_insecure_http``.
        timeout_s: Seconds to wait for the upstream's answer.

    Raises:
        ConfigError: Not an openai model, no base_url, api_key_env names an unset variable, or the key
            would go over plain http to another machine without allow_insecure_http.
    """
    where = f"serve.models: model {model_cfg.name!r}"
    if model_cfg.engine != "openai":
        raise ConfigError(f"{where} has engine {model_cfg.engine}, not openai; only openai models forward to a "
                          f"base_url.")
    if not model_cfg.base_url:
        raise ConfigError(f"{where} has engine openai but no base_url; set base_url to the upstream endpoint, "
                          f"e.g. https://api.example.com/v1.")
    api_key = endpoint_key(model_cfg.base_url, model_cfg.api_key_env, model_cfg.allow_insecure_http, where=where)
    try:
        return Upstream(model_cfg.base_url, model_cfg.upstream_model or model_cfg.name, api_key=api_key,
                        timeout_s=timeout_s, served_model=model_cfg.name,
                        allow_insecure_http=model_cfg.allow_insecure_http)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
