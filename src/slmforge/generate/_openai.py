"""The HTTP engine: ``Generator`` over any OpenAI-compatible endpoint.

    gen = load_generator("http://127.0.0.1:8000/v1#sft")          # a model `slmforge serve` serves
    gen = load_generator("https://api.openai.com/v1#gpt-4o-mini")  # key from OPENAI_API_KEY
    gen = load_generator("https://api.example.com/v1#m", endpoints=[EndpointConfig(
        base_url="https://api.example.com/v1", api_key_env="EXAMPLE_KEY")])

With it, ``slmforge eval``, ``eval compare``, ``generate`` and ``chat`` run against a served model, a
vLLM server or the paid API a domain model should replace — the same suites, side by side. The model
name follows ``#``; without it the endpoint's first model is used. Batches are sent as concurrent requests.

Keys (``slmforge.endpoints``): an endpoint gets only the key named for it (``generate.endpoints`` in the
project file: ``base_url`` + ``api_key_env``); OpenAI's own API gets ``OPENAI_API_KEY`` by default; a key
never travels over plain http to another machine unless that endpoint sets ``allow_insecure_http``.

Only OpenAI's own fields are sent, plus ``top_k``/``repetition_penalty``/``ignore_eos`` when a request
sets them away from their defaults (slmforge and vLLM servers accept them; OpenAI refuses them with a
400, which is reported).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from slmforge.endpoints import endpoint_key
from slmforge.errors import GenerateError
from slmforge.generate import Capabilities, Completion, EngineBase, Message, SamplingParams


class OpenAIGenerator(EngineBase):
    """``Generator`` over an OpenAI-compatible HTTP endpoint. Of the engine contract it keeps the
    defaults: no local tokenizer (``count_tokens`` is 0), chats rendered by the endpoint, no context
    window known here, and no capabilities (the endpoint's own are out of sight).

    Args:
        base_url: The API root, e.g. ``http://127.0.0.1:8000/v1`` (``/v1`` is added when missing).
        model: The model name; None asks the endpoint for its first model.
        api_key: Sent as a bearer token (a key handed over for this endpoint).
        api_key_env: The environment variable holding this endpoint's key. Without either, no key is
            sent, except ``OPENAI_API_KEY`` to ``https://api.openai.com``.
        allow_insecure_http: Allow sending the key over plain http to a host that is not loopback.
        timeout_s: Seconds one request may take.
        concurrency: Requests in flight at once for batches and n > 1.

    Raises:
        GenerateError: The endpoint cannot be reached, refuses the key, or serves no such model; or the
            key would go over plain http to another machine without ``allow_insecure_http``.
    """

    engine = "openai"
    capabilities = Capabilities(tools=True)

    def __init__(self, base_url: str, model: str | None = None, api_key: str | None = None, timeout_s: float = 600.0,
                 concurrency: int = 8, api_key_env: str | None = None, allow_insecure_http: bool = False) -> None:
        import httpx

        root = base_url.rstrip("/")
        self.base_url = root if root.endswith("/v1") else root + "/v1"
        key = endpoint_key(self.base_url, api_key_env, allow_insecure_http, api_key=api_key, error=GenerateError)
        self._sends_key = key is not None
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.client = httpx.Client(base_url=self.base_url, headers=headers, timeout=httpx.Timeout(timeout_s, connect=10),
                                   limits=httpx.Limits(max_connections=concurrency + 2))
        self.concurrency = concurrency
        models = self._models()
        if model is None:
            if not models:
                raise GenerateError(f"{self.base_url} lists no models; name one: {self.base_url}#MODEL.")
            model = models[0]
        elif models and model not in models:
            raise GenerateError(f"{self.base_url} has no model {model!r}; it serves: {', '.join(models[:20])}.")
        self.model = model

    @classmethod
    def from_ref(cls, ref: str, endpoints: Sequence[Any] = ()) -> OpenAIGenerator:
        """``URL#MODEL`` (or a bare URL: the endpoint's first model).

        Args:
            ref: The model reference.
            endpoints: ``EndpointConfig`` entries (``generate.endpoints``); the one whose ``base_url`` is
                this URL says which key it gets and whether plain http is allowed.
        """
        url, _, model = str(ref).partition("#")
        entry = next((e for e in endpoints if _same_endpoint(e.base_url, url)), None)
        if entry is None:
            return cls(url, model or None)
        return cls(url, model or None, api_key_env=entry.api_key_env, allow_insecure_http=entry.allow_insecure_http)

    # ------------------------------------------------------------------ Generator

    def complete(self, prompt: str, params: SamplingParams) -> list[Completion]:
        params.validate()
        return self._choices(self._post("/completions", {"prompt": prompt, **self._body(params)}), chat=False)

    def chat(self, messages: list[Message], params: SamplingParams) -> list[Completion]:
        params.validate()
        return self._choices(self._post("/chat/completions", {"messages": messages, **self._body(params)}), chat=True)

    def chat_tools(self, messages: list[dict[str, Any]], params: SamplingParams, tools: list[dict[str, Any]],
                   tool_choice: Any = "auto") -> list[Completion]:
        """``params.n`` replies from the endpoint's own function calling: ``messages`` are OpenAI messages
        (assistant ``tool_calls``, ``tool`` results), ``tools`` OpenAI tools. A reply that calls tools
        carries them in ``tool_calls`` as ``{"name", "arguments"}`` (arguments parsed from their JSON
        string where they parse; the string itself where not, for the caller to reject)."""
        params.validate()
        body = {"messages": messages, **self._body(params), "tools": tools, "tool_choice": tool_choice}
        return self._choices(self._post("/chat/completions", body), chat=True)

    def complete_batch(self, prompts: list[str], params: SamplingParams) -> list[list[Completion]]:
        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(lambda p: self.complete(p, params), prompts))

    def chat_batch(self, conversations: list[list[Message]], params: SamplingParams) -> list[list[Completion]]:
        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(lambda c: self.chat(c, params), conversations))

    def stream(self, prompt: str | list[Message], params: SamplingParams) -> Iterator[str]:
        params.validate()
        if params.n != 1:
            raise GenerateError(f"Streaming returns one sequence, so it needs n=1 (got n={params.n}).")
        chat = not isinstance(prompt, str)
        body = {("messages" if chat else "prompt"): prompt, **self._body(params), "stream": True}
        return self._stream("/chat/completions" if chat else "/completions", body, chat)

    def close(self) -> None:
        self.client.close()

    # ------------------------------------------------------------------ helpers

    def _body(self, params: SamplingParams) -> dict[str, Any]:
        if params.num_beams != 1:
            raise GenerateError("Beam search is not part of the OpenAI API; set num_beams to 1 for an HTTP endpoint.")
        body: dict[str, Any] = {"model": self.model, "max_tokens": params.max_new_tokens,
                                "temperature": params.temperature, "n": params.n}
        if params.top_p is not None:
            body["top_p"] = params.top_p
        if params.stop:
            body["stop"] = list(params.stop)[:4]
        if params.seed is not None:
            body["seed"] = params.seed
        if params.top_k is not None:
            body["top_k"] = params.top_k
        if params.repetition_penalty != 1.0:
            body["repetition_penalty"] = params.repetition_penalty
        if params.ignore_eos:
            body["ignore_eos"] = True
        return body

    def _models(self) -> list[str]:
        import httpx

        try:
            r = self.client.get("/models")
        except httpx.HTTPError as exc:
            raise GenerateError(f"Could not reach {self.base_url}: {type(exc).__name__}: {exc}.") from None
        if r.status_code in (401, 403):
            if not self._sends_key:
                raise GenerateError(f"{self.base_url} wants an API key ({r.status_code}) and none was sent: a key "
                                    "goes only to the endpoint it is named for. Add this endpoint to the project "
                                    "file, generate.endpoints: [{base_url: " + self.base_url + ", api_key_env: "
                                    "NAME_OF_THE_VARIABLE}] (or --set generate.endpoints=...).")
            raise GenerateError(f"{self.base_url} refused the API key ({r.status_code}); check the variable "
                                "that holds this endpoint's key.")
        if r.status_code != 200:
            return []  # some servers have no /models; the name given is then trusted
        return [m.get("id") for m in r.json().get("data", []) if m.get("id")]

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        import httpx

        try:
            r = self.client.post(path, json=body)
        except httpx.HTTPError as exc:
            raise GenerateError(f"{self.base_url}{path} failed: {type(exc).__name__}: {exc}.") from None
        if r.status_code != 200:
            raise GenerateError(f"{self.base_url}{path} answered {r.status_code}: {_error_message(r)}")
        return r.json()

    def _choices(self, answer: dict[str, Any], chat: bool) -> list[Completion]:
        choices = sorted(answer.get("choices", []), key=lambda c: c.get("index", 0))
        usage = answer.get("usage") or {}
        # The endpoint counts the choices' tokens together: share them out whole, so that they sum back to it.
        per, extra = divmod(int(usage.get("completion_tokens") or 0), max(len(choices), 1))
        out = []
        for i, c in enumerate(choices):
            text = ((c.get("message") or {}).get("content") or "") if chat else c.get("text", "")
            calls = _tool_calls((c.get("message") or {}).get("tool_calls")) if chat else None
            finish = "length" if c.get("finish_reason") == "length" else "stop"
            out.append(Completion(text=text, tokens=per + (i < extra), finish_reason=finish, tool_calls=calls))
        return out

    def _stream(self, path: str, body: dict[str, Any], chat: bool) -> Iterator[str]:
        import httpx

        try:
            with self.client.stream("POST", path, json=body) as r:
                if r.status_code != 200:
                    r.read()
                    raise GenerateError(f"{self.base_url}{path} answered {r.status_code}: {_error_message(r)}")
                for line in r.iter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        return
                    payload = json.loads(data)
                    if "error" in payload:
                        raise GenerateError(f"{self.base_url}{path}: {payload['error'].get('message')}")
                    for c in payload.get("choices") or []:
                        piece = (c.get("delta") or {}).get("content") if chat else c.get("text")
                        if piece:
                            yield piece
        except httpx.HTTPError as exc:
            raise GenerateError(f"{self.base_url}{path} failed: {type(exc).__name__}: {exc}.") from None


def _tool_calls(raw: Any) -> list[dict[str, Any]] | None:
    """OpenAI ``message.tool_calls`` as ``[{"name", "arguments"}]`` (None when there are none)."""
    if not raw:
        return None
    calls = []
    for call in raw:
        fn = call.get("function") or {} if isinstance(call, dict) else {}
        args: Any = fn.get("arguments", "{}")
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except json.JSONDecodeError:
                pass  # left a string: the caller reports the arguments as not JSON
        calls.append({"name": fn.get("name", ""), "arguments": args})
    return calls


def _same_endpoint(a: str, b: str) -> bool:
    """Whether two endpoint URLs are the same API root (case of scheme and host, trailing / and /v1 aside)."""
    from urllib.parse import urlsplit

    def norm(url: str) -> tuple[str, str, int | None, str]:
        p = urlsplit(url.strip())
        path = p.path.rstrip("/")
        path = path if path.endswith("/v1") else path + "/v1"
        try:
            port = p.port
        except ValueError:
            port = None
        return p.scheme.lower(), (p.hostname or "").lower(), port, path

    return norm(a) == norm(b)


def _error_message(r) -> str:
    try:
        return str(r.json()["error"]["message"])
    except Exception:  # not an OpenAI error body
        return r.text[:300]
