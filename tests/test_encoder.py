"""Encoder heads: metric functions against hand-computed tables, and tiny fresh
encoders that learn an easy classification task and an easy gazetteer NER task."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from slmforge.artifacts import ArtifactWriter, read_manifest, verify_artifact
from slmforge.config import ProjectConfig
from slmforge.errors import ArtifactError, TrainError
from slmforge.train.encoder import classification_metrics, entity_f1, entity_spans, train_encoder

EXE = Path(sys.executable).parent / "slmforge"
TINY_ENCODER = {"hidden_size": 32, "num_layers": 2, "num_heads": 2}
LOOP = {"seq_len": 64, "batch_size": 16, "max_steps": 60, "lr": 3e-3, "warmup_steps": 5, "eval_every": 40,
        "eval_batches": 2, "save_every": 1000, "precision": "fp32", "device": "cpu"}

# --------------------------------------------------------------------------- metrics, by hand


@pytest.mark.parametrize(
    "gold, pred, labels, expected",
    [
        # a: P 1, R 1/2, F 2/3; b: P 2/3, R 1, F 4/5
        (list("aabb"), list("abbb"), ["a", "b"],
         {"accuracy": 0.75, "precision": 5 / 6, "recall": 0.75, "f1": (2 / 3 + 0.8) / 2,
          "confusion": [[1, 1], [0, 2]]}),
        # c is neither gold nor predicted: left out of the macro average
        (list("ab"), list("ab"), ["a", "b", "c"],
         {"accuracy": 1.0, "precision": 1.0, "recall": 1.0, "f1": 1.0, "confusion": [[1, 0, 0], [0, 1, 0], [0, 0, 0]]}),
        # c predicted but never gold: counts, with P = R = F = 0; b absent from both
        (list("aa"), list("ac"), ["a", "b", "c"],
         {"accuracy": 0.5, "precision": 0.5, "recall": 0.25, "f1": 1 / 3,
          "confusion": [[1, 0, 1], [0, 0, 0], [0, 0, 0]]}),
        ([], [], ["a", "b"],
         {"accuracy": 0.0, "precision": 0.0, "recall": 0.0, "f1": 0.0, "confusion": [[0, 0], [0, 0]]}),
    ],
    ids=["two-classes", "absent-class", "false-positive-class", "empty"],
)
def test_classification_metrics(gold, pred, labels, expected):
    m = classification_metrics(gold, pred, labels)
    for key, value in expected.items():
        assert m[key] == (value if key == "confusion" else pytest.approx(value)), key
    assert m["examples"] == len(gold)
    assert sum(c["support"] for c in m["per_class"].values()) == len(gold)


def test_classification_metrics_per_class_and_bad_input():
    m = classification_metrics(list("aabb"), list("abbb"), ["a", "b"])
    assert m["per_class"]["a"] == pytest.approx({"precision": 1.0, "recall": 0.5, "f1": 2 / 3, "support": 2})
    assert m["per_class"]["b"] == pytest.approx({"precision": 2 / 3, "recall": 1.0, "f1": 0.8, "support": 2})
    with pytest.raises(ValueError, match="not in the label list"):
        classification_metrics(["a"], ["z"], ["a", "b"])
    with pytest.raises(ValueError, match="pair up"):
        classification_metrics(["a"], [], ["a"])


@pytest.mark.parametrize(
    "tags, spans",
    [
        (["B-X", "I-X", "I-X", "O", "I-Y", "B-Y", "I-Y"], [("X", 0, 3), ("Y", 4, 5), ("Y", 5, 7)]),
        (["B-PER", "I-LOC"], [("PER", 0, 1), ("LOC", 1, 2)]),  # I- of another type starts an entity
        (["O", "I-LOC", "I-LOC"], [("LOC", 1, 3)]),  # I- without B-
        (["B-LOC", "B-LOC"], [("LOC", 0, 1), ("LOC", 1, 2)]),
        (["O", "MISC", "O"], []),  # no B-/I- prefix: outside
        ([], []),
    ],
)
def test_entity_spans(tags, spans):
    assert entity_spans(tags) == spans


@pytest.mark.parametrize(
    "gold, pred, p, r, f, token_accuracy",
    [
        ([["B-PER", "I-PER", "O", "B-LOC"]], [["B-PER", "I-PER", "O", "B-LOC"]], 1.0, 1.0, 1.0, 1.0),
        ([["B-PER", "I-PER", "O"]], [["B-PER", "O", "O"]], 0.0, 0.0, 0.0, 2 / 3),  # partial span: no credit
        ([["B-PER", "O", "B-LOC"]], [["B-LOC", "O", "B-LOC"]], 0.5, 0.5, 0.5, 2 / 3),  # wrong type
        ([["O", "B-LOC", "I-LOC"]], [["O", "I-LOC", "I-LOC"]], 1.0, 1.0, 1.0, 2 / 3),  # I- without B-: same span
        ([["B-LOC", "B-LOC"]], [["B-LOC", "I-LOC"]], 0.0, 0.0, 0.0, 0.5),  # two entities vs one merged
        ([["B-PER"], ["O"]], [["O"], ["B-PER"]], 0.0, 0.0, 0.0, 0.0),  # same span, other sentence
        ([["B-PER", "O", "B-LOC", "I-LOC"]], [["B-PER", "O", "O", "O"]], 1.0, 0.5, 2 / 3, 0.5),  # a miss
        ([["O", "O"]], [["O", "O"]], 0.0, 0.0, 0.0, 1.0),  # no entities at all
    ],
    ids=["exact", "partial", "wrong-type", "i-without-b", "split-vs-merged", "other-sentence", "missed", "none"],
)
def test_entity_f1(gold, pred, p, r, f, token_accuracy):
    m = entity_f1(gold, pred)
    assert (m["precision"], m["recall"], m["f1"]) == pytest.approx((p, r, f))
    assert m["token_accuracy"] == pytest.approx(token_accuracy)


def test_entity_f1_per_type_and_bad_input():
    m = entity_f1([["B-PER", "O", "B-LOC"]], [["B-LOC", "O", "B-LOC"]])
    assert m["per_type"]["PER"] == pytest.approx({"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1})
    assert m["per_type"]["LOC"] == pytest.approx({"precision": 0.5, "recall": 1.0, "f1": 2 / 3, "support": 1})
    assert (m["entities"], m["predicted_entities"]) == (2, 2)
    with pytest.raises(ValueError, match="sentence 0"):
        entity_f1([["O", "O"]], [["O"]])


# --------------------------------------------------------------------------- a tiny dataset

FRUIT = ["apple", "banana", "cherry", "mango", "peach", "plum", "pear", "grape", "lemon", "melon"]
VEHICLE = ["truck", "bus", "tractor", "van", "bicycle", "train", "scooter", "taxi", "tram", "lorry"]
FRUIT_T = ["I ate a ripe {} after lunch.", "She picked a sweet {} from the tree.", "The {} tasted fresh and juicy.",
           "He sliced the {} for the salad."]
VEHICLE_T = ["The {} stopped at the station.", "We drove the {} along the road.", "A loud {} passed the bridge.",
             "He parked the {} near the garage."]
CITIES = ["Paris", "Berlin", "Madrid", "Oslo", "New York", "San Francisco", "Buenos Aires", "Cape Town", "Rome", "Lima"]
PEOPLE = ["Alice", "Bob", "Carol", "Dmitri", "Erin", "Farah", "Gustav", "Hana"]
NER_T = ["{p} flew from {c} to {d} last week .", "Last year {p} moved to {c} .", "The train from {c} to {d} was late .",
         "{p} said that {c} is lovely in spring .", "We met {p} in {c} ."]


def _tag(words: list[str], kind: str) -> list[str]:
    return [f"B-{kind}"] + [f"I-{kind}"] * (len(words) - 1)


def _ner_record(rng: random.Random, i: int) -> dict:
    template = rng.choice(NER_T)
    fill = {"p": rng.choice(PEOPLE), "c": rng.choice(CITIES), "d": rng.choice(CITIES)}
    tokens, tags = [], []
    for word in template.split():
        key = word[1] if word.startswith("{") else None
        words = fill[key].split() if key else [word]
        tokens += words
        tags += _tag(words, "PER" if key == "p" else "CITY") if key else ["O"]
    return {"id": f"n{i}", "tokens": tokens, "tags": tags}


def _class_record(rng: random.Random, i: int) -> dict:
    label = "fruit" if i % 2 else "vehicle"
    template, nouns = (FRUIT_T, FRUIT) if label == "fruit" else (VEHICLE_T, VEHICLE)
    return {"id": f"c{i}", "text": rng.choice(template).format(rng.choice(nouns)), "label": label}


def make_dataset(root: Path, formats=("text", "classification", "ner"), sizes=None, seed: int = 0) -> Path:
    """A dataset artifact with a learnable signal in each format."""
    rng = random.Random(seed)
    sizes = sizes or {"train": 240, "val": 24, "test": 60}
    folder = root / "data"
    with ArtifactWriter(folder, kind="dataset", config={"synthetic": list(formats)}, command=["test"]) as w:
        texts = []
        for split, n in sizes.items():
            cls = [_class_record(rng, i) for i in range(n)]
            ner = [_ner_record(rng, i) for i in range(n)]
            texts += [r["text"] for r in cls] + [" ".join(r["tokens"]) for r in ner]
            for fmt, rows in (("classification", cls), ("ner", ner)):
                if fmt in formats:
                    (w.path / fmt).mkdir(exist_ok=True)
                    (w.path / fmt / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        if "classification" in formats:
            (w.path / "classification" / "labels.json").write_text(json.dumps(["fruit", "vehicle"]))
        if "ner" in formats:
            (w.path / "ner" / "labels.json").write_text(json.dumps(["O", "B-CITY", "I-CITY", "B-PER", "I-PER"]))
        (w.path / "text").mkdir()
        for split in sizes:  # the tokenizer learns from text/train.jsonl; all of it here, in 8 documents
            docs = [" ".join(texts[k::8]) for k in range(8)] if split == "train" else ["A small held-out text."]
            rows = [{"id": f"t{k}", "text": d, "source": "synthetic"} for k, d in enumerate(docs)]
            (w.path / "text" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def _cfg(root: Path, task: str) -> ProjectConfig:
    cfg = ProjectConfig().rooted_at(root)
    cfg.tokenizer.vocab_size = 400
    cfg.tokenizer.min_frequency = 1
    cfg.encoder.task = task
    for k, v in {**TINY_ENCODER, **LOOP}.items():
        setattr(cfg.encoder, k, v)
    return cfg


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A project folder holding runs/data (every format) and runs/tokenizer."""
    from slmforge.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("encproj")
    make_dataset(root / "runs")
    train_tokenizer(_cfg(root, "classification"), progress=False, command=["test"])
    return root


@pytest.fixture(scope="module")
def classifier(project):
    return train_encoder(_cfg(project, "classification"), progress=False, command=["test"])


# --------------------------------------------------------------------------- training


def test_classifier_learns_and_writes_a_loadable_folder(project, classifier):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    assert classifier.path == (project / "runs" / "encoder-classification").resolve()
    m = read_manifest(classifier.path, "encoder")
    assert verify_artifact(classifier.path) == []
    assert {p["kind"] for p in m.parents} == {"dataset", "tokenizer"}
    assert {"config.json", "model.safetensors", "tokenizer.json", "labels.json", "metrics.json", "log.jsonl",
            "loss.png", "confusion.png"} <= set(m.files)
    assert m.metrics["task"] == "classification" and m.metrics["labels"] == ["fruit", "vehicle"]
    assert m.metrics["examples"] == 240 and m.metrics["eval_split"] == "test" and m.metrics["eval_examples"] == 60
    assert m.metrics["steps"] == 60
    assert m.metrics["accuracy"] >= 0.8, m.metrics  # chance is 0.5
    assert m.metrics["f1"] >= 0.8 and set(m.metrics["f1_per_class"]) == {"fruit", "vehicle"}
    log = [json.loads(line) for line in (classifier.path / "log.jsonl").read_text().splitlines()]
    assert log[-1]["val_loss"] < log[39]["val_loss"] < 0.69  # below chance (ln 2) and still falling
    report = json.loads((classifier.path / "metrics.json").read_text())
    assert sum(map(sum, report["confusion"])) == 60

    from slmforge.artifacts import fingerprint
    from slmforge.train.encoder import encoder_plan

    kind, config, parents = encoder_plan(_cfg(project, "classification"))  # what `slmforge run` compares
    assert fingerprint(kind, config, [p["fingerprint"] for p in parents]) == m.fingerprint
    assert config["seed"] == 0 and config["encoder"]["task"] == "classification"

    # The folder alone (no slmforge) reproduces the reported accuracy.
    model = AutoModelForSequenceClassification.from_pretrained(classifier.path).eval()
    tok = AutoTokenizer.from_pretrained(classifier.path)
    assert model.config.id2label == {0: "fruit", 1: "vehicle"}
    test = [json.loads(line) for line in (project / "runs/data/classification/test.jsonl").read_text().splitlines()]
    with torch.no_grad():
        enc = tok([r["text"] for r in test], padding=True, truncation=True, return_tensors="pt")
        pred = model(**enc).logits.argmax(-1).tolist()
    accuracy = sum(model.config.id2label[p] == r["label"] for p, r in zip(pred, test)) / len(test)
    assert accuracy == pytest.approx(m.metrics["accuracy"], abs=1e-5)


def test_ner_cli_learns_the_gazetteer(project, tmp_path):
    """`slmforge train encoder` as a user runs it, from a project folder with no project file."""
    from transformers import AutoModelForTokenClassification

    sets = [f"encoder.{k}={v}" for k, v in {**TINY_ENCODER, **LOOP, "max_steps": 40}.items()]
    sets += ["encoder.task=ner", f"encoder.data={project / 'runs/data'}",
             f"encoder.tokenizer={project / 'runs/tokenizer'}"]
    args = [str(EXE), "train", "encoder", *(a for s in sets for a in ("--set", s)), "--out", "ner-model"]
    proc = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "accuracy" in proc.stdout and " f1 " in proc.stdout and "(encoder)" in proc.stdout
    out = tmp_path / "ner-model"
    m = read_manifest(out, "encoder")
    assert m.metrics["task"] == "ner" and m.metrics["labels"] == ["O", "B-CITY", "I-CITY", "B-PER", "I-PER"]
    assert m.metrics["f1"] > 0.5, m.metrics  # entity-level, exact spans
    assert set(m.metrics["f1_per_type"]) == {"CITY", "PER"} and m.metrics["entities"] > 60
    assert "confusion.png" not in m.files
    model = AutoModelForTokenClassification.from_pretrained(out)
    assert model.config.id2label[1] == "B-CITY" and model.classifier.out_features == 5


def test_base_encoder_folder_gets_a_new_head(project, classifier, tmp_path):
    """encoder.base: the classifier's folder, fine-tuned for NER (its head is replaced)."""
    cfg = _cfg(project, "ner")
    cfg.encoder.base = str(classifier.path)
    cfg.encoder.max_steps = 3
    res = train_encoder(cfg, out=tmp_path / "from-base", progress=False, command=["test"])
    m = read_manifest(res.path, "encoder")
    assert [p["kind"] for p in m.parents] == ["dataset", "encoder"]
    assert m.metrics["base"] == str(classifier.path) and m.metrics["steps"] == 3
    assert 0.0 <= m.metrics["f1"] <= 1.0 and "accuracy" in m.metrics


def test_long_ner_records_are_split_into_windows_of_whole_words(project):
    """Every word of a record longer than seq_len is still labelled (on its first sub-token)."""
    from slmforge.tokenizer import load_tokenizer
    from slmforge.train.encoder import _encode_ner

    tok = load_tokenizer(project / "runs" / "tokenizer")
    record = _ner_record(random.Random(1), 0)
    record = {"id": "long", "tokens": record["tokens"] * 4, "tags": record["tags"] * 4}
    label2id = {t: i for i, t in enumerate(["O", "B-CITY", "I-CITY", "B-PER", "I-PER"])}
    enc = _encode_ner([record], tok, 10, label2id)
    assert enc.cut_off == 1 and len(enc.windows) > 1
    seen = []
    for (ids, labels), (n, positions) in zip(enc.examples, enc.windows):
        assert n == 0 and len(ids) == len(labels) <= 10 and ids[0] == tok.bos_token_id and labels[0] == -100
        assert [labels[p] for _, p in positions] == [label2id[record["tags"][w]] for w, _ in positions]
        assert sum(y != -100 for y in labels) == len(positions)  # only first sub-tokens carry a tag
        seen += [w for w, _ in positions]
    assert seen == list(range(len(record["tokens"])))
    text = "".join(tok.decode(ids[1:]) for ids, _ in enc.examples)
    assert text == " ".join(record["tokens"])


# --------------------------------------------------------------------------- errors


def test_missing_task_output_says_to_add_the_format(tmp_path):
    with pytest.raises(ArtifactError, match="does not exist"):
        train_encoder(_cfg(tmp_path, "ner"), progress=False)
    make_dataset(tmp_path / "runs", formats=("text", "classification"))
    with pytest.raises(TrainError, match=r"no ner output.*Add ner to data\.formats"):
        train_encoder(_cfg(tmp_path, "ner"), progress=False)


def test_one_label_and_empty_train_split_are_clear_errors(tmp_path):
    data = make_dataset(tmp_path / "runs", formats=("text", "classification"), sizes={"train": 4, "val": 2, "test": 2})
    labels = data / "classification" / "labels.json"
    labels.write_text('["fruit"]')
    with pytest.raises(TrainError, match="needs at least 2"):
        train_encoder(_cfg(tmp_path, "classification"), progress=False)
    labels.write_text('["fruit", "vehicle"]')
    (data / "classification" / "train.jsonl").write_text("")
    with pytest.raises(TrainError, match="has no examples"):
        train_encoder(_cfg(tmp_path, "classification"), progress=False)


def test_the_encoder_trains_data_parallel_too(project):
    """`slmforge train encoder --nproc 2`: two gloo processes learn the task as one does, and one of them scores
    and writes the encoder. (Not the same curve: each process draws its own dropout masks.)"""
    import json as _json
    import os
    import subprocess
    import sys

    from slmforge.config import dump_config

    (project / "ddp.yaml").write_text(dump_config(_cfg(project, "classification")))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SLMFORGE_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}

    def run(out: str, *extra: str) -> list[dict]:
        r = subprocess.run([sys.executable, "-m", "slmforge", "train", "encoder", "-c", str(project / "ddp.yaml"),
                            "--out", str(project / out), "--set", "encoder.batch_size=8", *extra], env=env,
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        return [_json.loads(x) for x in (project / f"{out}-work" / "log.jsonl").read_text().splitlines()]

    one, two = run("enc-one"), run("enc-two", "--nproc", "2")
    assert [r["step"] for r in two] == [r["step"] for r in one]
    assert two[0]["loss"] == pytest.approx(one[0]["loss"], rel=0.02)  # the same start
    assert two[-1]["val_loss"] < 0.25 * two[0]["loss"] and one[-1]["val_loss"] < 0.25 * one[0]["loss"]
    m, m1 = read_manifest(project / "enc-two", "encoder"), read_manifest(project / "enc-one", "encoder")
    assert m.metrics["processes"] == 2 and m.metrics["accuracy"] >= m1.metrics["accuracy"] - 0.1
