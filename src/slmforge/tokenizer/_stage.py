"""The tokenizer stage: build a tokenizer by one method, then write the artifact.

Imports tokenizers and transformers; ``slmforge.tokenizer`` imports this module
only when a function needs it.
"""

from __future__ import annotations

import json
import re
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.progress import Progress
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from slmforge._progress import progress_bar
from slmforge.artifacts import MANIFEST, ArtifactWriter, output_dir, parent_ref
from slmforge.config import ProjectConfig
from slmforge.errors import TokenizerError
from slmforge.tokenizer import TokenizerResult, TokenizerStats, _dataset_dir, heldout_texts, load_tokenizer
from slmforge.tokenizer._analyze import text_stats
from slmforge.tokenizer._bpe import (
    added_token_entry,
    dumps,
    force_single_tokens,
    is_byte_level_bpe,
    max_id,
    read_merges,
    trimmed_vocab,
    with_merges,
)
from slmforge.tokenizer._chat import chatml_template
from slmforge.tokenizer._corpus import dataset_folder, iter_texts

MODEL_INPUT_NAMES = ["input_ids", "attention_mask"]
HELDOUT_MAX_CHARS = 2_000_000  # enough for stable ratios, bounded time
# Candidate words for domain_terms_top_n: runs of at least 4 letters (a digit, '_' or '.'
# would be split off by the pre-tokenizer anyway), with the space before them if any:
# " word" and "word" are different pre-tokens to a byte-level BPE.
_WORD = re.compile(r"( ?)([^\W\d_]{4,})")


@dataclass
class _Corpus:
    texts: list[str]
    chars: int
    truncated: bool
    words: Counter = field(default_factory=Counter)  # (" " or "", word) -> occurrences


@dataclass
class _Built:
    tokenizer: Any  # transformers PreTrainedTokenizerFast
    domain_terms: list[str]
    metrics: dict[str, Any]


# --------------------------------------------------------------------------- the stage


def run(
    cfg: ProjectConfig,
    data: str | Path | None,
    out: str | Path | None,
    command: list[str] | None,
    progress: bool,
) -> TokenizerResult:
    tcfg = cfg.tokenizer
    explicit_data = data is not None or tcfg.data is not None
    data_dir = Path(data) if data is not None else _dataset_dir(cfg)
    out_dir = Path(out) if out is not None else output_dir(cfg, "tokenizer")
    # extend needs no text unless it must find frequent words; it still uses a dataset when there is one.
    needs_data = tcfg.method == "train" or tcfg.domain_terms_top_n > 0 or explicit_data
    folder = dataset_folder(data_dir) if needs_data or (data_dir / MANIFEST).is_file() else None
    parents = [parent_ref(folder, "dataset")] if folder is not None else []
    build = _METHODS[tcfg.method]

    with progress_bar(progress) as bar:
        corpus = None
        if folder is not None and (tcfg.method == "train" or tcfg.domain_terms_top_n > 0):
            corpus = _read_corpus(folder, tcfg.max_training_chars, tcfg.domain_terms_top_n > 0, bar)
        built = build(cfg, corpus, bar)
        if tcfg.chat_template:
            _check_chat_template(built.tokenizer)
        heldout = _heldout_stats(built.tokenizer, out_dir.name, folder, bar) if folder is not None else None
        config = tcfg.model_dump(mode="json")
        with ArtifactWriter(out_dir, kind="tokenizer", config=config, parents=parents, command=command) as w:
            task = bar.add_task("saving tokenizer", total=1, info="")
            built.tokenizer.save_pretrained(str(w.path))
            analysis = {"split": "val", "stats": heldout}
            (w.path / "analysis.json").write_text(json.dumps(analysis, indent=2) + "\n", encoding="utf-8")
            w.metrics.update(built.metrics)
            w.metrics["heldout"] = _heldout_summary(heldout)
            bar.update(task, completed=1)
    return TokenizerResult(
        path=out_dir.resolve(),
        vocab_size=len(built.tokenizer),
        domain_terms=built.domain_terms,
        metrics=w.metrics,
    )


def _read_corpus(folder: Path, max_chars: int | None, count_words: bool, bar: Progress) -> _Corpus:
    file = folder / "text" / "train.jsonl"
    if not file.is_file():
        raise TokenizerError(
            f"{folder} has no text/train.jsonl, so there is no text to learn the tokenizer from. Re-run "
            "`slmforge data` with `text` in data.formats."
        )
    size = file.stat().st_size
    task = bar.add_task("reading training text", total=max_chars or size, info="")
    texts, chars, cut = [], 0, False
    words: Counter = Counter()
    for text in iter_texts(file):
        if max_chars is not None and chars + len(text) > max_chars:
            text, cut = text[: max_chars - chars], True
        if text:
            texts.append(text)
            chars += len(text)
            if count_words:
                words.update(_WORD.findall(text))
        bar.update(task, completed=min(chars, max_chars or size))
        if cut:
            break
    bar.update(task, completed=max_chars or size)
    if not chars:
        raise TokenizerError(
            f"{file} holds no text (no documents, or all are empty), so there is nothing to learn the "
            "tokenizer from. Check the data stage's sources and filters and re-run `slmforge data`."
        )
    return _Corpus(texts=texts, chars=chars, truncated=cut, words=words)


def _heldout_stats(hf_tokenizer: Any, name: str, folder: Path, bar: Progress) -> dict[str, Any] | None:
    texts = heldout_texts(folder, "val", max_chars=HELDOUT_MAX_CHARS)
    if not texts:
        return None
    task = bar.add_task("held-out analysis", total=1, info=f"{len(texts):,} documents")
    stats = TokenizerStats(**text_stats(name, hf_tokenizer, texts))
    bar.update(task, completed=1)
    return asdict(stats)


def _heldout_summary(stats: dict[str, Any] | None) -> dict[str, Any] | None:
    if stats is None:
        return None
    keys = ("documents", "tokens", "fertility", "chars_per_token", "bytes_per_token", "byte_fallback_rate")
    return {"split": "val", **{k: stats[k] for k in keys}}


# --------------------------------------------------------------------------- method: train


def _train_bpe(cfg: ProjectConfig, corpus: _Corpus | None, bar: Progress) -> _Built:
    """A new byte-level BPE whose final vocabulary, domain terms included, is ``vocab_size``."""
    tcfg = cfg.tokenizer
    assert corpus is not None  # run() reads it for this method
    sp = tcfg.special_tokens
    specials = [sp.bos, sp.eos, sp.pad, sp.chat_start, sp.chat_end]  # ids 0..4, in this order
    if len(set(specials)) != len(specials) or not all(specials):
        raise TokenizerError(
            f"tokenizer.special_tokens must be five different non-empty strings, got {specials}. Fix them in "
            "the project file."
        )

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=tcfg.vocab_size,
        min_frequency=tcfg.min_frequency,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    task = bar.add_task("learning BPE merges", total=None, info=f"{corpus.chars:,} chars")
    tok.train_from_iterator(corpus.texts, trainer=trainer, length=len(corpus.texts))
    bar.update(task, total=1, completed=1)
    trained = json.loads(tok.to_str())
    trained_size = len(trained["model"]["vocab"])

    task = bar.add_task("fitting domain terms", total=None, info="")
    configured = _clean_terms(tcfg.domain_terms, specials)
    top = _top_terms(tok, corpus, tcfg.domain_terms_top_n, exclude=set(configured) | set(specials))
    words, mergeable, added = _split_by_pretokenizer(tok, configured + top, trained["model"]["vocab"])
    fitted, fit_info = _fit_vocab(trained, words, tcfg.vocab_size, len(added), protected=set(specials))
    next_id = max_id(fitted) + 1
    for term in added:
        fitted["added_tokens"].append(added_token_entry(term, next_id, False, normalized=False, single_word=True))
        next_id += 1
    final = Tokenizer.from_str(dumps(fitted))
    bos = sp.bos
    final.post_processor = processors.TemplateProcessing(
        single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, 0)]
    )
    _check_single_tokens(final, mergeable)
    bar.update(task, total=1, completed=1)

    hf = _wrap(final, tcfg)
    notes = []
    if trained_size < tcfg.vocab_size:
        notes.append(
            f"The training text only supported {trained_size} tokens at min_frequency={tcfg.min_frequency}, "
            f"fewer than vocab_size={tcfg.vocab_size}; the vocabulary is smaller than configured. Use more "
            "text, a lower min_frequency or a smaller vocab_size."
        )
    if added:
        notes.append(
            "The pre-tokenizer splits these terms (they mix letters with digits, '_', '.', spaces or other "
            f"symbols), so they cannot be BPE merges and were added as whole-word added tokens: {added}."
        )
    metrics = {
        "method": "train",
        "vocab_size": len(hf),
        "vocab_size_target": tcfg.vocab_size,
        "special_tokens": {name: {"token": tok_, "id": i} for i, (name, tok_) in enumerate(sp.model_dump().items())},
        "domain_terms": configured + top,
        "domain_terms_configured": configured,
        "domain_terms_top": top,
        "domain_merges": fit_info["domain_merges"],
        "trimmed_merges": fit_info["trimmed_merges"],
        "added_tokens": added,
        "training_chars": corpus.chars,
        "training_documents": len(corpus.texts),
        "training_truncated": corpus.truncated,
        "notes": notes,
    }
    return _Built(tokenizer=hf, domain_terms=configured + top, metrics=metrics)


def _fit_vocab(
    trained: dict[str, Any], words: list[str], target: int, n_added: int, protected: set[str]
) -> tuple[dict[str, Any], dict[str, int]]:
    """Drop the last trained merges until trained + forced merges + added tokens == target.

    Each trim changes how the terms split, so the forced merges are recomputed
    every time; the loop ends at the largest prefix of the trained merges that fits.
    """
    vocab = trained["model"]["vocab"]
    merges = read_merges(trained["model"])
    ignore_merges = bool(trained["model"].get("ignore_merges"))

    def attempt(keep: int):
        kept = trimmed_vocab(vocab, merges, keep, protected)
        forced = force_single_tokens(kept, merges[:keep], words, next_id=len(kept), ignore_merges=ignore_merges)
        return len(kept) + len(forced.new_tokens) + n_added, kept, forced

    keep = len(merges)
    total, kept, forced = attempt(keep)
    while total > target:
        if keep == 0:
            raise TokenizerError(
                f"tokenizer.vocab_size = {target} is too small: the 256 byte tokens, the special tokens and "
                f"the domain terms alone need {total}. Raise vocab_size or list fewer domain terms "
                "(domain_terms, domain_terms_top_n)."
            )
        keep = max(0, keep - (total - target))
        total, kept, forced = attempt(keep)
    # A trim can also make the forced merges fewer; take back trained merges while they still fit.
    while keep < len(merges):
        nxt = attempt(keep + 1)
        if nxt[0] > target:
            break
        keep += 1
        total, kept, forced = nxt
    fitted = with_merges(trained, {**kept, **forced.new_tokens}, merges[:keep] + forced.merges)
    return fitted, {"trimmed_merges": len(merges) - keep, "domain_merges": len(forced.merges)}


# --------------------------------------------------------------------------- method: extend


def _extend_base(cfg: ProjectConfig, corpus: _Corpus | None, bar: Progress) -> _Built:
    """The base tokenizer plus the domain terms, as new ids at the end of its vocabulary."""
    tcfg = cfg.tokenizer
    hf, base_ref = _load_base(cfg)
    base_size = len(hf)
    backend = hf.backend_tokenizer

    task = bar.add_task("adding domain terms", total=None, info="")
    existing = dict(hf.get_vocab())
    specials = [str(t) for t in hf.all_special_tokens]
    configured = _clean_terms(tcfg.domain_terms, specials)
    top = _top_terms(backend, corpus, tcfg.domain_terms_top_n, exclude=set(configured) | set(specials))
    terms = configured + top
    ext = _add_terms(hf, terms, existing, base_ref)
    template, new_specials, set_pad = _add_chat_and_pad_tokens(hf, tcfg, ext, existing)
    new = _rebuild(hf, ext.tok_json)
    sp = tcfg.special_tokens
    if set_pad:
        new.pad_token = sp.pad
    markers = [t for t in (sp.chat_start, sp.chat_end) if t in new_specials]
    if markers:
        new.add_special_tokens({"extra_special_tokens": markers}, replace_extra_special_tokens=False)
    new.chat_template = template
    _check_single_tokens(new.backend_tokenizer, ext.mergeable)
    not_single = [t for t in ext.added if not _is_single(new.backend_tokenizer, t, forms=(t,))]
    bar.update(task, total=1, completed=1)

    new_ids = _new_token_ids(existing, new, base_ref)
    notes = []
    if not_single:
        notes.append(f"These terms were added but the tokenizer's normalizer keeps them from matching: {not_single}.")
    domain_terms = [t for t in terms if t not in not_single]
    metrics = {
        "method": "extend",
        "base": base_ref,
        "base_byte_level_bpe": ext.byte_level,
        "base_vocab_size": base_size,
        "vocab_size": len(new),
        "new_token_ids": new_ids,
        "new_tokens": [{"id": i, "token": new.convert_ids_to_tokens(i), "text": new.decode([i])} for i in new_ids],
        "domain_terms": domain_terms,
        "domain_terms_configured": configured,
        "domain_terms_top": top,
        "domain_merges": ext.merges,
        "added_tokens": ext.added,
        "special_tokens_added": new_specials,
        "training_chars": corpus.chars if corpus else 0,
        "training_documents": len(corpus.texts) if corpus else 0,
        "notes": notes,
    }
    return _Built(tokenizer=new, domain_terms=domain_terms, metrics=metrics)


def _load_base(cfg: ProjectConfig) -> tuple[Any, str]:
    """The tokenizer to extend (``tokenizer.base``: a local folder, else a hub id) and how it was named."""
    tcfg = cfg.tokenizer
    if not tcfg.base:
        raise TokenizerError(
            "tokenizer.method is 'extend' but tokenizer.base is not set. Set it to the folder of a Hugging Face "
            "tokenizer (or a hub id when online), or use method: train."
        )
    local = cfg.resolve(tcfg.base)
    base_ref = str(local) if local.exists() else tcfg.base
    return load_tokenizer(base_ref), base_ref


@dataclass
class _Extension:
    """The base's tokenizer.json with the domain terms added (``_add_terms``), and what was added."""

    tok_json: dict[str, Any]
    next_id: int  # the first id still free
    added: list[str]  # terms added as whole-word added tokens
    mergeable: list[str]  # terms made single tokens by new merges (byte-level BPE only)
    merges: int  # merges appended to the base's
    byte_level: bool  # whether the base is a byte-level BPE


def _add_terms(hf, terms: list[str], existing: dict[str, int], base_ref: str) -> _Extension:
    """Make each term a single token: a byte-level BPE gets new merges where the pre-tokenizer keeps a
    term in one piece, and added tokens elsewhere; any other model gets added tokens."""
    backend = hf.backend_tokenizer
    tok_json = json.loads(backend.to_str())
    next_id = max(max_id(tok_json), len(hf) - 1) + 1
    merges_added = 0
    byte_level = is_byte_level_bpe(tok_json)
    if byte_level:
        model = tok_json["model"]
        vocab = _dense_vocab(tok_json, base_ref)
        words, mergeable, added = _split_by_pretokenizer(backend, terms, vocab)
        forced = force_single_tokens(
            vocab, read_merges(model), words, next_id, ignore_merges=bool(model.get("ignore_merges"))
        )
        tok_json = with_merges(tok_json, {**vocab, **forced.new_tokens}, read_merges(model) + forced.merges)
        next_id += len(forced.new_tokens)
        merges_added = len(forced.merges)
    else:
        mergeable = []
        added = [t for t in terms if not _is_single(backend, t)]
    added = [t for t in added if t not in existing]
    for term in added:
        # byte-level: match raw text (normalized=False); others (e.g. a lowercasing WordPiece)
        # match the normalized text, the way their vocabulary does.
        entry = added_token_entry(term, next_id, False, normalized=not byte_level, single_word=True)
        tok_json.setdefault("added_tokens", []).append(entry)
        next_id += 1
    return _Extension(tok_json, next_id, added, mergeable, merges_added, byte_level)


def _add_chat_and_pad_tokens(hf, tcfg, ext: _Extension, existing: dict[str, int]) -> tuple[str, list[str], bool]:
    """Add the special tokens the extended tokenizer still lacks to ``ext``: ChatML's role markers
    when our template replaces a missing one, and a pad token. Returns the chat template (the base's
    unless one is configured), the tokens added and whether the pad token is new."""
    sp = tcfg.special_tokens
    template = tcfg.chat_template or hf.chat_template
    new_specials = []
    if template is None:
        template = chatml_template(sp.chat_start, sp.chat_end)
        new_specials += [sp.chat_start, sp.chat_end]
    set_pad = hf.pad_token is None
    if set_pad:
        new_specials.append(sp.pad)
    new_specials = [t for t in dict.fromkeys(new_specials) if t not in existing]
    for token in new_specials:
        ext.tok_json.setdefault("added_tokens", []).append(added_token_entry(token, ext.next_id, True, False, False))
        ext.next_id += 1
    return template, new_specials, set_pad


def _new_token_ids(existing: dict[str, int], new, base_ref: str) -> list[int]:
    """The ids the extension added, after checking that it moved none of the base's."""
    new_vocab = new.get_vocab()
    moved = [t for t, i in existing.items() if new_vocab.get(t) != i]
    if moved:  # would silently scramble the embedding rows of a pretrained model
        raise TokenizerError(
            f"Internal error: extending {base_ref} changed the ids of existing tokens {moved[:5]}. Please report "
            "this with the base tokenizer; nothing was written."
        )
    return sorted(i for t, i in new_vocab.items() if t not in existing)


def _dense_vocab(tok_json: dict[str, Any], base_ref: str) -> dict[str, int]:
    """The BPE vocabulary with the added tokens that sit between or after its ids
    (like Qwen's specials) written into it, so that new ids can follow them.

    When a tokenizer.json is loaded, tokenizers renumbers added tokens that are not
    in the model's vocabulary to follow it; new merge tokens placed after such
    added tokens would collide with them."""
    vocab = dict(tok_json["model"]["vocab"])
    used = set(vocab.values())
    for entry in tok_json.get("added_tokens") or []:
        if entry["content"] not in vocab and entry["id"] not in used:
            vocab[entry["content"]] = entry["id"]
            used.add(entry["id"])
    if used != set(range(len(vocab))):
        raise TokenizerError(
            f"The vocabulary of {base_ref} has unused ids between its tokens, so new tokens cannot be appended "
            "safely. Use a tokenizer with contiguous ids, or method: train."
        )
    return vocab


def _rebuild(hf: Any, tok_json: dict[str, Any]) -> Any:
    """The base transformers tokenizer (its config kept) with a new tokenizer.json."""
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="slmforge-tok-") as tmp:
        hf.save_pretrained(tmp)
        Path(tmp, "tokenizer.json").write_text(dumps(tok_json), encoding="utf-8")
        new = AutoTokenizer.from_pretrained(tmp)
        new.name_or_path = hf.name_or_path
    return new


_METHODS: dict[str, Callable[[ProjectConfig, _Corpus | None, Progress], _Built]] = {
    "train": _train_bpe,
    "extend": _extend_base,
}


# --------------------------------------------------------------------------- shared helpers


def _wrap(tok: Tokenizer, tcfg: Any) -> Any:
    from transformers import PreTrainedTokenizerFast

    sp = tcfg.special_tokens
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=sp.bos,
        eos_token=sp.eos,
        pad_token=sp.pad,
        extra_special_tokens=[sp.chat_start, sp.chat_end],
        chat_template=tcfg.chat_template or chatml_template(sp.chat_start, sp.chat_end),
        model_input_names=MODEL_INPUT_NAMES,
        clean_up_tokenization_spaces=False,  # decode(encode(x)) == x
    )


def _clean_terms(terms: list[str], specials: list[str]) -> list[str]:
    """Stripped, non-empty, first occurrence only, special tokens left out."""
    stripped = (t.strip() for t in terms)
    return [t for t in dict.fromkeys(stripped) if t and t not in specials]


def _pieces(tok: Tokenizer, text: str) -> list[str]:
    """How the normalizer and pre-tokenizer cut ``text`` before BPE sees it."""
    if tok.normalizer is not None:
        text = tok.normalizer.normalize_str(text)
    if tok.pre_tokenizer is None:
        return [text]
    return [p for p, _ in tok.pre_tokenizer.pre_tokenize_str(text)]


def _split_by_pretokenizer(
    tok: Tokenizer, terms: list[str], vocab: dict[str, int]
) -> tuple[list[str], list[str], list[str]]:
    """Terms that can become one BPE token (both bare and after a space), their
    pre-tokenized forms, and the rest (which must be added tokens)."""
    words, mergeable, added = [], [], []
    for term in terms:
        forms = [_pieces(tok, term), _pieces(tok, " " + term)]
        if all(len(f) == 1 for f in forms) and all(ch in vocab for f in forms for ch in f[0]):
            words += [f[0] for f in forms]
            mergeable.append(term)
        else:
            added.append(term)
    return words, mergeable, added


def _is_single(tok: Tokenizer, term: str, forms: tuple[str, ...] | None = None) -> bool:
    """Whether ``term`` (bare and after a space) encodes as one known token."""
    unk = _unk_token(tok)
    for form in forms or (term, " " + term):
        tokens = tok.encode(form, add_special_tokens=False).tokens
        if len(tokens) != 1 or (unk is not None and tokens[0] == unk):
            return False
    return True


def _check_chat_template(hf_tokenizer: Any) -> None:
    sample = [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]
    try:
        hf_tokenizer.apply_chat_template(sample, tokenize=False, add_generation_prompt=False)
    except Exception as exc:  # jinja2 raises many kinds
        raise TokenizerError(
            f"tokenizer.chat_template does not render a user/assistant conversation: {type(exc).__name__}: "
            f"{exc}. Fix tokenizer.chat_template (Jinja, with `messages` and `add_generation_prompt`) or set it "
            "to null for the built-in ChatML template."
        ) from None


def _unk_token(tok: Tokenizer) -> str | None:
    if hasattr(tok.model, "unk_token"):  # BPE, WordPiece, WordLevel
        return tok.model.unk_token
    unk_id = json.loads(tok.to_str())["model"].get("unk_id")  # Unigram
    return tok.id_to_token(unk_id) if unk_id is not None else None


def _check_single_tokens(tok: Tokenizer, terms: list[str]) -> None:
    bad = [t for t in terms if not _is_single(tok, t)]
    if bad:
        raise TokenizerError(
            f"Internal error: after adding merges these domain terms are still split: {bad}. Please report "
            "this with the project file; as a workaround remove them from tokenizer.domain_terms."
        )


def _top_terms(tok: Tokenizer, corpus: _Corpus | None, n: int, exclude: set[str]) -> list[str]:
    """The ``n`` words of the training text that occur most often in a form
    (bare or after a space) that ``tok`` splits into several tokens."""
    if n == 0 or corpus is None:
        return []
    totals: Counter = Counter()
    for (_, word), count in corpus.words.items():
        if word not in exclude:
            totals[word] += count
    # Only the most frequent words can win; bound the work on large corpora.
    words = [w for w, _ in totals.most_common(max(4096, 64 * n))]
    forms = [f for w in words for f in (w, " " + w)]
    encodings = tok.encode_batch(forms, add_special_tokens=False)
    split_count: Counter = Counter()
    for form, enc in zip(forms, encodings):
        word = form.lstrip(" ")
        if len(enc.ids) > 1:
            split_count[word] += corpus.words[(form[: len(form) - len(word)], word)]
    out = []
    for word, count in split_count.most_common():
        if count == 0 or len(out) == n:
            break
        if len(_pieces(tok, word)) == 1 and len(_pieces(tok, " " + word)) == 1:
            out.append(word)
    return out
