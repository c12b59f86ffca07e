"""The in-process torch engine: ``Generator`` over a transformers causal LM.

Everything goes through one ``model.generate`` call per request, with a
``GenerationConfig`` built entirely from ``SamplingParams``, so defaults saved in
the model folder's generation_config.json (its default profile) never leak
into a request that did not ask for them. On CPU, one-row decode steps read the
LM head from a column-major twin (``_torch_head``) and every other linear layer reads
a oneDNN-packed twin (``_torch_packed``), the one change of the model's arithmetic:
the same fp32 products, summed in another order; plain greedy steps screen the head
with int8 (or bf16) and recompute in fp32 every token that could be the argmax.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from slmforge.errors import GenerateError, ModelError
from slmforge.generate import Capabilities, Completion, EngineBase, Message, SamplingParams
from slmforge.generate._text import cut_at_stop, cut_stream, render_chat
from slmforge.generate._torch_head import attach_row_vector_head, exact_argmax_only
from slmforge.generate._torch_packed import attach_packed_layers
from slmforge.model import pick_device


class TorchGenerator(EngineBase):
    """``Generator`` over a transformers causal LM and its tokenizer, optionally with peft LoRA adapters.

    Args:
        model: A causal LM (``AutoModelForCausalLM``), or a ``peft.PeftModel`` over one.
        tokenizer: Its tokenizer; a chat template is needed for ``chat`` and message streams.
        device: ``auto`` (CUDA when present, else CPU), ``cpu``, ``cuda`` or ``cuda:N``.
    """

    engine = "torch"
    capabilities = Capabilities(batching=True, loglikelihood=True, grammar=True, adapters=True, beams=True,
                                prompt_logprobs=True, perplexity=True)
    model: Any  # the causal LM (a peft model with adapters), on ``device``, in eval mode
    tokenizer: Any
    device: str
    eos_token_ids: list[int]
    pad_token_id: int | None

    def __init__(self, model, tokenizer, device: str = "auto") -> None:
        self.device = pick_device(device)
        self.model = model.to(self.device).eval()
        # On CPU, one-row decode steps read the LM head column-major (see _torch_head), and the other
        # layers read oneDNN-packed copies (_torch_packed): each ~1.5-2x faster there.
        attach_row_vector_head(self.model)
        attach_packed_layers(self.model)
        self.tokenizer = tokenizer
        self.eos_token_ids = _eos_ids(model, tokenizer)
        pad = tokenizer.pad_token_id
        if pad is None:
            pad = getattr(getattr(model, "generation_config", None), "pad_token_id", None)
        if pad is None and self.eos_token_ids:
            pad = self.eos_token_ids[0]  # the usual fallback; finished rows are cut at their first eos anyway
        self.pad_token_id = pad
        self._adapter_disabled = False

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        adapters: dict[str, str | Path] | None = None,
        device: str = "auto",
        dtype: str = "float32",
    ) -> TorchGenerator:
        """Load a model (folder, .gguf file or hub id) and, optionally, LoRA adapters over it.

        Args:
            path: What ``slmforge.model.load_causal_lm`` accepts; a peft adapter folder (adapter_config.json,
                no config.json) also works: its base model is loaded and the adapter, named ``default``, is active.
            adapters: Adapter name -> peft adapter folder. The first one is active; switch with ``set_adapter``.
            device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
            dtype: ``float32`` or ``bfloat16``.

        Raises:
            ModelError: The model or an adapter cannot be found or loaded.
        """
        from slmforge.model import load_causal_lm

        folder = Path(str(path)).expanduser()
        adapters = dict(adapters or {})
        if (folder / "adapter_config.json").is_file() and not (folder / "config.json").is_file():
            base = _adapter_base(folder)
            model, tokenizer = load_causal_lm(base, dtype=dtype)
            if (folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file():
                from slmforge.model import load_tokenizer_for

                tokenizer = load_tokenizer_for(folder)
            adapters = {"default": folder, **adapters}
        else:
            model, tokenizer = load_causal_lm(path, dtype=dtype)
        if adapters:
            model = _attach_adapters(model, adapters)
        gen = cls(model, tokenizer, device=device)
        if adapters:
            gen.set_adapter(next(iter(adapters)))
        return gen

    @property
    def adapters(self) -> list[str]:
        """Names of the loaded LoRA adapters (empty without peft)."""
        return list(getattr(self.model, "peft_config", {}) or {})

    @property
    def active_adapter(self) -> str | None:
        """The adapter ``complete``/``chat``/``stream`` generate with; None for the bare base model."""
        if not self.adapters or self._adapter_disabled:
            return None
        active = getattr(self.model, "active_adapter", None)
        return active if isinstance(active, str) else None

    @property
    def context_length(self) -> int | None:  # type: ignore[override]
        """The model's context window (its config's ``max_position_embeddings``), or None when unset."""
        config = getattr(self.model, "config", None)
        for attr in ("context_length", "max_position_embeddings"):
            value = getattr(config, attr, None)
            if isinstance(value, int) and value > 0:
                return value
        return None

    def fim_prompt(self, prefix: str, suffix: str) -> str | None:
        """The fill-in-the-middle prompt with the tokenizer's sentinels (None without them)."""
        from slmforge.tokenizer.fim import tokenizer_fim_prompt

        return tokenizer_fim_prompt(self.tokenizer, prefix, suffix)

    def count_tokens(self, text: str, special: bool = True) -> int:
        """Tokens the tokenizer makes of ``text`` (``special``: with BOS, as a plain prompt gets it)."""
        return len(self.tokenizer(text, add_special_tokens=special)["input_ids"])

    def set_adapter(self, name: str | None) -> None:
        """Generate with the named adapter, or with the bare base model when ``name`` is None.

        Raises:
            GenerateError: No adapter of that name is loaded.
        """
        if name is None:
            self._adapter_disabled = bool(self.adapters)
            return
        if name not in self.adapters:
            loaded = ", ".join(self.adapters) or "none (load some with from_pretrained(adapters=...) or --adapter)"
            raise GenerateError(f"No adapter named {name!r}; loaded adapters: {loaded}.")
        self.model.set_adapter(name)
        self._adapter_disabled = False

    # ------------------------------------------------------------------ Generator

    def complete(self, prompt: str, params: SamplingParams) -> list[Completion]:
        """``params.n`` completions of a plain-text prompt (the tokenizer adds BOS as in training)."""
        return self._run([self.encode(prompt)], params)[0]

    def chat(self, messages: list[Message], params: SamplingParams,
             json_schema: dict[str, Any] | None = None) -> list[Completion]:
        """``params.n`` assistant replies to the conversation, rendered with the chat template.

        Args:
            messages: The conversation.
            params: Sampling.
            json_schema: Constrain each reply to compact JSON valid under this schema (our constrained
                decoding, as the server's ``response_format``); the JSON closes within ``max_new_tokens``.

        Raises:
            GenerateError: The tokenizer has no chat template, the messages are malformed, or the schema
                uses a keyword constrained decoding cannot enforce (or beam search is asked with it).
        """
        ids = self.encode(self.render_chat(messages), special=False)
        return self._run([ids], params, self._constraint(json_schema, params))[0]

    def complete_batch(self, prompts: list[str], params: SamplingParams) -> list[list[Completion]]:
        """``params.n`` completions per prompt, from one left-padded batched ``generate`` call."""
        if not prompts:
            return []
        return self._run([self.encode(p) for p in prompts], params)

    def chat_batch(self, conversations: list[list[Message]], params: SamplingParams) -> list[list[Completion]]:
        """``params.n`` replies per conversation, from one left-padded batched ``generate`` call."""
        if not conversations:
            return []
        return self._run([self.encode(self.render_chat(c), special=False) for c in conversations], params)

    def loglikelihood(self, requests: list[tuple[str, str]], batch_size: int = 8) -> list[float]:
        """Sum of log-probabilities of each continuation given its context (nats).

        The context is tokenized with the tokenizer's special tokens (BOS), the
        continuation without, and the two id lists are joined: scoring the
        continuation's own tokens, as multiple-choice evaluation needs.
        """
        import torch

        out: list[float] = []
        for start in range(0, len(requests), batch_size):
            chunk = requests[start : start + batch_size]
            pairs = [(self.encode(c), self.tokenizer(x, add_special_tokens=False)["input_ids"]) for c, x in chunk]
            width = max(len(a) + len(b) for a, b in pairs)
            pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
            ids = torch.full((len(pairs), width), pad, dtype=torch.long)  # (B, T), right-padded
            attn = torch.zeros_like(ids)
            for row, (a, b) in enumerate(pairs):
                ids[row, : len(a) + len(b)] = torch.tensor(a + b)
                attn[row, : len(a) + len(b)] = 1
            with torch.no_grad():
                logits = self.model(input_ids=ids.to(self.device), attention_mask=attn.to(self.device)).logits
                logp = torch.log_softmax(logits.float(), dim=-1)  # (B, T, V)
            for row, (a, b) in enumerate(pairs):
                positions = torch.arange(len(a) - 1, len(a) + len(b) - 1)
                targets = torch.tensor(b)
                out.append(float(logp[row, positions, targets].sum()) if len(b) else 0.0)
        return out

    def prompt_logprobs(self, ids: list[int], top: int = 0, adapter: str | None = None
                        ) -> list[tuple[float, list[tuple[int, float]]] | None]:
        """Each prompt token's log-probability given the tokens before it, from one forward pass
        (what the OpenAI legacy API returns for ``echo`` with ``logprobs``, and lm-eval scores with).

        Args:
            ids: The prompt's token ids, as given (no BOS is added).
            top: How many most likely alternatives to return per position (0: none).
            adapter: The LoRA adapter to score with; None: the base model.

        Returns:
            None for the first token (nothing precedes it), then (log-probability, [(token id,
            log-probability)] of the ``top`` most likely tokens) per token.
        """
        if not ids:
            return []
        input_ids = torch.tensor([ids], device=self.device)
        kwargs: dict = {}
        base_only = contextlib.nullcontext()
        if self.adapters:
            if adapter is None:
                base_only = self.model.disable_adapter()
            else:
                kwargs["adapter_names"] = [adapter]
        with base_only, torch.inference_mode():
            logits = self.model(input_ids=input_ids, **kwargs).logits[0, :-1].float()
        logp = torch.log_softmax(logits, dim=-1)  # (T-1, V): row i predicts ids[i + 1]
        chosen = logp.gather(1, torch.tensor(ids[1:], device=logp.device).view(-1, 1)).view(-1).tolist()
        alternatives: list[list[tuple[int, float]]] = [[] for _ in chosen]
        if top > 0:
            values, index = torch.topk(logp, min(top, logp.shape[-1]), dim=-1)
            alternatives = [list(zip(i, v)) for i, v in zip(index.tolist(), values.tolist())]
        return [None, *zip(chosen, alternatives)]

    def stream(self, prompt: str | list[Message], params: SamplingParams,
               json_schema: dict[str, Any] | None = None) -> Iterator[str]:
        """Text pieces of one completion (str) or one assistant reply (message list), as they are produced.

        Generation runs in a background thread; stopping the iteration early stops it. ``json_schema``
        constrains the text as in ``chat``.

        Raises:
            GenerateError: n > 1 or beam search (one sequence can be streamed), or no chat template.
        """
        params.validate()
        if params.n != 1 or params.num_beams != 1:
            raise GenerateError(
                f"Streaming returns one sequence as it is produced, so it needs n=1 and num_beams=1 "
                f"(got n={params.n}, num_beams={params.num_beams}); use complete() or chat() for more."
            )
        ids = self.encode(prompt) if isinstance(prompt, str) else self.encode(self.render_chat(prompt), special=False)
        return self._stream(ids, params, self._constraint(json_schema, params))

    # ------------------------------------------------------------------ helpers

    def greedy_steps(self) -> contextlib.AbstractContextManager[None]:
        """A block (in this thread) whose forward passes need only each row's argmax exact, with or without
        the EOS ids masked: plain greedy decoding. The LM head then multiplies in int8 (or bf16) and
        recomputes in fp32 what could be the argmax (``_torch_head``); the argmax is the fp32 product's."""
        return exact_argmax_only(tuple(self.eos_token_ids))

    def render_chat(self, messages: list[Message]) -> str:
        """The prompt text the chat template makes of the messages (see ``_text.render_chat``)."""
        return render_chat(self.tokenizer, messages)

    def encode(self, text: str, special: bool = True) -> list[int]:
        """Token ids of a prompt (``special``: add BOS as in training; False for a rendered chat, which
        already holds its BOS).

        Raises:
            GenerateError: The prompt makes no tokens.
        """
        ids = self.tokenizer(text, add_special_tokens=special)["input_ids"]
        if not ids:
            raise GenerateError("The prompt is empty (and the tokenizer adds no BOS token); give some text.")
        return list(ids)

    def _generation_config(self, params: SamplingParams):
        from transformers import GenerationConfig

        sample = params.temperature > 0
        return GenerationConfig(
            max_new_tokens=params.max_new_tokens,
            # ignore_eos holds EOS back through ``_EosHeldBack`` (in _generate), not min_new_tokens.
            do_sample=sample,
            # Every knob is set, so nothing is filled in from the model folder's generation_config.json.
            # Without sampling they are unused; transformers' defaults (1.0, 50, 1.0) keep it from warning.
            temperature=params.temperature if sample else 1.0,
            top_k=(params.top_k or 0) if sample else 50,
            top_p=(params.top_p or 1.0) if sample else 1.0,
            num_beams=params.num_beams,
            num_return_sequences=params.n,
            repetition_penalty=params.repetition_penalty,
            stop_strings=list(params.stop) or None,
            eos_token_id=self.eos_token_ids or None,
            pad_token_id=self.pad_token_id,
            bos_token_id=self.tokenizer.bos_token_id,
        )

    def _constraint(self, json_schema: dict[str, Any] | None, params: SamplingParams):
        """The compiled constraint for ``json_schema`` (None without one).

        Raises:
            GenerateError: Beam search with a schema, or a schema constrained decoding refuses.
        """
        if json_schema is None:
            return None
        if params.num_beams != 1:
            raise GenerateError("A JSON schema constrains sampled or greedy decoding; set num_beams to 1 with it.")
        from slmforge.generate._constrain import json_schema_constraint

        return json_schema_constraint(self.tokenizer, json_schema, eos_ids=self.eos_token_ids)

    def _generate(self, id_lists: list[list[int]], params: SamplingParams, streamer=None, cancel=None,
                  constraint=None):
        """One ``generate`` call over left-padded prompts (each of its rows walking ``constraint``, where
        one is given). Returns (sequences, prompt width)."""
        width = max(len(ids) for ids in id_lists)
        pad = self.pad_token_id if self.pad_token_id is not None else 0  # masked out either way
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in id_lists], device=self.device)
        mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in id_lists], device=self.device)
        kwargs = {}
        if params.stop:
            kwargs["tokenizer"] = self.tokenizer  # StopStringCriteria needs it
        if cancel is not None:
            from transformers import StoppingCriteriaList

            kwargs["stopping_criteria"] = StoppingCriteriaList([_Cancelled(cancel)])
        processors: list[Any] = []
        if params.ignore_eos and self.eos_token_ids:
            processors.append(_EosHeldBack(width + params.max_new_tokens, self.eos_token_ids))
        if constraint is not None:
            processors.append(_Constrained(constraint, len(id_lists) * params.n, params.max_new_tokens,
                                           self.eos_token_ids))
        if processors:
            from transformers import LogitsProcessorList

            kwargs["logits_processor"] = LogitsProcessorList(processors)
        adapter_off = self.model.disable_adapter() if self._adapter_disabled else contextlib.nullcontext()
        # Plain greedy decoding needs only each step's argmax: the head may then use its certified path.
        argmax_only = self.greedy_steps() if params.plain_greedy and constraint is None else contextlib.nullcontext()
        rng = contextlib.nullcontext()
        if params.seed is not None:
            # Sampling draws from torch's global generator; fork it so a seeded request leaves it as it was.
            cuda = [torch.device(self.device).index or 0] if self.device.startswith("cuda") else []
            rng = torch.random.fork_rng(devices=cuda)
        try:
            with rng, adapter_off, argmax_only, torch.inference_mode():
                if params.seed is not None:
                    torch.manual_seed(params.seed)
                out = self.model.generate(
                    input_ids=input_ids,
                    attention_mask=mask,
                    generation_config=self._generation_config(params),
                    streamer=streamer,
                    **kwargs,
                )
        except (ValueError, RuntimeError, IndexError) as exc:
            raise GenerateError(f"Generation failed: {type(exc).__name__}: {str(exc)[:500]}") from None
        return out, width

    def _run(self, id_lists: list[list[int]], params: SamplingParams, constraint=None) -> list[list[Completion]]:
        params.validate()
        out, width = self._generate(id_lists, params, constraint=constraint)
        rows = [self._completion(row[width:].tolist(), params) for row in out]
        return [rows[i * params.n : (i + 1) * params.n] for i in range(len(id_lists))]

    def _completion(self, generated: list[int], params: SamplingParams) -> Completion:
        eos = set(self.eos_token_ids)
        end = len(generated)
        for i, token in enumerate(generated):
            if token in eos:
                end = i + 1
                break
        else:
            # Rows that finished early (a stop string) are filled with padding up to the batch's length.
            if self.pad_token_id is not None:
                while end and generated[end - 1] == self.pad_token_id:
                    end -= 1
        ids = generated[:end]
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        text, hit = cut_at_stop(text, params.stop)
        stopped = hit or end < params.max_new_tokens or (bool(ids) and ids[-1] in eos)
        return Completion(text=text, tokens=len(ids), finish_reason="stop" if stopped else "length")

    def _stream(self, ids: list[int], params: SamplingParams, constraint=None) -> Iterator[str]:
        from transformers import TextIteratorStreamer

        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        cancel = threading.Event()
        failure: list[BaseException] = []

        def work() -> None:
            try:
                self._generate([ids], params, streamer=streamer, cancel=cancel, constraint=constraint)
            except BaseException as exc:  # handed to the consuming thread below
                failure.append(exc)
                streamer.end()

        thread = threading.Thread(target=work, name="slmforge-generate", daemon=True)
        thread.start()

        def close() -> None:
            cancel.set()
            thread.join()

        yield from cut_stream(streamer, params.stop, close)
        if failure:
            raise failure[0]


class _Constrained:
    """A logits processor that keeps each row of a ``generate`` call inside a constraint: before every
    step it moves each row's ``ConstraintState`` past the token the row took last, then masks the row's
    logits to the ids the state allows. transformers applies it before temperature and top-k/top-p, so
    sampling draws only among allowed tokens. The budget is ``max_new_tokens``: the text closes in time."""

    def __init__(self, constraint, rows: int, budget: int, eos_ids: list[int]) -> None:
        self.states = [constraint.start(budget) for _ in range(rows)]
        self.eos_ids = eos_ids
        self.started = False

    def __call__(self, input_ids, scores):
        if self.started:
            for state, token in zip(self.states, input_ids[:, -1].tolist()):
                if not state.finished:
                    state.advance(token)
        self.started = True
        for row, state in enumerate(self.states):
            state.mask_logits_(scores[row], self.eos_ids)
        return scores


class _EosHeldBack:
    """transformers' ``min_new_tokens`` for ``ignore_eos``, in place: its processor builds a
    vocabulary-sized mask every step (arange, isin and where over all 262,144 entries of Gemma 3)
    where setting the EOS columns to -inf is enough. Placed among the processors where it was,
    before any sampling warper, so greedy and sampled draws are unchanged."""

    def __init__(self, until: int, eos_ids: list[int]) -> None:
        self.until = until  # the sequence length from which EOS may come
        self.eos = torch.tensor(sorted(set(eos_ids)), dtype=torch.long)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if input_ids.shape[-1] < self.until:
            if self.eos.device != scores.device:
                self.eos = self.eos.to(scores.device)  # once, not every step
            scores[:, self.eos] = -torch.inf
        return scores


class _Cancelled:
    """A stopping criterion that ends generation once the stream's consumer has gone."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def _as_list(value) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def _eos_ids(model, tokenizer) -> list[int]:
    """End-of-sequence ids: the model's generation config (often a list: <|eos|> and <|im_end|>), plus the
    tokenizer's end-of-document and end-of-turn tokens, so a chat reply stops at its turn's end."""
    from slmforge.model import stop_token_ids

    config = getattr(model, "generation_config", None)
    ids = _as_list(getattr(config, "eos_token_id", None))
    if not ids:
        ids = _as_list(getattr(model.config, "eos_token_id", None))
    for tid in _as_list(stop_token_ids(tokenizer)):
        if tid not in ids:
            ids.append(tid)
    return ids


def _adapter_base(folder: Path) -> str:
    try:
        base = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"Could not read {folder / 'adapter_config.json'}: {exc}.") from None
    if not base:
        raise ModelError(
            f"{folder} is a LoRA adapter folder, but its adapter_config.json names no base model "
            "(base_model_name_or_path). Pass the base model with --model and the adapter with --adapter."
        )
    if not Path(base).is_absolute() and (folder / base).exists():
        return str(folder / base)
    return base


def _attach_adapters(model, adapters: dict[str, str | Path]):
    from peft import PeftModel

    for name, where in adapters.items():
        if not (Path(where).expanduser() / "adapter_config.json").is_file():
            raise ModelError(
                f"Adapter {name!r}: {where} is not a peft adapter folder (no adapter_config.json). Point at the "
                "folder written by `slmforge train sft` with sft.method lora, or by peft's save_pretrained."
            )
    items = list(adapters.items())
    try:
        peft_model = PeftModel.from_pretrained(model, str(Path(items[0][1]).expanduser()), adapter_name=items[0][0])
        for name, where in items[1:]:
            peft_model.load_adapter(str(Path(where).expanduser()), adapter_name=name)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelError(
            f"Could not load the LoRA adapters {adapters}: {type(exc).__name__}: {str(exc)[:400]}"
        ) from None
    return peft_model
