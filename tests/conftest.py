"""Shared fixtures: tiny corpora built on the fly (no network, no downloads)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from slmforge.config import ModelConfig

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("SLMFORGE_NO_PROGRESS", "1")

# The tiny random decoder the tests build (2 layers, 32 wide, untied output layer): a forward pass
# takes milliseconds on a CPU, and engines can still be compared token for token on it.
TINY = ModelConfig(preset="custom", hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                   intermediate_size=64, tie_embeddings=False)

PROSE = [
    "The garden was planted in early spring. Tomatoes need full sun and regular watering, "
    "while lettuce prefers a cooler spot with some shade during the hottest part of the day.",
    "A lighthouse keeper once lived alone on the rocky island. Every evening he climbed the stairs "
    "to light the lamp, and every morning he wrote the weather in a small leather notebook.",
    "Bread is made from flour, water, salt and yeast. The dough is kneaded until it is smooth, "
    "left to rise for a few hours, shaped into a loaf and baked in a very hot oven.",
    "The river flows slowly through the valley and into the lake. In the summer children swim near "
    "the old wooden bridge, and in the winter the water is cold and dark.",
    "Trains leave the central station every twenty minutes. Passengers should buy a ticket before "
    "boarding, because the conductor checks every ticket on the way to the coast.",
    "The museum has a large collection of old maps. Some of them show the coast as it was drawn by "
    "sailors who had never seen the land behind the beaches they mapped.",
    "Honey bees live in colonies with one queen and thousands of workers. The workers collect nectar "
    "from flowers and turn it into honey that feeds the colony through the winter.",
    "The orchestra practised for weeks before the concert. On the night of the performance the hall "
    "was full, and the audience stood up to applaud when the last note faded.",
]

LONG_DOC = (
    "The ship left the harbour at dawn with forty passengers and a cargo of wool. For three days the "
    "weather was calm, and the sailors mended ropes while the cook baked bread for everyone on board. "
    "On the fourth morning dark clouds gathered in the west, and the captain ordered the crew to lower "
    "the heavy sails before the storm arrived. Waves crashed over the deck through the night, yet nobody "
    "was hurt and the cargo stayed dry below. When the wind finally dropped, a small island appeared on "
    "the horizon, with white cliffs, a narrow beach and a village of stone houses. The passengers went "
    "ashore to buy fresh water, fruit and eggs, and the children ran along the sand chasing crabs. Two "
    "days later the ship reached the mainland, where merchants were already waiting on the quay."
)


def make_pdf(lines: list[str]) -> bytes:
    """A minimal valid one-page PDF with the given text lines (Helvetica)."""
    ops = ["BT", "/F1 12 Tf", "14 TL", "72 720 Td"]
    for line in lines:
        esc = line.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")
        ops.append(f"({esc}) Tj T*")
    ops.append("ET")
    stream = "\n".join(ops).encode("latin-1")
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
        b"/Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for i, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % i + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    for off in offsets:
        out += b"%010d 00000 n \n" % off
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


def build_mixed_corpus(root: Path) -> dict[str, int]:
    """A folder mixing every supported format plus bad input. Returns the counts a
    correct data stage must report."""
    root.mkdir(parents=True, exist_ok=True)
    footer = "Copyright 2024 Example Gardening Club. All rights reserved."
    # --- prose files, each with PII the scrubber must remove
    (root / "notes.txt").write_text(
        PROSE[0] + "\nWrite to jane.doe+garden@example.com or call +1 (415) 555-0132 for seeds.\n", encoding="utf-8"
    )
    (root / "guide.md").write_text(
        "# Watering guide\n\nWatering is the practice of giving plants water at the roots. "
        + PROSE[1]
        + "\n\n## Payment\n\nThe shop accepted card 4111 1111 1111 1111 from the server at 192.168.10.24 yesterday.\n",
        encoding="utf-8",
    )
    (root / "deploy.rst").write_text(
        "Deployment\n==========\n\n" + PROSE[2] + "\n\nThe old key AKIAIOSFODNN7EXAMPLE was rotated and "
        'api_key = "s3cr3t-V4lue-0123456789abcdef" must never be committed.\n',
        encoding="utf-8",
    )
    # --- three HTML pages sharing navigation and a footer (boilerplate)
    for i, prose in enumerate(PROSE[3:6]):
        (root / f"page{i}.html").write_text(
            f"<html><head><title>Page {i}</title><script>var x = 1;</script></head><body>"
            f"<nav>Home | About | Contact us today</nav><h1>Story {i}</h1><p>{prose}</p>"
            f"<p>{footer}</p></body></html>",
            encoding="utf-8",
        )
    # --- records
    (root / "records.jsonl").write_text(
        '{"text": "%s", "label": "nature"}\n'
        "{this is not json\n"
        '{"text": "%s", "label": "music"}\n'
        '{"tokens": ["Alice", "visited", "Paris", "in", "May", "with", "her", "friend", "from", "school", "and", "they", '
        '"walked", "along", "the", "river"], "tags": ["B-PER", "O", "B-LOC", "O", "O", "O", "O", "O", "O", "O", "O", "O", '
        '"O", "O", "O", "O"], "label": "travel"}\n' % (PROSE[6], PROSE[7]),
        encoding="utf-8",
    )
    (root / "table.csv").write_text(
        "text,label\n"
        '"The kitchen smelled of cinnamon and apples, and the pie cooled slowly on the window sill.",food\n'
        '"The mountain path was steep and narrow, but the view from the top was worth every step.",travel\n',
        encoding="utf-8",
    )
    (root / "module.py").write_text(
        '"""Helpers for the garden planner."""\n\n\ndef water(plant, litres=1.0):\n'
        '    """Water a plant with the given number of litres."""\n    return plant.add_water(litres)\n',
        encoding="utf-8",
    )
    (root / "report.pdf").write_bytes(
        make_pdf(
            [
                "The annual report describes the harvest of the community garden.",
                "Pumpkins and beans grew well, but the strawberries suffered from the late frost.",
            ]
        )
    )
    # --- duplicates
    dup = (
        "The bicycle shop on the corner repairs old frames and sells second-hand wheels to students "
        "who cannot afford new ones, and the owner whistles while he works."
    )
    (root / "dup_a.txt").write_text(dup + "\n")
    (root / "dup_b.txt").write_text("  " + dup.replace(" ", "   ").upper() + "\n\n")
    (root / "near_a.txt").write_text(LONG_DOC)
    (root / "near_b.txt").write_text(LONG_DOC.replace("forty passengers", "fifty passengers"))
    # --- an enormous line inside an otherwise good document
    (root / "longline.txt").write_text(
        "Our village library opens at nine and closes at six; the librarian knows every reader by name "
        "and recommends books with great care.\n" + "x" * 50_000 + "\nA final normal line here.\n")
    # --- bad input
    (root / "empty.md").write_text("")
    (root / "binary.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)) * 4)
    (root / "latin.txt").write_bytes("Caf\xe9 cr\xe8me br\xfbl\xe9e \xe0 la fran\xe7aise ".encode("latin-1") * 20)
    (root / "broken.pdf").write_bytes(b"%PDF-1.4\nthis is not really a pdf at all\n")
    (root / "image.bmp").write_bytes(b"BM" + bytes(100))
    return {
        # documents that become documents (before dedup/filters):
        # notes, guide, deploy, 3 html, 2+1 jsonl, 2 csv, module, pdf, dup_a, dup_b, near_a, near_b, longline
        "documents_in": 1 + 1 + 1 + 3 + 3 + 2 + 1 + 1 + 2 + 2 + 1,
        "duplicate": 1,
        "near_duplicate": 1,
        "long_lines_removed": 1,
        "skipped_empty": 1,
        "skipped_binary": 1,
        "skipped_undecodable": 1,
        "skipped_pdf": 1,
        "skipped_unsupported": 1,
        "skipped_jsonl": 1,
    }


CORPUS_WORDS = ("the of and to in is was for that with as on by at from this are be which or an have it not were has "
                "but had their one all been more when there can who also new other some time into only after first "
                "would these two may its most over such than about then used many where between both under them very "
                "made through each during while known part later river city north market house water light school").split()


def build_shard_corpus(folder: Path, n: int, doc_chars: int, per_shard: int, seed: int, footer: str) -> int:
    """``n`` distinct English-like documents of about ``doc_chars`` characters, each ending in ``footer``
    (formatted with ``i``, the document's number), in shards of ``per_shard`` documents alternating JSONL and
    Parquet; returns the corpus's size in characters. Used by the streaming test and benchmarks/data_scale.py."""
    import json
    import random

    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True)
    rng = random.Random(seed)
    shard: list[str] = []
    chars = 0
    for i in range(n):
        paras, size = [], 0
        while size < doc_chars:
            p = " ".join(rng.choice(CORPUS_WORDS) for _ in range(rng.randint(40, 90))).capitalize() + "."
            paras.append(p)
            size += len(p) + 2
        shard.append("\n\n".join(paras) + footer.format(i=i))
        chars += len(shard[-1])
        if len(shard) == per_shard or i == n - 1:
            k = i // per_shard
            if k % 2:
                pq.write_table(pa.table({"text": shard}), folder / f"shard-{k:05d}.parquet")
            else:
                with open(folder / f"shard-{k:05d}.jsonl", "w", encoding="utf-8") as f:
                    f.writelines(json.dumps({"text": t}) + "\n" for t in shard)
            shard = []
    return chars


def build_tiny_tokenizer(workdir: Path, vocab_size: int) -> Path:
    """A small dataset artifact of shuffled PROSE sentences and a byte-level BPE trained on it
    (the domain tokenizer of the tiny generation, ONNX and GGUF test models)."""
    import json
    import random

    from slmforge.artifacts import ArtifactWriter
    from slmforge.config import ProjectConfig
    from slmforge.tokenizer import train_tokenizer

    rng = random.Random(0)
    sentences = [s.strip() + "." for doc in [*PROSE, LONG_DOC] for s in doc.split(".") if s.strip()]
    with ArtifactWriter(workdir / "runs" / "data", kind="dataset", command=["test"]) as w:
        (w.path / "text").mkdir()
        for split, n in (("train", 300), ("val", 20), ("test", 10)):
            lines = [json.dumps({"id": f"{split}-{i}", "text": " ".join(rng.sample(sentences, 4)), "source": "t"})
                     for i in range(n)]
            (w.path / "text" / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    cfg = ProjectConfig().rooted_at(workdir)
    cfg.tokenizer.vocab_size = vocab_size
    cfg.tokenizer.min_frequency = 1
    return train_tokenizer(cfg, command=["test"], progress=False).path


class CompleteOnly:
    """A scripted Generator written as ``complete`` alone: ``chat`` completes the last message, ``stream``
    yields the whole completion, ``complete_batch`` loops."""

    def chat(self, messages, params):
        return self.complete(messages[-1]["content"], params)

    def stream(self, prompt, params):
        yield self.complete(prompt, params)[0].text

    def complete_batch(self, prompts, params):
        return [self.complete(p, params) for p in prompts]


def tiny_pretrain_config(root: Path, **train):
    """A project rooted at ``root``: 8 python-docs modules, a 400-token BPE, the TINY model, pretraining in
    fp32 on 64-token windows, batches of 4; ``train`` sets more train keys."""
    from slmforge.config import ProjectConfig

    cfg = ProjectConfig().rooted_at(root)
    cfg.data.sources = ["python-docs"]
    cfg.data.python_docs.max_modules = 8
    cfg.data.split.val = 0.1
    cfg.tokenizer.vocab_size = 400
    cfg.tokenizer.domain_terms = []
    cfg.model = TINY.model_copy()
    for key, value in {"seq_len": 64, "batch_size": 4, "eval_batches": 4, "precision": "fp32", **train}.items():
        setattr(cfg.train, key, value)
    return cfg


def build_peaky_model(tokenizer_dir: Path, folder: Path, model_cfg) -> Path:
    """A tiny random Llama on the tokenizer, saved as a model folder, with a sharpened output
    layer (x30) that never picks a special or single-byte token: greedy output is then
    whole-word text with clear margins, so engines can be compared token for token."""
    import torch

    from slmforge.config import GenerateConfig
    from slmforge.model import build_model, save_model_folder
    from slmforge.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    ids = {"bos": tok.bos_token_id, "eos": tok.eos_token_id, "pad": tok.pad_token_id}
    model = build_model(model_cfg, vocab_size=len(tok), special_ids=ids, seed=0)
    with torch.no_grad():
        head = model.get_output_embeddings().weight  # the embedding table itself when tied
        head.mul_(30)
        head[: 5 + 256] = 0  # 5 special tokens, then the 256 byte tokens
    save_model_folder(model, tok, folder, profiles=GenerateConfig().profiles, default_profile="factual")
    return folder


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models run fastest on one thread, and are not slowed by other busy cores."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def mixed_corpus(tmp_path: Path) -> tuple[Path, dict[str, int]]:
    root = tmp_path / "corpus"
    return root, build_mixed_corpus(root)


def build_lora_adapter(model_dir: Path, folder: Path, seed: int) -> Path:
    """A random (non-zero) LoRA adapter over a model folder, saved with peft, naming the model as its base."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    lora = get_peft_model(base, LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj"],
                                           init_lora_weights=False))
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    lora.save_pretrained(folder)
    config = folder / "adapter_config.json"
    import json

    data = json.loads(config.read_text())
    data["base_model_name_or_path"] = str(model_dir)
    config.write_text(json.dumps(data))
    return folder


def build_tiny_embedder(tokenizer_dir: Path, folder: Path) -> Path:
    """A tiny random BERT as a sentence-transformers folder (mean pooling, unit length), 32-d."""
    from sentence_transformers import SentenceTransformer, models
    from transformers import AutoTokenizer, BertConfig, BertModel

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128, pad_token_id=tok.pad_token_id)
    encoder = folder.parent / f"{folder.name}-encoder"
    BertModel(cfg).save_pretrained(encoder)
    tok.save_pretrained(encoder)
    t = models.Transformer(str(encoder), max_seq_length=64)
    st = SentenceTransformer(modules=[t, models.Pooling(t.get_word_embedding_dimension(), "mean"), models.Normalize()])
    st.save(str(folder))
    return folder


class LiveServer:
    """An app served by uvicorn in a background thread on a free 127.0.0.1 port (``with LiveServer(app) as url``)."""

    def __init__(self, app, lifespan: str = "on") -> None:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.app, self.lifespan = app, lifespan
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> str:
        import threading
        import time

        import httpx
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    lifespan=self.lifespan))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return self.url
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.05)

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
