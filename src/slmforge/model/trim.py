"""``slmforge model trim-vocab``: a model whose vocabulary is only what a domain uses.

A general model's vocabulary is most of a small model's weights (Gemma 3 270M: 262,144 tokens x 640 =
168 M of its 268 M parameters) and most of the bytes read per decoded token on a CPU. Trimming keeps the
tokens the domain corpus encodes to (``slmforge.tokenizer.trim`` says which else must stay), slices the
embedding rows and the LM head rows to them, and renumbers every id that names a token (config,
generation config, tokenizer). On the domain text the tokens are the same, under new ids, and the logits
of the kept tokens are the old ones; text outside the domain falls back to shorter pieces and bytes.
"""

from __future__ import annotations

import itertools
import json
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slmforge._progress import progress_bar
from slmforge.artifacts import ArtifactWriter, model_ref
from slmforge.errors import ModelError

_BATCH = 512


@dataclass
class TrimResult:
    path: Path
    metrics: dict[str, Any]


def _specials(tokenizer: Any, model: Any, keep_tokens: Iterable[str]) -> set[int]:
    """Ids that must stay whatever the corpus says: the tokenizer's special tokens, the tokens its chat
    template writes, the ids the configs name (end of sequence, padding), and ``keep_tokens``."""
    ids = set(tokenizer.all_special_ids)
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else ""
    for token, i in tokenizer.get_added_vocab().items():
        if token and token in template:
            ids.add(i)
    for cfg in (model.config, getattr(model, "generation_config", None)):
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(cfg, name, None) if cfg is not None else None
            ids.update(v for v in (value if isinstance(value, list) else [value]) if isinstance(v, int))
    vocab = tokenizer.get_vocab()
    missing = [t for t in keep_tokens if t not in vocab]
    if missing:
        raise ModelError(f"--keep names tokens the tokenizer does not have: {', '.join(missing[:10])}.")
    return ids | {vocab[t] for t in keep_tokens}


def _used_ids(backend: Any, texts: Iterable[str], progress: bool) -> tuple[set[int], int, int]:
    """The ids the texts encode to, and how many texts and characters there were (one pass, _BATCH at a time)."""
    used: set[int] = set()
    docs = chars = 0
    source = iter(texts)
    with progress_bar(progress) as bar:
        task = bar.add_task("tokenizing the domain text", total=None, info="")
        while batch := list(itertools.islice(source, _BATCH)):
            for enc in backend.encode_batch(batch, add_special_tokens=False):
                used.update(enc.ids)
            docs, chars = docs + len(batch), chars + sum(map(len, batch))
            bar.update(task, advance=len(batch), info=f"{docs:,} texts, {len(used):,} tokens used")
    return used, docs, chars


def _slice_model(model: Any, order: list[int]) -> None:
    """Keep embedding rows and LM-head rows ``order`` (in that order), in place; tied weights stay tied."""
    import torch

    index = torch.tensor(order, dtype=torch.long)
    emb = model.get_input_embeddings()
    emb.weight = torch.nn.Parameter(emb.weight.data.index_select(0, index).clone(), requires_grad=False)
    emb.num_embeddings = len(order)
    head = model.get_output_embeddings()
    tied = head is not None and head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if head is not None:
        if getattr(config, "tie_word_embeddings", False) or tied:
            head.weight = emb.weight
        else:
            head.weight = torch.nn.Parameter(head.weight.data.index_select(0, index).clone(), requires_grad=False)
            if getattr(head, "bias", None) is not None:
                head.bias = torch.nn.Parameter(head.bias.data.index_select(0, index).clone(), requires_grad=False)
        head.out_features = len(order)
    for cfg in {id(model.config): model.config, id(config): config}.values():
        cfg.vocab_size = len(order)


def _renumber_ids(obj: Any, new_id: dict[int, int]) -> None:
    """bos/eos/pad ids of a config or generation config in new ids (an id the trim dropped becomes None)."""
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id"):
        value = getattr(obj, name, None)
        if isinstance(value, list):
            setattr(obj, name, [new_id[v] for v in value if v in new_id])
        elif isinstance(value, int):
            setattr(obj, name, new_id.get(value))


def _verify(old: Any, new: Any, texts: Iterable[str], new_id: dict[int, int]) -> None:
    """The domain text must encode to the same tokens (new ids) and decode to the same text."""
    for text in texts:
        before = old.encode(text, add_special_tokens=False).ids
        after = new.encode(text, add_special_tokens=False).ids
        if after != [new_id[i] for i in before] or new.decode(after) != old.decode(before):
            raise ModelError(f"The trimmed tokenizer encodes this domain text differently (a bug): {text[:200]!r}.")


def trim_vocab(model_spec: str | Path, texts: Iterable[str], out: str | Path, keep_tokens: Iterable[str] = (),
               command: list[str] | None = None, progress: bool = True,
               parents: list[dict[str, str]] | None = None,
               log: Callable[[str], None] | None = None) -> TrimResult:
    """Write a copy of a model whose vocabulary is the tokens ``texts`` use (plus specials and bytes).

    Args:
        model_spec: A model folder, .gguf file or hub id (``load_causal_lm``); its tokenizer must be BPE.
        texts: The domain text (the training split of a dataset artifact, say); read twice, a batch at a time
            (a list, or ``tokenizer.packing.jsonl_texts`` of a split: nothing is held whole).
        out: The output folder (a ``model`` artifact).
        keep_tokens: Tokens to keep even if the text never uses them.
        parents: More lineage entries (the dataset the text came from).

    Raises:
        ModelError: No texts, a tokenizer that is not BPE, or a trimmed tokenizer that would encode the
            domain text differently.
    """
    from tokenizers import Tokenizer

    from slmforge.model import load_causal_lm
    from slmforge.tokenizer import load_tokenizer
    from slmforge.tokenizer.trim import trim_tokenizer

    if next(iter(texts), None) is None:  # before the model loads
        raise ModelError("No domain text to trim the vocabulary to: the dataset's training split is empty.")
    model, tokenizer = load_causal_lm(model_spec)
    backend = tokenizer.backend_tokenizer
    used, docs, chars = _used_ids(backend, texts, progress)
    keep = used | _specials(tokenizer, model, keep_tokens)
    vocab_before, params_before = len(tokenizer), _params(model)
    try:
        tok_json, order = trim_tokenizer(json.loads(backend.to_str()), keep)
    except Exception as exc:
        raise ModelError(f"Cannot trim the vocabulary of {model_spec}: {exc}") from None
    new_id = {old: new for new, old in enumerate(order)}
    new_backend = Tokenizer.from_str(json.dumps(tok_json, ensure_ascii=False))
    _verify(backend, new_backend, itertools.islice(texts, 0, None, max(1, docs // 2000)), new_id)
    _slice_model(model, order)
    _renumber_ids(model.config, new_id)
    if getattr(model, "generation_config", None) is not None:
        _renumber_ids(model.generation_config, new_id)
    with ArtifactWriter(out, kind="model", config={"trim_vocab": {"keep_tokens": list(keep_tokens)}},
                        parents=[model_ref(model_spec), *(parents or [])], command=command) as w:
        model.save_pretrained(w.path)
        tokenizer.save_pretrained(w.path)
        (w.path / "tokenizer.json").write_text(json.dumps(tok_json, ensure_ascii=False), encoding="utf-8")
        _drop_stale_ids(w.path / "tokenizer_config.json", new_id)
        source = Path(str(model_spec))
        if source.is_dir() and (source / "chat_template.jinja").is_file() and not (w.path / "chat_template.jinja").exists():
            shutil.copy(source / "chat_template.jinja", w.path / "chat_template.jinja")
        reloaded = load_tokenizer(w.path)
        if len(reloaded) != len(order):
            raise ModelError(f"The saved tokenizer has {len(reloaded)} tokens, expected {len(order)} (a bug).")
        w.metrics.update({"vocab_before": vocab_before, "vocab_after": len(order),
                          "params_before": params_before, "params_after": _params(model),
                          "domain_texts": docs, "domain_chars": chars})
        if log:
            log(f"vocabulary {vocab_before:,} -> {len(order):,} tokens; parameters {params_before:,} -> "
                f"{_params(model):,}")
    return TrimResult(Path(out).resolve(), dict(w.metrics))


def _params(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())  # a tied weight is one parameter


def _drop_stale_ids(file: Path, new_id: dict[int, int]) -> None:
    """tokenizer_config.json's ``added_tokens_decoder`` (keyed by id, where a tokenizer writes one) renumbered."""
    if not file.is_file():
        return
    data = json.loads(file.read_text(encoding="utf-8"))
    table = data.get("added_tokens_decoder")
    if isinstance(table, dict):
        data["added_tokens_decoder"] = {str(new_id[int(k)]): v for k, v in table.items() if int(k) in new_id}
        file.write_text(json.dumps(data, indent=2, ensure_ascii=False), encoding="utf-8")
