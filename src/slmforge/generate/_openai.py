"""The HTTP engine: ``Generator`` over any OpenAI-compatible endpoint.

    gen = load_generator("http://127.0.0.1:8000/v1#sft")          # a model `slmforge serve` serves
    gen = load_generator("https://api.openai.com/v1#gpt-4o-mini")  # key from OPENAI_API_KEY

With it, ``slmforge eval``, ``eval compare``, ``generate`` and ``chat`` run against a served model, a
vLLM server or the paid API a domain model should replace — the same suites, side by side. The model
name follows ``#``; without it the endpoint's first model is used. The key comes from
``SLMFORGE_API_KEY``, else ``OPENAI_API_KEY``. Batches are sent as concurrent requests.

Only OpenAI's own fields are sent, plus ``top_k``/``repetition_penalty``/``ignore_eos`` when a request
sets them away from their defaults (slmforge and vLLM servers accept them; OpenAI refuses them with a
400, which is reported).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from slmforge.errors import GenerateError
from slmforge.generate import Completion, Message, SamplingParams


class OpenAIGenerator:
    """``Generator`` over an OpenAI-compatible HTTP endpoint.

    Args:
        base_url: The API root, e.g. ``http://127.0.0.1:8000/v1`` (``/v1`` is added when missing).
        model: The model name; None asks the endpoint for its first model.
        api_key: Sent as a bearer token; default ``SLMFORGE_API_KEY`` or ``OPENAI_API_KEY`` from the environment.
        timeout_s: Seconds one request may take.
        concurrency: Requests in flight at once for batches and n > 1.

    Raises:
        GenerateError: The endpoint cannot be reached, refuses the key, or serves no such model.
    """

    def __init__(self, base_url: str, model: str | None = None, api_key: str | None = None, timeout_s: float = 600.0,
                 concurrency: int = 8) -> None:
        import httpx

        root = base_url.rstrip("/")
        self.base_url = root if root.endswith("/v1") else root + "/v1"
        key = api_key or os.environ.get("SLMFORGE_API_KEY") or os.environ.get("OPENAI_API_KEY")
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
    def from_ref(cls, ref: str) -> OpenAIGenerator:
        """``URL#MODEL`` (or a bare URL: the endpoint's first model)."""
        url, _, model = str(ref).partition("#")
        return cls(url, model or None)

    # ------------------------------------------------------------------ Generator

    def complete(self, prompt: str, params: SamplingParams) -> list[Completion]:
        params.validate()
        return self._choices(self._post("/completions", {"prompt": prompt, **self._body(params)}), chat=False)

    def chat(self, messages: list[Message], params: SamplingParams) -> list[Completion]:
        params.validate()
        return self._choices(self._post("/chat/completions", {"messages": messages, **self._body(params)}), chat=True)

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
            raise GenerateError(f"{self.base_url} refused the API key ({r.status_code}); set SLMFORGE_API_KEY "
                                "or OPENAI_API_KEY.")
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
        per = int(usage.get("completion_tokens") or 0) // max(len(choices), 1)
        out = []
        for c in choices:
            text = ((c.get("message") or {}).get("content") or "") if chat else c.get("text", "")
            out.append(Completion(text=text, tokens=per, finish_reason="length" if c.get("finish_reason") == "length"
                                  else "stop"))
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


def _error_message(r) -> str:
    try:
        return str(r.json()["error"]["message"])
    except Exception:  # not an OpenAI error body
        return r.text[:300]
