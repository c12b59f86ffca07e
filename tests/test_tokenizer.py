"""The tokenizer stage: a domain byte-level BPE, extending existing tokenizers,
and side-by-side analysis. Everything runs offline on small synthetic text."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from slmforge.artifacts import ArtifactWriter, read_manifest, verify_artifact
from slmforge.config import ProjectConfig
from slmforge.errors import TokenizerError
from slmforge.tokenizer import (
    TokenizerStats,
    analyze_tokenizers,
    format_stats_table,
    heldout_texts,
    load_tokenizer,
    train_tokenizer,
)

VOCAB = 600
TERMS = ["asyncio", "coroutine", "namedtuple", "subprocess"]
UNSPLITTABLE = ["__init__", "os.path"]  # the GPT-2 pre-tokenizer cuts these apart
TOP_N = 8
TRICKY = [
    "héllo wörld — naïve café",
    "日本語のテキスト と 中文 混合",
    "emoji 🤖🚀 and flags 🇩🇪 👩‍👩‍👧",
    "tabs\tand\t\ttabs, runs of    spaces   ",
    "\n\nnewlines\r\n and trailing space ",
    "   leading spaces",
    "def f(x):\n\treturn {'a': [1, 2]}  # ok\n",
    "zero\u200bwidth and combining e\u0301 and \x00 nul",
    "literal <|im_start|> marker text",
]
MESSAGES = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What is asyncio?"},
    {"role": "assistant", "content": "A library for writing coroutines."},
    {"role": "user", "content": "And subprocess?"},
    {"role": "assistant", "content": "It runs other programs."},
]


# --------------------------------------------------------------------------- synthetic corpora

_MODULES = ["asyncio", "dataclasses", "subprocess", "collections", "itertools", "functools", "pathlib", "json"]
_NOUNS = ["coroutine", "iterable", "namedtuple", "dataclass", "generator", "descriptor", "exception", "attribute"]
_VERBS = ["returns", "creates", "raises", "yields", "accepts", "wraps", "schedules", "awaits"]
_ADJS = ["optional", "keyword-only", "positional", "asynchronous", "immutable", "hashable", "nested"]
_JARGON = (  # drawn with Zipf weights, so some are frequent but not all fit in the vocabulary
    "awaitable semaphore serialization interpreter traceback buffering encoding callback timeout protocol "
    "transport selector executor thread queue event condition barrier future handle signal socket stream "
    "reader writer server client request response header cookie session cursor connection transaction "
    "database schema record column index pickle marshal struct array memoryview bytearray frozenset mapping "
    "sequence sentinel closure decorator metaclass property classmethod staticmethod"
).split()
_ZIPF = [1 / (rank + 1) for rank in range(len(_JARGON))]
_PLAIN = ["weather", "garden", "children", "morning", "river", "market", "village", "teacher", "kitchen", "window"]
_PLAIN_VERBS = ["walked", "opened", "watched", "painted", "visited", "cleaned", "followed", "noticed"]


def _domain_doc(rng: random.Random) -> str:
    lines = []
    for _ in range(rng.randint(3, 8)):
        m, n, v, a = rng.choice(_MODULES), rng.choice(_NOUNS), rng.choice(_VERBS), rng.choice(_ADJS)
        lines.append(
            rng.choice(
                [
                    f"The {m} module {v} a {a} {n} when the {n} is ready.",
                    f"    >>> import {m}\n    >>> {m}.run(main())",
                    f"def {m}_{rng.randint(0, 99)}(x, *, key=None):\n    \"\"\"Return the {n}.\"\"\"\n    return x",
                    f"A {n} {v} every {a} {rng.choice(_NOUNS)}; see {m}.{rng.choice(_NOUNS)} for details.",
                    f"Call os.path.join() in __init__ before the {n} {v}.",
                    "Use a {} with the {} and the {}.".format(*rng.choices(_JARGON, _ZIPF, k=3)),
                ]
            )
        )
    return "\n".join(lines)


def _plain_doc(rng: random.Random) -> str:
    return " ".join(
        f"The {rng.choice(_PLAIN)} {rng.choice(_PLAIN_VERBS)} the {rng.choice(_PLAIN)} near the {rng.choice(_PLAIN)}."
        for _ in range(rng.randint(3, 8))
    )


def _write_dataset(folder: Path, make_doc, sizes=(("train", 700), ("val", 60), ("test", 20))) -> Path:
    rng = random.Random(0)
    with ArtifactWriter(folder, kind="dataset", command=["test"]) as w:
        (w.path / "text").mkdir()
        for split, n in sizes:
            lines = [json.dumps({"id": f"{split}-{i}", "text": make_doc(rng), "source": "test"}) for i in range(n)]
            (w.path / "text" / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def _config(base_dir: Path, **tokenizer) -> ProjectConfig:
    cfg = ProjectConfig().rooted_at(base_dir)
    for key, value in tokenizer.items():
        setattr(cfg.tokenizer, key, value)
    return cfg


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tok")


@pytest.fixture(scope="module")
def domain_data(workdir) -> Path:
    return _write_dataset(workdir / "runs" / "data", _domain_doc)


@pytest.fixture(scope="module")
def trained(workdir, domain_data):
    """The domain tokenizer, trained through the default paths of the project."""
    cfg = _config(workdir, vocab_size=VOCAB, domain_terms=TERMS + UNSPLITTABLE, domain_terms_top_n=TOP_N)
    return train_tokenizer(cfg, command=["slmforge", "tokenizer", "train"], progress=False)


@pytest.fixture(scope="module")
def tok(trained):
    return load_tokenizer(trained.path)


@pytest.fixture(scope="module")
def generic(workdir):
    """A tiny byte-level BPE trained on plain English: the generic baseline."""
    data = _write_dataset(workdir / "plain-data", _plain_doc, (("train", 300), ("val", 10)))
    cfg = _config(workdir, vocab_size=300)
    return train_tokenizer(cfg, data=data, out=workdir / "generic", progress=False).path


@pytest.fixture(scope="module")
def wordpiece(workdir) -> Path:
    """A BERT-style WordPiece folder: lowercasing, an [UNK] token, no byte fallback."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(1)
    wp = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    wp.normalizer = normalizers.BertNormalizer(lowercase=True)
    wp.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    wp.decoder = decoders.WordPiece()
    specials = ["[UNK]", "[PAD]", "[CLS]", "[SEP]", "[MASK]"]
    wp.train_from_iterator(
        [_plain_doc(rng) for _ in range(200)],
        trainers.WordPieceTrainer(vocab_size=300, special_tokens=specials, show_progress=False),
    )
    folder = workdir / "wordpiece"
    PreTrainedTokenizerFast(
        tokenizer_object=wp,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_input_names=["input_ids", "attention_mask"],
    ).save_pretrained(folder)
    return folder


# --------------------------------------------------------------------------- train


def test_round_trip_is_exact_on_tricky_unicode(tok):
    for text in TRICKY:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
        with_bos = tok(text)["input_ids"]
        assert tok.decode(with_bos, skip_special_tokens=True) == text.replace("<|im_start|>", "")


def test_round_trip_is_exact_on_random_unicode(tok):
    rng = random.Random(7)
    ranges = [range(0x20, 0x180), range(0x3040, 0x30A0), range(0x4E00, 0x4E40), range(0x1F600, 0x1F640)]
    pool = [chr(c) for r in ranges for c in r]
    pool += ["\n", "\t", "\r", " ", "  ", "\u00a0", "\u200d"]
    for _ in range(300):
        text = "".join(rng.choice(pool) for _ in range(rng.randint(0, 30)))
        assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text


def test_configured_domain_terms_are_single_tokens_bare_and_after_a_space(tok, trained):
    for term in TERMS:
        assert tok.tokenize(term) == [term]
        assert tok.tokenize(" " + term) == ["\u0120" + term]  # GPT-2's stand-in for the space
        assert tok.tokenize(f"({term})") == ["(", term, ")"]
    assert set(TERMS) <= set(trained.domain_terms)
    # a real BPE vocabulary: the terms are merges, not added tokens
    added = {t.content for t in tok.added_tokens_decoder.values()}
    assert not added & set(TERMS)


def test_top_n_frequent_words_become_single_tokens(tok, trained):
    top = trained.metrics["domain_terms_top"]
    assert 0 < len(top) <= TOP_N
    assert not set(top) & set(TERMS)
    for word in top:
        assert len(tok(" " + word, add_special_tokens=False)["input_ids"]) == 1
        assert len(tok(word, add_special_tokens=False)["input_ids"]) == 1
    assert trained.domain_terms == TERMS + UNSPLITTABLE + top


def test_terms_the_pre_tokenizer_splits_become_whole_word_added_tokens(tok, trained):
    assert trained.metrics["added_tokens"] == UNSPLITTABLE
    assert any("added tokens" in note for note in trained.metrics["notes"])
    pieces = tok.tokenize("Call os.path.join() in __init__ now")
    assert "os.path" in pieces and "__init__" in pieces
    assert tok.decode(tok("Call os.path.join() in __init__ now", add_special_tokens=False)["input_ids"]) == (
        "Call os.path.join() in __init__ now"
    )


def test_vocabulary_is_exactly_the_configured_size(tok, trained):
    assert len(tok) == VOCAB == trained.vocab_size == trained.metrics["vocab_size"]
    assert sorted(tok.get_vocab().values()) == list(range(VOCAB))  # dense ids, nothing beyond
    # the domain terms displaced the last trained merges
    assert trained.metrics["trimmed_merges"] > 0
    assert trained.metrics["trimmed_merges"] == trained.metrics["domain_merges"] + len(UNSPLITTABLE)


def test_special_tokens_have_the_configured_ids_and_bos_is_prepended(tok):
    sp = ProjectConfig().tokenizer.special_tokens
    assert tok.convert_tokens_to_ids([sp.bos, sp.eos, sp.pad, sp.chat_start, sp.chat_end]) == [0, 1, 2, 3, 4]
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2)
    ids = tok("hello asyncio")["input_ids"]
    assert ids[0] == 0 and ids.count(0) == 1
    assert tok("hello asyncio", add_special_tokens=False)["input_ids"] == ids[1:]


def test_folder_loads_offline_and_renders_the_chat_template(trained, monkeypatch):
    from transformers import AutoTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    auto = AutoTokenizer.from_pretrained(trained.path)
    text = auto.apply_chat_template(MESSAGES[:3], tokenize=False)
    assert text == (
        "<|bos|><|im_start|>system\nAnswer briefly.<|im_end|>\n"
        "<|im_start|>user\nWhat is asyncio?<|im_end|>\n"
        "<|im_start|>assistant\nA library for writing coroutines.<|im_end|>\n"
    )
    prompt = auto.apply_chat_template(MESSAGES[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>user\nWhat is asyncio?<|im_end|>\n<|im_start|>assistant\n")
    enc = auto.apply_chat_template(MESSAGES[:2], tokenize=True, add_generation_prompt=True)
    ids = enc["input_ids"]
    assert ids[0] == 0 and ids.count(0) == 1  # BOS from the template, not twice
    assert ids.count(3) == 3 and ids.count(4) == 2
    assert auto.decode(ids) == prompt
    assert (trained.path / "chat_template.jinja").is_file()


def test_assistant_mask_marks_exactly_the_assistant_replies(tok):
    enc = tok.apply_chat_template(MESSAGES, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = enc["input_ids"], enc["assistant_masks"]
    assert len(mask) == len(ids)
    spans, current = [], []
    for token_id, m in zip(ids, mask):
        if m:
            current.append(token_id)
        elif current:
            spans.append(current)
            current = []
    if current:
        spans.append(current)
    # the reply and its end-of-turn marker (so a fine-tuned model learns to stop); never the prompt
    assert [tok.decode(s) for s in spans] == [
        "A library for writing coroutines.<|im_end|>",
        "It runs other programs.<|im_end|>",
    ]


def test_manifest_lineage_and_files(trained, domain_data):
    m = read_manifest(trained.path, kind="tokenizer")
    assert verify_artifact(trained.path) == []
    assert [(p["kind"], Path(p["path"])) for p in m.parents] == [("dataset", domain_data.resolve())]
    assert m.parents[0]["fingerprint"] == read_manifest(domain_data).fingerprint
    assert set(m.files) == {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "analysis.json"}
    assert m.command == ["slmforge", "tokenizer", "train"]
    assert m.config["vocab_size"] == VOCAB and m.metrics == trained.metrics
    assert m.metrics["training_documents"] == 700 and m.metrics["training_chars"] > 100_000
    analysis = json.loads((trained.path / "analysis.json").read_text())
    assert analysis["split"] == "val" and analysis["stats"]["documents"] == 60
    assert analysis["stats"]["fertility"] >= 1 and m.metrics["heldout"]["fertility"] == analysis["stats"]["fertility"]
    assert m.metrics["heldout"]["chars_per_token"] > 2


def test_domain_terms_are_merges_appended_after_the_trained_ones(trained):
    model = json.loads((trained.path / "tokenizer.json").read_text())["model"]
    # tokenizers 0.23 writes merges as [left, right] pairs
    assert model["type"] == "BPE" and all(isinstance(p, list) and len(p) == 2 for p in model["merges"])
    tail = model["merges"][-trained.metrics["domain_merges"] :]
    forms = [f for t in TERMS + trained.metrics["domain_terms_top"] for f in (t, "\u0120" + t)]
    # each forced merge joins the first two pieces of a term, so it makes a prefix of one
    assert all(any(f.startswith(a + b) for f in forms) for a, b in tail)
    # their tokens take the highest ids of the BPE vocabulary; only the added tokens come after
    assert max(model["vocab"].values()) == VOCAB - len(UNSPLITTABLE) - 1
    assert {model["vocab"][a + b] for a, b in tail} >= set(range(VOCAB - len(UNSPLITTABLE) - 5, VOCAB - 2))


def test_max_training_chars_limits_the_training_text(workdir, domain_data):
    cfg = _config(workdir, vocab_size=300, max_training_chars=20_000)
    result = train_tokenizer(cfg, out=workdir / "small", progress=False)
    assert result.metrics["training_chars"] == 20_000 and result.metrics["training_truncated"] is True
    assert result.vocab_size == 300


def test_vocab_size_too_small_for_the_domain_terms_is_a_clear_error(workdir, domain_data):
    rng = random.Random(3)
    long_terms = ["".join(rng.choice("qxzjkvw") for _ in range(12)) for _ in range(10)]  # ~11 merges each
    cfg = _config(workdir, vocab_size=300, domain_terms=long_terms)
    with pytest.raises(TokenizerError, match=r"vocab_size = 300 is too small"):
        train_tokenizer(cfg, out=workdir / "never", progress=False)
    assert not (workdir / "never").exists()


def test_a_broken_configured_chat_template_is_a_clear_error(workdir, domain_data):
    cfg = _config(workdir, vocab_size=300, chat_template="{% for m in messages %}{{ m.content | nosuchfilter }}")
    with pytest.raises(TokenizerError, match="tokenizer.chat_template does not render"):
        train_tokenizer(cfg, out=workdir / "never", progress=False)


# --------------------------------------------------------------------------- extend


def test_extend_byte_level_appends_merges_with_new_ids_at_the_end(workdir, generic, domain_data):
    base = load_tokenizer(generic)
    cfg = _config(workdir, method="extend", base=str(generic), domain_terms=["asyncio", "coroutine", "os.path"])
    result = train_tokenizer(cfg, out=workdir / "extended-bpe", progress=False)
    new = load_tokenizer(result.path)
    m = result.metrics
    assert m["base_vocab_size"] == len(base) == 300 and m["vocab_size"] == len(new) > 300
    assert m["new_token_ids"] == list(range(len(base), len(new)))
    assert all(new.get_vocab()[t] == i for t, i in base.get_vocab().items())  # old rows keep their meaning
    for term in ("asyncio", "coroutine"):
        assert len(new(" " + term, add_special_tokens=False)["input_ids"]) == 1
        assert len(new(term, add_special_tokens=False)["input_ids"]) == 1
    assert m["domain_merges"] > 0 and m["added_tokens"] == ["os.path"] and "os.path" in new.tokenize("x os.path y")
    assert new.chat_template == base.chat_template and new.bos_token == base.bos_token
    for text in TRICKY:
        assert new.decode(new(text, add_special_tokens=False)["input_ids"]) == text
    assert read_manifest(result.path).parents[0]["kind"] == "dataset"  # the default data folder exists
    assert verify_artifact(result.path) == []


def test_extend_wordpiece_adds_tokens_and_a_chat_template(workdir, wordpiece):
    base = load_tokenizer(wordpiece)
    cfg = _config(workdir, method="extend", base=str(wordpiece), domain_terms=["asyncio", "coroutine"])
    result = train_tokenizer(cfg, data=workdir / "runs" / "data", out=workdir / "extended-wp", progress=False)
    new = load_tokenizer(result.path)
    m = result.metrics
    assert m["base_byte_level_bpe"] is False and m["domain_merges"] == 0
    assert m["added_tokens"] == ["asyncio", "coroutine"]
    assert m["special_tokens_added"] == ["<|im_start|>", "<|im_end|>"]  # the base had no chat template
    assert m["new_token_ids"] == list(range(len(base), len(base) + 4)) and len(new) == len(base) + 4
    pieces = new.tokenize("Then AsyncIO. Not a coroutine.")  # an uncased base: terms match after lowercasing
    assert "asyncio" in pieces and "coroutine" in pieces and pieces[-1] == "."
    chat = new.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert "<|im_start|>user\nhi<|im_end|>" in chat


def test_extend_with_a_hub_id_while_offline_names_the_model(workdir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = _config(workdir, method="extend", base="some-org/some-model", domain_terms=["asyncio"])
    with pytest.raises(TokenizerError, match=r"'some-org/some-model'.*HF_HUB_OFFLINE"):
        train_tokenizer(cfg, out=workdir / "never", progress=False)
    assert not (workdir / "never").exists()


def test_extend_without_a_base_says_what_to_set(workdir):
    cfg = _config(workdir, method="extend")
    with pytest.raises(TokenizerError, match="tokenizer.base is not set"):
        train_tokenizer(cfg, out=workdir / "never", progress=False)


# --------------------------------------------------------------------------- analyze


def test_analyze_compares_tokenizers_side_by_side(trained, generic, wordpiece, domain_data):
    texts = heldout_texts(domain_data) + ["emoji 🤖 and 日本語 in the text"]
    stats = analyze_tokenizers([trained.path, generic, wordpiece], texts)
    assert [s.name for s in stats] == ["tokenizer", "generic", "wordpiece"]
    assert all(isinstance(s, TokenizerStats) and s.fertility >= 1 for s in stats)
    assert len({(s.documents, s.words, s.chars, s.bytes) for s in stats}) == 1  # same texts for all
    domain, plain, wp = stats
    assert domain.fertility < plain.fertility and domain.chars_per_token > plain.chars_per_token
    assert domain.bytes > domain.chars  # multi-byte characters counted in bytes
    assert domain.unk_rate == 0 and 0 < domain.byte_fallback_rate < 0.01  # the emoji/CJK bytes
    assert wp.unk_rate > 0 and wp.byte_fallback_rate == wp.unk_rate
    table = format_stats_table(stats)
    lines = table.splitlines()
    assert lines[0] == "| measure | tokenizer | generic | wordpiece |"
    assert len(lines) == 12 and all(line.count("|") == 5 for line in lines)
    assert f"{domain.fertility:.3f}" in next(line for line in lines if line.startswith("| fertility"))


def test_heldout_texts_respects_max_chars_and_splits(domain_data):
    texts = heldout_texts(domain_data, "test", max_chars=1000)
    assert sum(map(len, texts)) == 1000
    assert len(heldout_texts(domain_data, "test")) == 20
    with pytest.raises(TokenizerError, match="Unknown split"):
        heldout_texts(domain_data, "dev")


# --------------------------------------------------------------------------- errors


def test_missing_data_artifact_is_a_clear_error(tmp_path):
    with pytest.raises(TokenizerError) as err:
        train_tokenizer(_config(tmp_path), progress=False)
    message = str(err.value)
    assert str(tmp_path / "runs" / "data") in message and "slmforge data" in message
    assert not (tmp_path / "runs" / "tokenizer").exists()


def test_dataset_without_training_text_is_a_clear_error(tmp_path):
    data = _write_dataset(tmp_path / "empty", _plain_doc, (("train", 0), ("val", 3)))
    with pytest.raises(TokenizerError, match="no text"):
        train_tokenizer(_config(tmp_path), data=data, progress=False)


def test_load_tokenizer_errors_say_what_is_wrong(tmp_path):
    with pytest.raises(TokenizerError, match="does not exist"):
        load_tokenizer(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TokenizerError, match="holds no tokenizer"):
        load_tokenizer(tmp_path / "empty")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="Could not load"):
        load_tokenizer(tmp_path / "broken")


def test_importing_the_package_stays_light():
    code = "import sys, slmforge.tokenizer; print(sorted({'tokenizers', 'transformers', 'torch'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
