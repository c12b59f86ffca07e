"""The smiles and protein recipes: their templates validate, and their stages run on tiny slices with
tiny models through `slmforge run` and `slmforge bio`, each writing an artifact with a manifest."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("rdkit")
pytest.importorskip("Bio")
pytest.importorskip("sklearn")

from slmforge.config import init_project, load_config, render_template  # noqa: E402
from slmforge.pipeline import is_current, run_pipeline  # noqa: E402

# Ring systems x side chains: ~100 distinct molecules over 12 scaffolds.
RINGS = ["c1ccccc1", "C1CCCCC1", "c1ccncc1", "C1CCOC1", "c1ccsc1", "C1CCNCC1", "c1ccc2ccccc2c1", "C1CC1",
         "c1ccoc1", "C1CCCC1", "c1cncnc1", "C1CCSCC1"]
CHAINS = ["C", "CC", "CCO", "CCN", "CC(C)", "ClCC", "OC", "CC(=O)"]

FASTA = "".join(f">p{i} made-up\n{seq}\n" for i, seq in enumerate([
    "MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQAPILSRVGDGTQDNLSGAEKAVQVKVKALPDAQ",
    "MSDNELKQKVTEALKELEKNGIKVTQIAKELGLSESTISRWLKGEGKLSAEVLDKLIDLLNS",
    "MAHHHHHHVDDDDKMLEKKLAELEKELAKLKEENAKLKEELGG",
    "MTEYKLVVVGAGGVGKSALTIQLIQNHFVDEYDPTIEDSYRKQVVIDGETCLLDILDTAGQEEY",
    "MGSSHHHHHHSSGLVPRGSHMASMTGGQQMGRGSEFELRRQACGRTRAPPPPPLRSGC",
    "MKKLLPTAAAGLLLLAAQPAMAQVQLQESGPGLVKPSETLSLTCTVSGGSISSYYWSWIRQ",
    "MSKGEELFTGVVPILVELDGDVNGHKFSVSGEGEGDATYGKLTLKFICTTGKLPVPWPTLVTTF",
    "MQIFVKTLTGKTITLEVEPSDTIENVKAKIQDKEGIPPDQQRLIFAGKQLEDGRTLSDYNIQKESTLHLVLRLRGG",
    "MVLSPADKTNVKAAWGKVGAHAGEYGAEALERMFLSFPTTKTYFPHFDLSHGSAQVKGHGKKVADALTNAVAH",
    "MVHLTPEEKSAVTALWGKVNVDEVGGEALGRLLVVYPWTQRFFESFGDLSTPDAVMGNPKVKAHGKKVLGAF",
]))


@pytest.mark.parametrize("template", ["smiles", "protein"])
def test_bio_templates_validate_and_document_every_key(tmp_path, template):
    path = init_project(tmp_path, template)
    cfg = load_config(path)
    text = path.read_text()
    assert cfg.bio.kind == template
    for key in ("bio:", "kind:", "sources:", "sample:", "mlm:", "property:", "mask_rate:", "ridge_alphas:"):
        assert key in text
    assert cfg.project.stages[:2] == ["bio-data", "bio-tokenizer"]
    assert render_template(template) == text
    if template == "smiles":
        assert cfg.train.data == "runs/bio-data" and cfg.train.tokenizer == "runs/bio-tokenizer"
        assert "bio-property" in cfg.project.stages and cfg.bio.data.sources == ["rdkit-nci"]
    else:
        assert cfg.project.stages[-1] == "bio-mlm" and cfg.bio.data.sources == ["biopython-tests"]


def _tiny_smiles_project(root: Path) -> Path:
    (root / "mols.smi").write_text("".join(f"{chain}{ring} m{i}\n" for i, (chain, ring) in
                                           enumerate((c, r) for r in RINGS for c in CHAINS)) + "C1CC broken\n")
    (root / "props.csv").write_text("smiles,value\n" + "".join(
        f"{'C' * k}{ring},{k}\n" for ring in RINGS for k in range(1, 9)))
    path = init_project(root, "smiles")
    text = path.read_text().replace("sources: [rdkit-nci]", "sources: [mols.smi]")
    path.write_text(text)
    return path


TINY_SMILES = [
    "model.preset=custom", "model.hidden_size=32", "model.num_layers=2", "model.num_heads=2", "model.num_kv_heads=2",
    "model.intermediate_size=64", "train.max_steps=12", "train.seq_len=32", "train.batch_size=8", "train.compile=false",
    "train.eval_every=6", "train.save_every=6", "train.precision=fp32", "bio.sample.n=24", "bio.sample.max_new_tokens=40",
    "bio.property.source=props.csv", "bio.property.hidden_size=32", "bio.property.num_layers=1",
    "bio.property.num_heads=2", "bio.property.max_steps=10", "bio.property.seq_len=32", "bio.property.precision=fp32",
    "bio.data.split.val=0.15", "bio.data.split.test=0.15",
]


def test_augmented_training_smiles_spell_the_same_molecules_and_held_out_stays_canonical(tmp_path):
    from slmforge.bio.chem import canonical_smiles
    from slmforge.bio.stages import data_plan, make_bio_data, read_records
    from slmforge.data import read_jsonl

    path = _tiny_smiles_project(tmp_path)
    plain = load_config(path, [*TINY_SMILES, "bio.data.augment=1"])
    assert "augment" not in data_plan(plain).config["data"]  # at its default: existing datasets stay current
    assert load_config(path).bio.data.augment == 5  # the smiles template's choice
    cfg = load_config(path, [*TINY_SMILES, "bio.data.augment=3"])
    data = make_bio_data(cfg).path
    records = read_records(data, "train")
    texts = [r["text"] for r in read_jsonl(data / "text" / "train.jsonl")]
    assert len(records) < len(texts) <= 3 * len(records)
    assert {canonical_smiles(t) for t in texts} == {r["smiles"] for r in records}
    assert len(set(texts)) == len(texts)  # the random spellings differ from the canonical one and each other
    for split in ("val", "test"):
        assert [r["text"] for r in read_jsonl(data / "text" / f"{split}.jsonl")] == [
            r["smiles"] for r in read_records(data, split)]
    assert make_bio_data(cfg).path == data and texts == [r["text"] for r in read_jsonl(data / "text" / "train.jsonl")]


@pytest.mark.integration
def test_smiles_recipe_runs_end_to_end_and_resumes(tmp_path, one_torch_thread):
    path = _tiny_smiles_project(tmp_path)
    cfg = load_config(path, TINY_SMILES)
    outcomes = run_pipeline(cfg)
    assert [o.stage for o in outcomes] == ["bio-data", "bio-tokenizer", "train", "bio-sample", "bio-property"]
    runs = tmp_path / "runs"
    data = json.loads((runs / "bio-data" / "manifest.json").read_text())
    assert data["kind"] == "dataset" and data["metrics"]["invalid"] == 1 and data["metrics"]["shared_scaffolds"] == 0
    assert (runs / "bio-data" / "text" / "train.jsonl").is_file()
    assert (runs / "bio-tokenizer" / "tokenizer.json").is_file()
    sample = json.loads((runs / "bio-sample" / "manifest.json").read_text())["metrics"]
    assert sample["samples"] == 24 and 0 <= sample["validity"] <= 1 and set(sample["properties"]) == {
        "MW", "logP", "QED", "TPSA"}
    assert (runs / "bio-sample" / "properties.png").stat().st_size > 1000
    prop = json.loads((runs / "bio-property" / "manifest.json").read_text())["metrics"]
    assert set(prop["scores"]) == {"encoder", "fingerprint_ridge", "mean"} and prop["shared_scaffolds"] == 0
    assert {"rmse", "r2"} <= set(prop["scores"]["mean"]["test"])
    assert (runs / "bio-property" / "predictions.jsonl").is_file() and (runs / "bio-property" / "config.json").is_file()
    assert all(is_current(cfg, s) for s in cfg.project.stages)
    again = run_pipeline(cfg)  # everything current: nothing re-runs
    assert {o.status for o in again} == {"up to date"}

    # A SMILES masked LM as the property encoder's starting point (bio.property.base).
    from slmforge.bio import train_mlm, train_property
    from slmforge.config import with_overrides

    warm = with_overrides(cfg, ["bio.mlm.hidden_size=32", "bio.mlm.num_layers=1", "bio.mlm.num_heads=2",
                                "bio.mlm.max_steps=6", "bio.mlm.seq_len=32", "bio.mlm.precision=fp32",
                                "bio.property.base=runs/bio-mlm"])
    mlm = train_mlm(warm, progress=False)
    assert "generated" not in mlm.metrics and mlm.metrics["masked_targets"] > 0  # no amino-acid check for SMILES
    assert not is_current(warm, "bio-property")  # a new parent
    tuned = train_property(warm, progress=False)
    assert set(tuned.metrics["scores"]) == {"encoder", "fingerprint_ridge", "mean"}


@pytest.mark.integration
def test_protein_recipe_first_steps_through_the_cli(tmp_path, monkeypatch, one_torch_thread):
    from typer.testing import CliRunner

    from slmforge.cli.main import app

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "seqs.fasta").write_text(FASTA)
    init_project(tmp_path, "protein")
    path = tmp_path / "slmforge.yaml"
    path.write_text(path.read_text().replace("sources: [biopython-tests]", "sources: [seqs.fasta]"))
    tiny = ["bio.mlm.hidden_size=32", "bio.mlm.num_layers=1", "bio.mlm.num_heads=2", "bio.mlm.max_steps=8",
            "bio.mlm.batch_size=4", "bio.mlm.seq_len=64", "bio.mlm.precision=fp32", "bio.data.max_length=40",
            "bio.data.split.val=0.2", "bio.data.split.test=0.2"]
    sets = [a for s in tiny for a in ("--set", s)]
    for step in ("data", "tokenizer", "mlm", "eval"):
        done = CliRunner().invoke(app, ["bio", step, "-c", str(path)] + sets)
        assert done.exit_code == 0, done.output
    assert "masked perplexity" in done.output and "20+X alphabet" in done.output
    m = json.loads((tmp_path / "runs" / "bio-mlm" / "manifest.json").read_text())["metrics"]
    assert m["masked_ppl"] > 1 and m["unigram_masked_ppl"] > 1 and 0 <= m["fills_in_alphabet"] <= 1
    assert m["generated"]["sequences"] == 16 and m["generated"]["residues_in_alphabet"] == 1.0
    assert "masked" in m["perplexity"] and (tmp_path / "runs" / "bio-mlm" / "model.safetensors").is_file()
    again = CliRunner().invoke(app, ["bio", "data", "-c", str(path)] + sets)
    assert again.exit_code == 0 and "up to date" in again.output


@pytest.mark.integration
def test_quickstart_protein_recipe_prints_its_table(tmp_path, monkeypatch, one_torch_thread):
    from typer.testing import CliRunner

    from slmforge.cli.main import app

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "seqs.fasta").write_text(FASTA)
    tiny = ["bio.data.sources=[seqs.fasta]", "bio.mlm.hidden_size=16", "bio.mlm.num_layers=1", "bio.mlm.num_heads=2",
            "bio.mlm.max_steps=4", "bio.mlm.batch_size=4", "bio.mlm.seq_len=48", "bio.data.max_length=40",
            "bio.data.split.val=0.2", "bio.data.split.test=0.2"]
    done = CliRunner().invoke(app, ["quickstart", "--recipe", "protein", "--out", str(tmp_path)]
                              + [a for s in tiny for a in ("--set", s)])
    assert done.exit_code == 0, done.output
    assert "bio-mlm" in done.output and "unigram baseline" in done.output and "slmforge bio eval" in done.output
    assert not (tmp_path / "runs" / "downloads").exists()  # a FASTA source needs no download


def test_a_missing_extra_says_how_to_install(monkeypatch):
    from slmforge.bio.chem import require
    from slmforge.errors import ConfigError

    monkeypatch.setitem(sys.modules, "rdkit.Chem.Nope", None)
    with pytest.raises(ConfigError, match=r"pip install slmforge\[bio\]"):
        require("rdkit.Chem.Nope")


def test_bio_stages_refuse_the_wrong_kind(tmp_path):
    from slmforge.bio import train_property
    from slmforge.errors import ConfigError

    cfg = load_config(init_project(tmp_path, "protein"))
    with pytest.raises(ConfigError, match="bio.kind: smiles"):
        train_property(cfg)
