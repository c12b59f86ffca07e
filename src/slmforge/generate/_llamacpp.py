"""The llama.cpp engine: ``Generator`` over a GGUF file, in-process through xllamacpp.

xllamacpp runs llama.cpp's server inside this process: requests go in as the
JSON bodies of its OpenAI-compatible endpoints (``handle_completions``,
``handle_chat_completions``) and come back as dicts, or as streamed chunks to a
callback. Every sampling knob is set on every request, from ``SamplingParams``
only, so llama.cpp's own defaults (top-k 40, min-p 0.05, a 64-token repeat
window) and the ``general.sampling.*`` defaults in the file never leak in.
That is what makes greedy output here match ``TorchGenerator`` token for token.

The server also listens on 127.0.0.1 (a free port); ``tokenize``, ``detokenize``
and ``render_chat`` use that loopback port, since xllamacpp has no Python call for them.
"""

from __future__ import annotations

import json
import queue
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from slmforge.errors import GenerateError, ModelError
from slmforge.generate import Capabilities, Completion, EngineBase, Message, SamplingParams
from slmforge.generate._text import cut_at_stop, cut_stream

_KV_TYPES = {"f32": "GGML_TYPE_F32", "f16": "GGML_TYPE_F16", "q8_0": "GGML_TYPE_Q8_0"}
_KV_BYTES = {"f32": 4.0, "f16": 2.0, "q8_0": 34 / 32}  # per element; Q8_0: 32 int8 values + an f16 scale
_END = object()  # marks the end of a stream in the queue


class LlamaCppGenerator(EngineBase):
    """``Generator`` over a GGUF file, run by llama.cpp (xllamacpp) in this process.

    Args:
        gguf_file: The model, e.g. written by ``slmforge.export.gguf.export_gguf``.
        n_threads: CPU threads for decoding and prompt processing.
        n_ctx: Context window in tokens (prompt + generated); default: the model's
            ``context_length``, capped at 4096.
        kv_cache_type: ``f32`` (default: logits within ~1e-5 of PyTorch fp32), ``f16`` or ``q8_0`` (less memory).
        flash_attention: Use llama.cpp's flash attention (faster on long prompts, ~1e-2 logit drift on CPU).
        cache_prompt: Reuse the KV cache of the previous request's common prefix (faster multi-turn
            chat; off by default, so a request's result never depends on the one before).
        verbose: Let llama.cpp log to stderr.
        parallel: Requests llama.cpp decodes together (its server's slots, continuously batched); each slot
            has the whole ``n_ctx``, so the KV cache is ``parallel`` times larger. Calls from several
            threads then run at once (the server uses this).

    Raises:
        GenerateError: The file is missing or llama.cpp cannot load it.
    """

    engine = "llama.cpp"
    capabilities = Capabilities(grammar=True)

    def __init__(
        self,
        gguf_file: str | Path,
        n_threads: int = 2,
        n_ctx: int | None = None,
        kv_cache_type: str = "f32",
        flash_attention: bool = False,
        cache_prompt: bool = False,
        verbose: bool = False,
        parallel: int = 1,
        chat_template: str | None = None,
    ) -> None:
        """``chat_template`` (Jinja) replaces the file's own, or gives one to a file that has none (a base
        model evaluated with its fine-tune's template)."""
        import xllamacpp

        from slmforge.model.gguf import read_gguf_info

        path = Path(gguf_file).expanduser()
        try:
            info = read_gguf_info(path)
        except ModelError as exc:
            raise GenerateError(str(exc)) from None
        if kv_cache_type not in _KV_TYPES:
            raise GenerateError(f"kv_cache_type must be one of {', '.join(_KV_TYPES)} (got {kv_cache_type!r}).")
        arch = info.architecture
        self.gguf_file = path
        self.context_length = int(info.metadata.get(f"{arch}.context_length", 4096))
        self.chat_template = chat_template or info.chat_template
        self._info, self._kv_type = info, kv_cache_type
        self.cache_prompt = cache_prompt
        self.n_ctx = int(n_ctx or min(self.context_length, 4096))

        p = xllamacpp.CommonParams()
        p.model.path = str(path)
        p.cpuparams.n_threads = n_threads
        p.cpuparams_batch.n_threads = n_threads
        if parallel < 1:
            raise GenerateError(f"parallel must be >= 1 (got {parallel}).")
        self.parallel = parallel
        p.n_ctx = self.n_ctx * parallel  # split evenly between the slots: each gets the whole n_ctx
        p.n_parallel = parallel
        p.kv_unified = False
        p.use_jinja = True  # the file's own chat template, through llama.cpp's Jinja engine
        if chat_template:
            p.chat_template = chat_template
        p.verbosity = 3 if verbose else -1
        p.flash_attn_type = (
            xllamacpp.llama_flash_attn_type.LLAMA_FLASH_ATTN_TYPE_ENABLED
            if flash_attention
            else xllamacpp.llama_flash_attn_type.LLAMA_FLASH_ATTN_TYPE_DISABLED
        )
        p.cache_type_k = getattr(xllamacpp.ggml_type, _KV_TYPES[kv_cache_type])
        p.cache_type_v = getattr(xllamacpp.ggml_type, _KV_TYPES[kv_cache_type])
        # Note: never set p.hostnames = [] (it segfaults); the server listens on 127.0.0.1 only.
        try:
            self.server = xllamacpp.Server(p)
        except RuntimeError as exc:
            raise GenerateError(f"llama.cpp could not load {path}: {exc}") from None
        self._address = self.server.listening_address

    @property
    def kv_cache_bytes(self) -> int:
        """Memory of the KV cache of all slots: each slot holds a whole context (``n_ctx``) for every layer.
        An upper bound for models whose sliding-window layers llama.cpp keeps shorter (Gemma 3)."""
        meta, arch = self._info.metadata, self._info.architecture
        layers = int(meta.get(f"{arch}.block_count", 0))
        heads = int(meta.get(f"{arch}.attention.head_count", 1) or 1)
        kv_heads = meta.get(f"{arch}.attention.head_count_kv", heads)
        kv_heads = int(max(kv_heads) if isinstance(kv_heads, (list, tuple)) else kv_heads)
        width = int(meta.get(f"{arch}.embedding_length", 0)) // heads
        per_token = kv_heads * (int(meta.get(f"{arch}.attention.key_length", width))
                                + int(meta.get(f"{arch}.attention.value_length", width)))
        return int(layers * per_token * self.n_ctx * self.parallel * _KV_BYTES[self._kv_type])

    # ------------------------------------------------------------------ Generator

    def complete(self, prompt: str, params: SamplingParams) -> list[Completion]:
        """``params.n`` completions of a plain-text prompt (llama.cpp adds BOS when the file says so)."""
        self._check(params)
        return [self._one("completions", {"prompt": prompt}, params, i) for i in range(params.n)]

    def chat(self, messages: list[Message], params: SamplingParams,
             json_schema: dict[str, Any] | None = None) -> list[Completion]:
        """``params.n`` assistant replies, rendered with the chat template stored in the GGUF file.

        Args:
            messages: The conversation.
            params: Sampling.
            json_schema: Constrain each reply to JSON valid under this schema (llama.cpp's grammar engine).
                Unlike the torch engine, llama.cpp does not close the JSON within ``max_new_tokens``: a
                reply cut by the budget is incomplete JSON with finish reason ``length``.

        Raises:
            GenerateError: The file has no chat template, or the messages are malformed.
        """
        self._check(params)
        self._check_messages(messages)
        base: dict[str, Any] = {"messages": messages}
        if json_schema is not None:
            base["grammar"] = _json_grammar(json_schema)
        return [self._one("chat", base, params, i) for i in range(params.n)]

    def complete_batch(self, prompts: list[str], params: SamplingParams) -> list[list[Completion]]:
        """``params.n`` completions per prompt, one prompt after another."""
        return [self.complete(p, params) for p in prompts]

    def chat_batch(self, conversations: list[list[Message]], params: SamplingParams) -> list[list[Completion]]:
        """``params.n`` replies per conversation, one after another."""
        return [self.chat(c, params) for c in conversations]

    def stream(self, prompt: str | list[Message], params: SamplingParams,
               json_schema: dict[str, Any] | None = None) -> Iterator[str]:
        """Text pieces of one completion (str) or one assistant reply (message list), as produced.

        llama.cpp runs in a background thread; stopping the iteration early stops it. ``json_schema``
        constrains a chat reply as in ``chat``.

        Raises:
            GenerateError: n > 1 or beam search, or a chat without a template.
        """
        self._check(params)
        if params.n != 1:
            raise GenerateError(
                f"Streaming returns one sequence as it is produced, so it needs n=1 (got n={params.n}); "
                "use complete() or chat() for more."
            )
        if isinstance(prompt, str):
            kind, body = "completions", {"prompt": prompt}
        else:
            self._check_messages(prompt)
            kind, body = "chat", {"messages": prompt}
            if json_schema is not None:
                body["grammar"] = _json_grammar(json_schema)
        return self._stream(kind, body, params)

    # ------------------------------------------------------------------ extras

    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        """Token ids llama.cpp makes of ``text`` (special tokens in the text are parsed; BOS added per the file)."""
        return list(self._post("/tokenize", {"content": text, "add_special": add_special, "parse_special": True})["tokens"])

    def fim_prompt(self, prefix: str, suffix: str) -> str | None:
        """The fill-in-the-middle prompt with the sentinels the file's vocabulary has as single tokens, in the
        order the file names (``slmforge.fim_order``; PSM when it names none)."""
        from slmforge.tokenizer.fim import FIM_FAMILIES, fim_prompt

        order = str(self._info.metadata.get("slmforge.fim_order", "psm"))
        for family in FIM_FAMILIES:
            if all(len(self.tokenize(t, add_special=False)) == 1 for t in family):
                return fim_prompt(prefix, suffix, family, order)
        return None

    def count_tokens(self, text: str, special: bool = True) -> int:
        """Tokens llama.cpp makes of ``text`` (``special``: with BOS, per the file)."""
        return len(self.tokenize(text, add_special=special))

    def detokenize(self, ids: list[int]) -> str:
        """The text of token ids, as llama.cpp renders it."""
        return self._post("/detokenize", {"tokens": list(ids)})["content"]

    def render_chat(self, messages: list[Message]) -> str:
        """The prompt the file's chat template makes of the messages (llama.cpp leaves out the BOS it adds itself)."""
        self._check_messages(messages)
        return self._post("/apply-template", {"messages": messages})["prompt"]

    def close(self) -> None:
        """Stop llama.cpp's server thread and free the model."""
        server, self.server = getattr(self, "server", None), None
        del server

    def __enter__(self) -> LlamaCppGenerator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ helpers

    def _check(self, params: SamplingParams) -> None:
        params.validate()
        if params.num_beams != 1:
            raise GenerateError(
                f"llama.cpp has no beam search (num_beams={params.num_beams}); use num_beams=1, or the torch engine."
            )
        if self.server is None:
            raise GenerateError("This LlamaCppGenerator was closed; create a new one.")

    def _check_messages(self, messages: list[Message]) -> None:
        if not self.chat_template:
            raise GenerateError(
                f"{self.gguf_file.name} has no chat template (tokenizer.chat_template), so it cannot chat. "
                "Use plain completion, or export a model whose tokenizer has a chat template."
            )
        if not isinstance(messages, list) or not messages:
            raise GenerateError("A chat needs at least one message: [{'role': 'user', 'content': '...'}].")
        for i, m in enumerate(messages):
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                raise GenerateError(f"Message {i} must be a dict with string 'role' and 'content'; got {m!r}.")

    def _body(self, base: dict[str, Any], params: SamplingParams, sample_index: int) -> dict[str, Any]:
        sample = params.temperature > 0
        body = dict(base)
        body.update(
            max_tokens=params.max_new_tokens,
            temperature=params.temperature if sample else 0.0,  # <= 0: greedy
            top_k=params.top_k or 0,  # 0 = off (llama.cpp's default is 40)
            top_p=params.top_p if params.top_p is not None else 1.0,
            min_p=0.0,  # llama.cpp's default is 0.05; transformers has none
            typical_p=1.0,
            repeat_penalty=params.repetition_penalty,
            repeat_last_n=self.n_ctx,  # the whole context, as transformers' repetition_penalty (-1 is refused here)
            presence_penalty=0.0,
            frequency_penalty=0.0,
            dry_multiplier=0.0,
            xtc_probability=0.0,
            mirostat=0,
            stop=list(params.stop),
            cache_prompt=self.cache_prompt,
            ignore_eos=params.ignore_eos,
        )
        if params.seed is not None:
            body["seed"] = (params.seed + sample_index) % (2**32 - 1)  # n seeded samples must differ
        return body

    def _call(self, kind: str, body: dict[str, Any], callback=None):
        handler = self.server.handle_chat_completions if kind == "chat" else self.server.handle_completions
        try:
            return handler(body) if callback is None else handler(body, callback)
        except (RuntimeError, ValueError) as exc:
            raise GenerateError(f"llama.cpp failed: {type(exc).__name__}: {str(exc)[:500]}") from None

    def _one(self, kind: str, base: dict[str, Any], params: SamplingParams, sample_index: int) -> Completion:
        result = self._call(kind, self._body(base, params, sample_index))
        _raise_if_error(result)
        choice = result["choices"][0]
        text = (choice["message"].get("content") or "") if kind == "chat" else choice.get("text", "")
        text, hit = cut_at_stop(text, params.stop)
        tokens = int(result.get("usage", {}).get("completion_tokens", 0))
        reason = "length" if choice.get("finish_reason") == "length" and not hit else "stop"
        return Completion(text=text, tokens=tokens, finish_reason=reason)

    def _stream(self, kind: str, base: dict[str, Any], params: SamplingParams) -> Iterator[str]:
        body = dict(self._body(base, params, 0), stream=True)
        pieces: queue.Queue = queue.Queue()
        cancel = threading.Event()
        failure: list[BaseException] = []

        def on_chunk(chunk: dict[str, Any]) -> bool:
            if "error" in chunk or "choices" not in chunk:
                failure.append(GenerateError(f"llama.cpp failed: {_error_text(chunk)}"))
                return True
            for choice in chunk["choices"]:
                piece = (choice.get("delta") or {}).get("content") if kind == "chat" else choice.get("text")
                if piece:
                    pieces.put(piece)
            return cancel.is_set()  # True stops the generation

        def work() -> None:
            try:
                self._call(kind, body, on_chunk)
            except BaseException as exc:  # handed to the consuming thread below
                failure.append(exc)
            finally:
                pieces.put(_END)

        thread = threading.Thread(target=work, name="slmforge-llamacpp", daemon=True)
        thread.start()

        def close() -> None:
            cancel.set()
            thread.join()

        # llama.cpp cuts at stop strings too; cutting here keeps the contract the same in every engine.
        yield from cut_stream(iter(pieces.get, _END), params.stop, close)
        if failure:
            raise failure[0]

    def _post(self, route: str, body: dict[str, Any]) -> dict[str, Any]:
        if self.server is None:
            raise GenerateError("This LlamaCppGenerator was closed; create a new one.")
        request = urllib.request.Request(
            self._address + route, data=json.dumps(body).encode("utf-8"), headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=60) as response:  # loopback only
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            raise GenerateError(f"llama.cpp {route} failed: {exc.read()[:300].decode('utf-8', 'replace')}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise GenerateError(f"llama.cpp's loopback server did not answer {route}: {exc}") from None


def _json_grammar(schema: dict[str, Any]) -> str:
    """An llguidance grammar for JSON under ``schema`` with no free whitespace.

    Not the ``json_schema`` field: llama.cpp turns that into a GBNF grammar that allows newlines and tabs
    between tokens, and small models fill replies with them; llguidance honours ``whitespace_flexible``.
    """
    import json

    return "%llguidance {}\nstart: json\njson: %json " + json.dumps(
        {**schema, "x-guidance": {"whitespace_flexible": False}})


def _error_text(result: dict[str, Any]) -> str:
    err = result.get("error", result)
    if isinstance(err, dict):
        return str(err.get("message") or err)[:500]
    return str(err)[:500]


def _raise_if_error(result: Any) -> None:
    if not isinstance(result, dict) or "choices" not in result:
        raise GenerateError(f"llama.cpp failed: {_error_text(result) if isinstance(result, dict) else result!r}")
