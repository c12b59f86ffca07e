"""The ONNX Runtime engine: ``Generator`` over a folder written by ``slmforge export onnx``.

The folder holds ``model.onnx`` (+ ``model.onnx.data``), the onnxruntime-genai
``genai_config.json`` that names the decoder's inputs and outputs, and the Hugging
Face tokenizer and ``generation_config.json`` of the model it came from.

Decoding is our own KV-cache loop over ``onnxruntime.InferenceSession`` rather
than onnxruntime-genai's ``og.Generator``: the same loop then runs on any execution
provider, can be profiled and I/O-bound, and samples exactly as the torch engine
does (repetition penalty, then temperature, top-k, top-p, as transformers orders
them), so greedy output is token-for-token the torch engine's. Prompts are
encoded with the folder's Hugging Face tokenizer, which adds BOS as in training
(onnxruntime-genai's own tokenizer does not).

The graph is the builder's: GroupQueryAttention takes the past key/values
``(rows, kv_heads, past, head_size)`` and an attention mask as long as the whole
sequence; it derives positions from the mask (no ``position_ids`` input).

Sliding-window layers (Gemma 3's: ``sliding_window`` in genai_config.json) have a
windowed cache (the builder's default on CPU and CUDA): the kernel keeps only the latest
positions, compacted at the start of a buffer of its own capacity, which must hold at
least the window whatever the sequence length (ONNX Runtime rejects a smaller one).
Their buffers are sized apart from the full-attention layers' (see ``cache_capacity``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from slmforge.errors import GenerateError, ModelError
from slmforge.generate import Capabilities, Completion, EngineBase, Message, SamplingParams
from slmforge.generate._sampling import logsumexp, next_tokens
from slmforge.generate._text import StopCutter, cut_at_stop, render_chat

# Tried in this order when no preference is given; the first that ONNX Runtime has wins,
# and the CPU provider always ends the list. Azure's provider runs remote endpoints, not graphs.
DEFAULT_PROVIDERS = [
    "TensorrtExecutionProvider",
    "CUDAExecutionProvider",
    "OpenVINOExecutionProvider",
    "DmlExecutionProvider",
    "CPUExecutionProvider",
]

# Where the KV cache and logits live for each provider that can bind device memory.
_DEVICE_OF_PROVIDER = {
    "CUDAExecutionProvider": "cuda",
    "TensorrtExecutionProvider": "cuda",
    "DmlExecutionProvider": "dml",
}

# Graph optimization levels by the names the config uses.
ORT_LEVELS = {
    "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}

_NUMPY_OF_ORT_TYPE = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def choose_providers(preferred: list[str] | None = None) -> list[str]:
    """The execution providers to ask ONNX Runtime for, in order of preference.

    Providers this ONNX Runtime build lacks are skipped, and ``CPUExecutionProvider`` is
    always last, so the list never comes back empty. Which provider actually ran a
    session is ``session.get_providers()[0]`` (``OnnxGenerator.providers``): ONNX Runtime
    itself falls back to the CPU when a listed provider fails to start (no driver, say).

    Args:
        preferred: Provider names, most wanted first; None means TensorRT, CUDA, OpenVINO,
            DirectML, CPU.

    Returns:
        The available providers of ``preferred``, in its order, ending with the CPU provider.

    Raises:
        GenerateError: A name ONNX Runtime does not know at all (a typo).
    """
    wanted = list(DEFAULT_PROVIDERS if preferred is None else preferred)
    known = set(ort.get_all_providers())
    unknown = [p for p in wanted if p not in known]
    if unknown:
        raise GenerateError(
            f"Unknown execution provider(s) {', '.join(unknown)}; ONNX Runtime knows: {', '.join(sorted(known))}."
        )
    available = set(ort.get_available_providers())
    chosen = [p for p in dict.fromkeys(wanted) if p in available and p != "CPUExecutionProvider"]
    return [*chosen, "CPUExecutionProvider"]


def make_session(
    onnx_file: str | Path,
    providers: list[str] | None = None,
    threads: int | None = None,
    optimization: str = "all",
    profile_prefix: str | Path | None = None,
) -> ort.InferenceSession:
    """An ``InferenceSession`` over an ONNX file with our defaults (warnings silenced).

    Args:
        onnx_file: The ``.onnx`` file (its external data beside it).
        providers: Preferred execution providers (see ``choose_providers``).
        threads: Intra-op threads (None = ONNX Runtime's default, one per core).
        optimization: ``disabled``, ``basic``, ``extended`` or ``all``: graph optimizations at load.
        profile_prefix: Turn on ONNX Runtime's profiler; its trace file name starts with this path.

    Raises:
        ModelError: The file is missing or ONNX Runtime cannot load it.
    """
    onnx_file = Path(onnx_file)
    if not onnx_file.is_file():
        raise ModelError(f"{onnx_file} does not exist; export a model first (`slmforge export onnx`).")
    so = ort.SessionOptions()
    so.graph_optimization_level = ORT_LEVELS[optimization]
    so.log_severity_level = 3  # errors only: the builder's graphs trigger harmless warnings
    if threads:
        so.intra_op_num_threads = threads
    if os.environ.get("SLMFORGE_ORT_SPINNING") == "0":
        # Idle workers that spin starve other engines in the same process (the server sets this).
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    if profile_prefix is not None:
        so.enable_profiling = True
        so.profile_file_prefix = str(profile_prefix)
    try:
        return ort.InferenceSession(str(onnx_file), so, providers=choose_providers(providers))
    except Exception as exc:  # onnxruntime's Fail, InvalidGraph, NoSuchFile... derive from Exception alone
        raise ModelError(f"ONNX Runtime could not load {onnx_file}: {str(exc)[:500]}") from None


# --------------------------------------------------------------------------- the decoder's layout


@dataclass(frozen=True)
class DecoderLayout:
    """Shapes and names of a decoder graph, read from ``genai_config.json``."""

    onnx_file: Path
    num_layers: int
    num_kv_heads: int
    head_size: int
    context_length: int
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    pad_token_id: int | None
    share_buffer: bool = False  # past and present may be one buffer (GroupQueryAttention graphs)
    target: str = "cpu"  # the device the builder shaped the graph for: cpu, cuda, dml
    sliding_window: int = 0  # positions a sliding layer attends to (0: none has a windowed cache)
    sliding_layers: tuple[int, ...] = ()  # the layers whose cache is windowed
    input_ids: str = "input_ids"
    attention_mask: str = "attention_mask"
    past_key: str = "past_key_values.%d.key"
    past_value: str = "past_key_values.%d.value"
    logits: str = "logits"
    present_key: str = "present.%d.key"
    present_value: str = "present.%d.value"

    @classmethod
    def read(cls, folder: str | Path) -> DecoderLayout:
        """The layout of an exported folder.

        Raises:
            ModelError: No ``genai_config.json``, or one without a decoder section.
        """
        folder = Path(folder)
        file = folder / "genai_config.json"
        if not file.is_file():
            raise ModelError(
                f"{folder} has no genai_config.json, so it is not an ONNX export of slmforge or of "
                "onnxruntime-genai's model builder. Make one with `slmforge export onnx`."
            )
        try:
            config = json.loads(file.read_text(encoding="utf-8"))
            model = config["model"]
            dec = model["decoder"]
            inputs, outputs = dec.get("inputs", {}), dec.get("outputs", {})
            eos = model.get("eos_token_id")
            window = dec.get("sliding_window") or {}
            return cls(
                onnx_file=folder / dec.get("filename", "model.onnx"),
                num_layers=int(dec["num_hidden_layers"]),
                num_kv_heads=int(dec["num_key_value_heads"]),
                head_size=int(dec["head_size"]),
                context_length=int(model["context_length"]),
                vocab_size=int(model["vocab_size"]),
                eos_token_ids=tuple(eos if isinstance(eos, list) else ([eos] if eos is not None else [])),
                pad_token_id=model.get("pad_token_id"),
                share_buffer=bool(config.get("search", {}).get("past_present_share_buffer", False)),
                target=_target_of(dec.get("session_options", {}).get("provider_options", [])),
                sliding_window=int(window.get("window_size", 0)) if window.get("layers") else 0,
                sliding_layers=tuple(int(i) for i in window.get("layers", [])),
                input_ids=inputs.get("input_ids", "input_ids"),
                attention_mask=inputs.get("attention_mask", "attention_mask"),
                past_key=inputs.get("past_key_names", "past_key_values.%d.key"),
                past_value=inputs.get("past_value_names", "past_key_values.%d.value"),
                logits=outputs.get("logits", "logits"),
                present_key=outputs.get("present_key_names", "present.%d.key"),
                present_value=outputs.get("present_value_names", "present.%d.value"),
            )
        except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"{file} is not a usable genai_config.json ({type(exc).__name__}: {exc}).") from None

    @property
    def providers(self) -> list[str]:
        """The providers to run the graph on when none are named: the one it was built for, then the CPU."""
        return {"cuda": ["CUDAExecutionProvider"], "dml": ["DmlExecutionProvider"]}.get(self.target, []) + [
            "CPUExecutionProvider"]

    def cache_capacity(self, layer: int, max_len: int) -> int:
        """Positions to allocate for ``layer``'s cache when a sequence may reach ``max_len``.

        A full-attention layer holds the whole sequence. A windowed layer holds between the
        window (ONNX Runtime's minimum, even for a shorter sequence) and twice the window:
        past that, the kernel drops the positions that left the window, a window's worth at a
        time, instead of compacting the buffer at every step. ONNX Runtime's CUDA kernel takes
        exactly the window (a graph built for CUDA).
        """
        if layer not in self.sliding_layers:
            return max_len
        if self.target == "cuda":
            return self.sliding_window
        return min(max(max_len, self.sliding_window), 2 * self.sliding_window)

    def cache_names(self) -> list[tuple[str, str]]:
        """(past input, present output) name pairs, keys then values of each layer."""
        return [
            (tpl_in % layer, tpl_out % layer)
            for layer in range(self.num_layers)
            for tpl_in, tpl_out in ((self.past_key, self.present_key), (self.past_value, self.present_value))
        ]


class Decoder:
    """One KV-cache decoding over a session: ``decoder(ids)`` feeds ``ids`` (rows, S) after
    everything fed so far and returns the logits (rows, S, vocab) as float32 numpy.

    With ``io_binding`` the key/value cache stays on the provider's device and logits go
    into a pre-allocated buffer. Where the graph allows it (GroupQueryAttention, whose
    genai_config says ``past_present_share_buffer``) the cache is one pre-allocated buffer
    per layer of ``max_len`` positions, bound as both the past input and the present
    output, and written in place: nothing moves between steps but the new token and the
    logits. Otherwise (a graph without GroupQueryAttention, or a CPU-built graph whose fp32
    attention the CUDA provider hands back to the CPU) the presents are allocated on the
    device by ONNX Runtime and bound as the next step's pasts.
    Without ``io_binding`` each step is a plain ``session.run`` whose presents, copied to
    numpy, become the next step's pasts (a growing copy every step).
    """

    def __init__(self, session: ort.InferenceSession, layout: DecoderLayout, rows: int, max_len: int,
                 io_binding: bool = True) -> None:
        if max_len > layout.context_length:
            raise GenerateError(
                f"{max_len} positions asked for, but the model was exported for at most {layout.context_length}; "
                "shorten the prompt or lower max_new_tokens."
            )
        self.session, self.layout, self.rows, self.max_len = session, layout, rows, max_len
        self.io_binding = io_binding
        self.device = _DEVICE_OF_PROVIDER.get(session.get_providers()[0], "cpu") if io_binding else "cpu"
        # In place only where the attention kernel runs on the buffers' device: a graph built for the CPU
        # has fp32 GroupQueryAttention, which the CUDA provider lacks and hands back to the CPU (on copies).
        self.in_place = io_binding and layout.share_buffer and self.device in ("cpu", layout.target)
        self.length = 0  # positions already in the cache
        types = {i.name: i.type for i in session.get_inputs()}
        names = set(types)
        needed = [layout.input_ids, layout.attention_mask, *(p for p, _ in layout.cache_names())]
        missing = [n for n in needed if n not in names]
        if missing:
            raise ModelError(f"{layout.onnx_file} lacks the inputs genai_config.json names: {', '.join(missing)}.")
        self.position_ids = "position_ids" if "position_ids" in names else None  # non-GQA graphs need them
        self.kv_dtype = _NUMPY_OF_ORT_TYPE.get(types[layout.cache_names()[0][0]], np.float32)
        out_types = {o.name: o.type for o in session.get_outputs()}
        self.logits_dtype = _NUMPY_OF_ORT_TYPE.get(out_types.get(layout.logits, ""), np.float32)
        # (rows, kv_heads, capacity, head_size) per cache name, keys then values of each layer. Out of place,
        # a full-attention past starts empty and each step's present is one position longer; a windowed
        # layer's past and present always have its fixed capacity.
        shapes = [(rows, layout.num_kv_heads, capacity, layout.head_size)
                  for layer in range(layout.num_layers)
                  for capacity in [layout.cache_capacity(layer, max_len)
                                   if self.in_place or layer in layout.sliding_layers else 0] * 2]
        if io_binding:
            self.binding = session.io_binding()
            self.cache = [self._device_array(np.zeros(shape, self.kv_dtype)) for shape in shapes]
            self.step_logits = self._device_array(np.zeros((rows, 1, layout.vocab_size), self.logits_dtype))
        else:
            self.cache = [np.zeros(shape, self.kv_dtype) for shape in shapes]

    def _device_array(self, array: np.ndarray) -> ort.OrtValue:
        return ort.OrtValue.ortvalue_from_numpy(array, self.device, 0)

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        ids = np.ascontiguousarray(ids, dtype=np.int64)  # (rows, S)
        rows, s = ids.shape
        if rows != self.rows:
            raise ValueError(f"decoder built for {self.rows} rows got {rows}")
        total = self.length + s
        if total > self.max_len:
            raise GenerateError(f"the KV cache holds {self.max_len} positions; {total} were asked for")
        mask = np.ones((rows, total), np.int64)  # (rows, past + S): no padding, every row the same length
        positions = np.broadcast_to(np.arange(self.length, total, dtype=np.int64), (rows, s)).copy()
        logits = self._bound(ids, mask, positions) if self.io_binding else self._plain(ids, mask, positions)
        self.length = total
        return logits

    def _plain(self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray) -> np.ndarray:
        lay = self.layout
        feeds = {lay.input_ids: ids, lay.attention_mask: mask}
        if self.position_ids:
            feeds[self.position_ids] = positions
        names = lay.cache_names()
        for (past, _), value in zip(names, self.cache):
            feeds[past] = value
        try:
            outputs = self.session.run([lay.logits, *(present for _, present in names)], feeds)
        except Exception as exc:  # onnxruntime's own error classes derive from Exception alone
            raise GenerateError(f"ONNX Runtime failed to run {lay.onnx_file.name}: {str(exc)[:500]}") from None
        self.cache = outputs[1:]
        return np.asarray(outputs[0], dtype=np.float32)

    def _bound(self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray) -> np.ndarray:
        lay, b = self.layout, self.binding
        # Binding a name again replaces its binding; the in-place cache stays bound from the first step.
        b.bind_cpu_input(lay.input_ids, ids)
        b.bind_cpu_input(lay.attention_mask, mask)
        if self.position_ids:
            b.bind_cpu_input(self.position_ids, positions)
        out = self.step_logits if ids.shape[1] == 1 else self._device_array(
            np.zeros((self.rows, ids.shape[1], lay.vocab_size), self.logits_dtype))
        b.bind_ortvalue_output(lay.logits, out)  # bound first: get_outputs() lists outputs in binding order
        if not (self.in_place and self.length):
            for (past, present), buffer in zip(lay.cache_names(), self.cache):
                b.bind_ortvalue_input(past, buffer)
                if self.in_place:
                    b.bind_ortvalue_output(present, buffer)  # the same buffer: updated in place
                else:
                    b.bind_output(present, self.device, 0)  # allocated on the device by ONNX Runtime
        try:
            self.session.run_with_iobinding(b)
        except Exception as exc:  # onnxruntime's own error classes derive from Exception alone
            raise GenerateError(f"ONNX Runtime failed to run {lay.onnx_file.name}: {str(exc)[:500]}") from None
        if not self.in_place:
            self.cache = b.get_outputs()[1:]
        return np.array(out.numpy(), dtype=np.float32)  # a copy: the buffer is overwritten next step


# --------------------------------------------------------------------------- the engine


class OnnxGenerator(EngineBase):
    """``Generator`` over an exported ONNX folder, decoded with ONNX Runtime.

    Args:
        onnx_dir: The folder ``slmforge export onnx`` wrote (model.onnx, genai_config.json, tokenizer).
        providers: Execution providers in order of preference (see ``choose_providers``); None means
            the one the graph was exported for (genai_config.json), then the CPU.
        io_binding: Decode with I/O binding and a pre-allocated, in-place KV cache (faster, same numbers).
        threads: Intra-op threads (None = ONNX Runtime's default).
        profile_prefix: Turn on ONNX Runtime's profiler; ``session.end_profiling()`` then writes a
            Chrome trace whose name starts with this path.

    Raises:
        ModelError: The folder is not an ONNX export, or ONNX Runtime cannot load it.
    """

    engine = "onnx"
    capabilities = Capabilities(batching=True, loglikelihood=True)
    tokenizer: Any
    eos_token_ids: list[int]
    pad_token_id: int

    def __init__(self, onnx_dir: str | Path, providers: list[str] | None = None, io_binding: bool = True,
                 threads: int | None = None, profile_prefix: str | Path | None = None) -> None:
        from slmforge.model import stop_token_ids
        from slmforge.tokenizer import load_tokenizer

        self.folder = Path(onnx_dir).expanduser()
        self.layout = DecoderLayout.read(self.folder)
        self.context_length = self.layout.context_length
        self.session = make_session(self.layout.onnx_file,
                                    providers=self.layout.providers if providers is None else providers,
                                    threads=threads, profile_prefix=profile_prefix)
        self.io_binding = io_binding
        try:
            self.tokenizer = load_tokenizer(self.folder)
        except Exception as exc:  # TokenizerError, or transformers' own errors on a broken folder
            raise ModelError(f"{self.folder}: could not load its tokenizer: {exc}") from None
        ids = list(self.layout.eos_token_ids)
        gen_file = self.folder / "generation_config.json"
        if gen_file.is_file():
            eos = json.loads(gen_file.read_text(encoding="utf-8")).get("eos_token_id")
            ids += eos if isinstance(eos, list) else ([eos] if eos is not None else [])
        stop = stop_token_ids(self.tokenizer)
        ids += stop if isinstance(stop, list) else ([stop] if stop is not None else [])
        self.eos_token_ids = list(dict.fromkeys(int(i) for i in ids))
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = self.layout.pad_token_id if self.layout.pad_token_id is not None else self.eos_token_ids[0]
        self.pad_token_id = int(pad)

    @property
    def providers(self) -> list[str]:
        """The execution providers the session runs on, the one doing the work first."""
        return self.session.get_providers()

    # ------------------------------------------------------------------ Generator

    def complete(self, prompt: str, params: SamplingParams) -> list[Completion]:
        """``params.n`` completions of a plain-text prompt (the tokenizer adds BOS as in training)."""
        self._check(params)
        return self._run(self.encode(prompt), params, _rng(params))

    def chat(self, messages: list[Message], params: SamplingParams) -> list[Completion]:
        """``params.n`` assistant replies to the conversation, rendered with the chat template.

        Raises:
            GenerateError: The tokenizer has no chat template, or the messages are malformed.
        """
        self._check(params)
        return self._run(self.encode(self.render_chat(messages), special=False), params, _rng(params))

    def complete_batch(self, prompts: list[str], params: SamplingParams) -> list[list[Completion]]:
        """``params.n`` completions per prompt, one prompt after another (one random stream for all)."""
        self._check(params)
        rng = _rng(params)
        return [self._run(self.encode(p), params, rng) for p in prompts]

    def chat_batch(self, conversations: list[list[Message]], params: SamplingParams) -> list[list[Completion]]:
        """``params.n`` replies per conversation, one conversation after another."""
        self._check(params)
        rng = _rng(params)
        return [self._run(self.encode(self.render_chat(c), special=False), params, rng) for c in conversations]

    def stream(self, prompt: str | list[Message], params: SamplingParams) -> Iterator[str]:
        """Text pieces of one completion (str) or one assistant reply (message list), as they are produced.

        Decoding happens as the iterator is consumed; closing it early stops decoding.

        Raises:
            GenerateError: n > 1 (one sequence can be streamed), beam search, or no chat template.
        """
        self._check(params)
        if params.n != 1:
            raise GenerateError(
                f"Streaming returns one sequence as it is produced, so it needs n=1 and num_beams=1 "
                f"(got n={params.n}, num_beams={params.num_beams}); use complete() or chat() for more."
            )
        ids = self.encode(prompt) if isinstance(prompt, str) else self.encode(self.render_chat(prompt), special=False)
        return self._stream(ids, params)

    def loglikelihood(self, requests: list[tuple[str, str]], batch_size: int = 8) -> list[float]:
        """Sum of log-probabilities of each continuation given its context (nats), as the torch engine
        scores it: context with BOS, continuation without, one forward over both."""
        del batch_size  # one sequence at a time: the graph's attention takes no padding here
        out = []
        for context, continuation in requests:
            a = self.encode(context)
            b = list(self.tokenizer(continuation, add_special_tokens=False)["input_ids"])
            if not b:
                out.append(0.0)
                continue
            logits = self.decode_logits(a + b)[0]  # (S, V)
            logp = logits - logsumexp(logits)
            out.append(float(sum(logp[len(a) - 1 + i, t] for i, t in enumerate(b))))
        return out

    # ------------------------------------------------------------------ building blocks

    def decode_logits(self, prompt_ids: list[int], next_ids: list[int] = (), rows: int = 1) -> np.ndarray:
        """Logits of every position of ``prompt_ids + next_ids``: the prompt in one forward, then each
        of ``next_ids`` one step at a time through the KV cache (the path generation takes).

        Returns:
            (rows, len(prompt_ids) + len(next_ids), vocab) float32.
        """
        total = len(prompt_ids) + len(next_ids)
        decoder = Decoder(self.session, self.layout, rows, total, io_binding=self.io_binding)
        parts = [decoder(np.tile(np.asarray(prompt_ids, np.int64), (rows, 1)))]
        for token in next_ids:
            parts.append(decoder(np.full((rows, 1), token, np.int64)))
        return np.concatenate(parts, axis=1)

    def render_chat(self, messages: list[Message]) -> str:
        """The prompt text the chat template makes of the messages (see ``_text.render_chat``)."""
        return render_chat(self.tokenizer, messages)

    def fim_prompt(self, prefix: str, suffix: str) -> str | None:
        """The fill-in-the-middle prompt with the tokenizer's sentinels (None without them)."""
        from slmforge.tokenizer.fim import tokenizer_fim_prompt

        return tokenizer_fim_prompt(self.tokenizer, prefix, suffix)

    def count_tokens(self, text: str, special: bool = True) -> int:
        """Tokens the folder's tokenizer makes of ``text`` (``special``: with BOS)."""
        return len(self.tokenizer(text, add_special_tokens=special)["input_ids"])

    def _check(self, params: SamplingParams) -> None:
        params.validate()
        if params.num_beams != 1:
            raise GenerateError(
                f"The ONNX engine samples one token at a time and has no beam search (num_beams={params.num_beams}); "
                "use num_beams 1, or the torch engine for beams."
            )

    def encode(self, text: str, special: bool = True) -> list[int]:
        """Token ids of a prompt (``special``: add BOS; False for a rendered chat, which holds its BOS).
        Raises ``GenerateError`` for a prompt of no tokens, or of more than the exported context."""
        ids = list(self.tokenizer(text, add_special_tokens=special)["input_ids"])
        if not ids:
            raise GenerateError("The prompt is empty (and the tokenizer adds no BOS token); give some text.")
        if len(ids) >= self.layout.context_length:
            raise GenerateError(
                f"The prompt is {len(ids)} tokens; the model was exported for {self.layout.context_length} "
                "positions in all. Shorten it."
            )
        return ids

    def _steps(self, ids: list[int], params: SamplingParams, rng: np.random.Generator, rows: int
               ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield (tokens (rows,), still-running mask before this step (rows,)) once per generated position,
        until every row has hit an end-of-sequence token, a stop string, or the length limit."""
        max_len = min(len(ids) + params.max_new_tokens, self.layout.context_length)
        decoder = Decoder(self.session, self.layout, rows, max_len, io_binding=self.io_binding)
        history = np.tile(np.asarray(ids, np.int64), (rows, 1))  # (rows, T)
        logits = decoder(history)[:, -1]
        running = np.ones(rows, bool)
        eos = np.asarray([] if params.ignore_eos else self.eos_token_ids, np.int64)
        generated: list[list[int]] = [[] for _ in range(rows)]
        for _ in range(max_len - len(ids)):
            tokens = next_tokens(logits, history, params, rng)
            tokens = np.where(running, tokens, self.pad_token_id)
            yield tokens, running.copy()
            for row in np.flatnonzero(running):
                generated[row].append(int(tokens[row]))
                if tokens[row] in eos or (params.stop and self._hit_stop(generated[row], params.stop)):
                    running[row] = False
            if not running.any() or decoder.length + 1 > max_len:
                return
            history = np.concatenate([history, tokens[:, None]], axis=1)
            logits = decoder(tokens[:, None])[:, -1]

    def _hit_stop(self, generated: list[int], stop: list[str]) -> bool:
        return cut_at_stop(self.tokenizer.decode(generated, skip_special_tokens=True), stop)[1]

    def _run(self, ids: list[int], params: SamplingParams, rng: np.random.Generator) -> list[Completion]:
        generated: list[list[int]] = [[] for _ in range(params.n)]
        for tokens, running in self._steps(ids, params, rng, params.n):
            for row in np.flatnonzero(running):
                generated[row].append(int(tokens[row]))
        return [self._completion(g, params) for g in generated]

    def _completion(self, ids: list[int], params: SamplingParams) -> Completion:
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        text, hit = cut_at_stop(text, params.stop)
        stopped = hit or (bool(ids) and ids[-1] in self.eos_token_ids)
        return Completion(text=text, tokens=len(ids), finish_reason="stop" if stopped else "length")

    def _stream(self, ids: list[int], params: SamplingParams) -> Iterator[str]:
        generated: list[int] = []
        shown = ""
        cutter = StopCutter(params.stop)
        for tokens, _ in self._steps(ids, params, _rng(params), 1):
            generated.append(int(tokens[0]))
            text = self.tokenizer.decode(generated, skip_special_tokens=True)
            if text.endswith("\ufffd"):
                continue  # a character split across tokens: wait for its other bytes
            piece, shown = text[len(shown):], text
            out = cutter.feed(piece)
            if out:
                yield out
            if cutter.stopped:
                return
        out = cutter.feed(self.tokenizer.decode(generated, skip_special_tokens=True)[len(shown):])
        if out:
            yield out
        tail = cutter.flush()
        if tail:
            yield tail


def _target_of(provider_options: list) -> str:
    """The device named by genai_config's provider options (``[{"cuda": {...}}]``), else cpu."""
    names = {key for entry in provider_options if isinstance(entry, dict) for key in entry}
    return "cuda" if "cuda" in names else "dml" if "dml" in names else "cpu"


def _rng(params: SamplingParams) -> np.random.Generator:
    return np.random.default_rng(params.seed)

