"""The bio recipes' parts on known inputs: SMILES metrics, the scaffold split, tokenizers, the FASTA
reader, the amino-acid alphabet check, and a property head that must beat the constant predictor."""

from __future__ import annotations

import pytest

pytest.importorskip("rdkit")
pytest.importorskip("Bio")

from slmforge.bio import (  # noqa: E402
    alphabet_report,
    canonical_smiles,
    clean_protein,
    generation_metrics,
    murcko_scaffold,
    protein_tokenizer,
    read_fasta,
    read_molecules,
    scaffold_split,
    smiles_tokenizer,
    smiles_tokens,
)
from slmforge.errors import DataError  # noqa: E402

RINGS = ["c1ccccc1", "C1CCCCC1", "c1ccncc1", "C1CCOC1", "c1ccsc1", "C1CCNCC1", "c1ccc2ccccc2c1", "C1CC1",
         "c1ccoc1", "C1CCCC1", "c1cncnc1", "C1CCSCC1", "c1ccc2[nH]ccc2c1", "C1CCC(=O)CC1", "c1cnccn1", "C1COCCO1"]


def planted_molecules(chains: range = range(1, 9)) -> list[tuple[str, float]]:
    """Molecules ``C...C-ring`` whose value is the chain length: a signal a model can learn across rings."""
    out = []
    for ring in RINGS:
        for k in chains:
            smiles = canonical_smiles("C" * k + ring)
            assert smiles is not None
            out.append((smiles, float(k)))
    return out


def test_canonical_smiles_normalises_and_rejects():
    assert canonical_smiles("OCC") == canonical_smiles("C(O)C") == "CCO"
    assert canonical_smiles("C1CC") is None  # unclosed ring
    assert canonical_smiles("c1cccc1") is None  # no Kekule form
    assert canonical_smiles("") is None and canonical_smiles("   ") is None


def test_generation_metrics_on_known_sets():
    training = ["CCO", "c1ccccc1", "CC(=O)O"]
    generated = ["OCC", "CCO", "C1CC", "CCN", "CCN", "xyz", "c1ccccc1", "CCCl"]
    metrics, unique = generation_metrics(generated, training)
    # 8 samples; C1CC and xyz invalid -> 6 valid; unique canonical: CCO, CCN, c1ccccc1, CCCl -> 4;
    # novel (not in training): CCN, CCCl -> 2.
    assert (metrics.samples, metrics.valid, metrics.unique, metrics.novel) == (8, 6, 4, 2)
    assert metrics.validity == pytest.approx(0.75) and metrics.uniqueness == pytest.approx(4 / 6)
    assert metrics.novelty == pytest.approx(0.5)
    assert unique == ["CCO", "CCN", "c1ccccc1", "CCCl"]
    empty, _ = generation_metrics([], training)
    assert (empty.validity, empty.uniqueness, empty.novelty) == (0.0, 0.0, 0.0)


def test_scaffold_split_shares_no_scaffold():
    smiles = [s for s, _ in planted_molecules()] + ["CCO", "CCCC", "CCN"]
    splits = scaffold_split(smiles, val=0.15, test=0.15)
    by_split: dict[str, set[str]] = {"train": set(), "val": set(), "test": set()}
    for s, split in zip(smiles, splits):
        by_split[split].add(murcko_scaffold(s))
    assert by_split["val"] and by_split["test"]
    assert not (by_split["train"] & by_split["test"]) and not (by_split["train"] & by_split["val"])
    assert not (by_split["val"] & by_split["test"])
    assert murcko_scaffold("CCO") == ""  # acyclic molecules share the empty scaffold: one group, one split
    assert len({splits[smiles.index(s)] for s in ("CCO", "CCCC", "CCN")}) == 1
    assert splits == scaffold_split(smiles, val=0.15, test=0.15)  # deterministic

    from slmforge.bio.sources import Molecule
    from slmforge.bio.stages import shared_scaffolds, split_molecules

    assert shared_scaffolds(split_molecules([Molecule(s) for s in smiles], 0.15, 0.15)) == 0
    mixed = {"train": [{"scaffold": "c1ccccc1"}], "val": [{"scaffold": "c1ccccc1"}], "test": [{"scaffold": ""}]}
    assert shared_scaffolds(mixed) == 1  # the counter counts what a random split would leak


def test_smiles_tokenizer_round_trips_and_saves(tmp_path):
    corpus = ["CC(=O)Oc1ccccc1C(=O)O", "C[C@@H](N)C(=O)O", "ClCCBr", "c1ccc2[nH]ccc2c1", "C%12CCCCC%12"]
    assert smiles_tokens("C[C@@H](Cl)Br") == ["C", "[C@@H]", "(", "Cl", ")", "Br"]
    assert smiles_tokens("C%12CC%12") == ["C", "%12", "C", "C", "%12"]
    assert smiles_tokens("C^C") is None
    tok = smiles_tokenizer(corpus)
    for s in corpus:
        ids = tok(s, add_special_tokens=False)["input_ids"]
        assert len(ids) == len(smiles_tokens(s)) and tok.decode(ids) == s
    tok.save_pretrained(str(tmp_path))
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(str(tmp_path))  # our artifacts open in transformers
    assert loaded.decode(loaded("ClCCBr", add_special_tokens=False)["input_ids"]) == "ClCCBr"
    assert loaded.convert_ids_to_tokens(loaded("CS", add_special_tokens=False)["input_ids"]) == ["C", "<unk>"]
    assert {loaded.pad_token, loaded.bos_token, loaded.eos_token, loaded.mask_token} == {"<pad>", "<bos>", "<eos>",
                                                                                        "<mask>"}


def test_protein_tokenizer_round_trips():
    tok = protein_tokenizer()
    seq = "MKTAYIAKQRQISFVKSHFSRQX"
    ids = tok(seq, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(seq) and tok.decode(ids) == seq
    assert len(tok) == 5 + 21  # specials + 20 amino acids + X


FASTA = """>sp|P1|TEST1 a made-up protein
MKTAYIAKQRQISFVKSHFSRQ
LEERLGLIEVQ
>dna a nucleotide record, skipped
ACGTACGTACGTTTGACNNACGT
>p2 lower case, a gap, a stop and a selenocysteine
mkvlaa-gkU*
>p3 not protein letters
MK1234
"""


def test_read_fasta_keeps_proteins_only(tmp_path):
    path = tmp_path / "small.fasta"
    path.write_text(FASTA)
    proteins = read_fasta(path)
    assert [(p.id, p.sequence) for p in proteins] == [
        ("sp|P1|TEST1", "MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQ"), ("p2", "MKVLAAGKX")]
    with pytest.raises(DataError, match="does not exist"):
        read_fasta(tmp_path / "missing.fasta")
    assert clean_protein("ACGTTGCA") is None


GENBANK = """LOCUS       X1                        15 bp    DNA              UNK 01-JAN-1980
DEFINITION  .
ACCESSION   X1
VERSION     X1
KEYWORDS    .
SOURCE      .
  ORGANISM  .
            .
FEATURES             Location/Qualifiers
     CDS             1..15
                     /translation="MKVLU"
                     /protein_id="P_1"
ORIGIN
        1 atgaaagtgc tgtaa
//
"""


def test_biopython_tests_source_reads_fasta_and_genbank_translations(tmp_path):
    """The protein set of Biopython's sources, on a made-up tarball of the same layout."""
    import io
    import tarfile

    from slmforge.bio.sources import BIOPYTHON_SDIST, read_proteins

    with tarfile.open(tmp_path / BIOPYTHON_SDIST, "w:gz") as tar:
        for name, text in (("biopython-1.88/Tests/Fasta/a.fasta", FASTA), ("biopython-1.88/Tests/GenBank/x.gb", GENBANK),
                           ("biopython-1.88/Tests/GenBank/bad.gb", "LOCUS broken\n"), ("biopython-1.88/README", ">x\nMK\n")):
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    proteins = read_proteins("biopython-tests", tmp_path, tmp_path)
    assert [p.sequence for p in proteins] == ["MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQ", "MKVLAAGKX", "MKVLX"]
    with pytest.raises(DataError, match="pip download"):
        read_proteins("biopython-tests", tmp_path, tmp_path / "elsewhere")


def test_alphabet_report_flags_letters_outside_20_plus_x():
    report = alphabet_report(["MKV", "MKX", "MKB1"])
    assert report["sequences_in_alphabet"] == 2 and report["outside"] == ["1", "B"]
    assert report["residues_in_alphabet"] == pytest.approx(8 / 10)


def test_read_molecules_from_csv_smi_and_rdkit(tmp_path):
    (tmp_path / "set.csv").write_text("name,smiles,expt,calc\nethanol,CCO,-5.0,-4.0\nbenzene,c1ccccc1,-0.9,-1.0\n")
    mols = read_molecules("set.csv", tmp_path)
    assert [(m.smiles, m.value) for m in mols] == [("CCO", -5.0), ("c1ccccc1", -0.9)]  # the first numeric column
    assert [m.value for m in read_molecules("set.csv", tmp_path, "calc")] == [-4.0, -1.0]
    (tmp_path / "a.smi").write_text("CCO 1\nc1ccccc1\tbenzene\n")
    assert [m.smiles for m in read_molecules("a.smi", tmp_path)] == ["CCO", "c1ccccc1"]
    activity = read_molecules("rdkit-chembl-activity", tmp_path)
    assert len(activity) > 500 and all(m.value is not None for m in activity)
    with pytest.raises(DataError, match="Unknown molecule source|does not exist"):
        read_molecules("nope.csv", tmp_path)


def test_property_head_beats_the_constant_predictor(tmp_path, one_torch_thread):
    """A tiny encoder on a planted signal (value = side-chain length), scored on unseen ring scaffolds."""
    from slmforge.bio.property import fit_encoder, regression_scores
    from slmforge.bio.sources import Molecule
    from slmforge.bio.stages import split_molecules
    from slmforge.config import ProjectConfig

    data = planted_molecules(range(1, 11))
    splits = split_molecules([Molecule(s, v) for s, v in data], 0.15, 0.2)
    tok = smiles_tokenizer([r["smiles"] for r in splits["train"]])
    cfg = ProjectConfig()
    p = cfg.bio.property
    p.hidden_size, p.num_layers, p.num_heads, p.seq_len, p.batch_size = 32, 2, 2, 32, 16
    p.max_steps, p.lr, p.warmup_steps, p.eval_every, p.save_every, p.precision = 150, 3e-3, 10, 1000, 1000, "fp32"
    _, preds, _ = fit_encoder(cfg, splits, tok, tmp_path / "work", {"test": 1}, False, None)
    gold = [r["value"] for r in splits["test"]]
    mean = sum(r["value"] for r in splits["train"]) / len(splits["train"])
    encoder, constant = regression_scores(gold, preds["test"]), regression_scores(gold, [mean] * len(gold))
    assert constant["r2"] <= 0.05
    assert encoder["rmse"] < 0.6 * constant["rmse"] and encoder["r2"] > 0.5, (encoder, constant)


def test_masked_lm_learns_a_planted_motif(tmp_path, one_torch_thread):
    """Sequences that repeat one of four motifs: a masked LM that reads its context fills them far better than
    the unigram baseline, and fills only residues."""
    import random

    import torch
    from transformers import EsmForMaskedLM

    from slmforge.bio.mlm import MaskedExamples, encode, encoder_config, masked_scores, unigram_frequencies
    from slmforge.config import ProjectConfig
    from slmforge.train import run_loop

    rng = random.Random(0)
    motifs = ["MKVLAG", "PQRSTW", "DEFHIK", "CYNAGL"]

    def sequence() -> str:
        return (rng.choice(motifs) * 12)[: rng.randint(40, 60)]

    tok = protein_tokenizer()
    train, test = encode([sequence() for _ in range(200)], tok, 64), encode([sequence() for _ in range(30)], tok, 64)
    m = ProjectConfig().bio.mlm
    m.hidden_size, m.num_layers, m.num_heads, m.seq_len, m.batch_size, m.max_steps = 32, 2, 2, 64, 16, 150
    m.lr, m.warmup_steps, m.eval_every, m.save_every, m.precision = 3e-3, 10, 1000, 1000, "fp32"
    torch.manual_seed(0)
    model = EsmForMaskedLM(encoder_config(m, tok))
    source = MaskedExamples(train, tok, 0.15, 0, 4)
    run_loop(model, source, None, m, tmp_path / "work", 0, {"test": 1}, "masked LM", False, None)
    scores = masked_scores(model, MaskedExamples(test, tok, 0.15, 2, 3, bert_mix=False),
                           unigram_frequencies(train, len(tok), source.residue_ids))
    assert scores["masked_ppl"] < 0.5 * scores["unigram_masked_ppl"], scores
    assert scores["fill_accuracy"] > scores["unigram_fill_accuracy"] + 0.3 and scores["fills_in_alphabet"] == 1.0
