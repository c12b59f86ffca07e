"""``slmforge bio``: the steps of the smiles and protein recipes one at a time, and their tables.

Each step is a pipeline stage (``bio-data``, ``bio-tokenizer``, ``bio-sample``, ``bio-mlm``,
``bio-property``): skipped when its artifact is current, as ``slmforge run`` would, unless --force.
"""

from __future__ import annotations

import sys
from typing import Annotated, Any

import typer

from slmforge.cli._options import ConfigOpt, SetOpt, err, load_project, out

bio_app = typer.Typer(help="Biomolecular SLMs: molecules (SMILES GPT, property head) and proteins (masked LM).",
                      no_args_is_help=True)
ForceOpt = Annotated[bool, typer.Option(help="Run even when the artifact is up to date.")]


def _stage(name: str, config, set_, force: bool) -> dict[str, Any]:
    """Run one bio stage (unless current) and return its manifest's metrics."""
    from slmforge.artifacts import read_manifest
    from slmforge.pipeline import STAGES, is_current

    cfg = load_project(config, set_)
    stage = STAGES[name]
    if not force and is_current(cfg, name):
        err.print(f"{name}: up to date ({stage.output(cfg)}); --force runs it again", style="dim")
        path = stage.output(cfg)
    else:
        path = stage.run(cfg, sys.argv, err.print)
    metrics: dict[str, Any] = read_manifest(path).metrics
    out.print(f"{name} -> {path}")
    return metrics


@bio_app.command("data")
def data_cmd(config: ConfigOpt = None, set_: SetOpt = None, force: ForceOpt = False) -> None:
    """Read bio.data.sources: canonical, valid, unique SMILES split by scaffold (or protein sequences)."""
    m = _stage("bio-data", config, set_, force)
    out.print("  " + ", ".join(f"{k} {v}" for k, v in m.items() if not isinstance(v, dict)))


@bio_app.command("tokenizer")
def tokenizer_cmd(config: ConfigOpt = None, set_: SetOpt = None, force: ForceOpt = False) -> None:
    """The SMILES regex tokenizer (or the amino-acid one) as a Hugging Face tokenizer folder."""
    m = _stage("bio-tokenizer", config, set_, force)
    out.print(f"  {m['vocab_size']} tokens; held-out strings round-tripped exactly: {m['heldout_round_trip']:.1%}")


@bio_app.command("sample")
def sample_cmd(config: ConfigOpt = None, set_: SetOpt = None, force: ForceOpt = False) -> None:
    """Sample molecules from the SMILES GPT: validity, uniqueness, novelty, property distributions."""
    _print_samples(_stage("bio-sample", config, set_, force))


@bio_app.command("mlm")
def mlm_cmd(config: ConfigOpt = None, set_: SetOpt = None, force: ForceOpt = False) -> None:
    """Train the masked LM (ESM-style) on bio-data; held-out masked perplexity vs the unigram baseline."""
    _print_mlm(_stage("bio-mlm", config, set_, force))


@bio_app.command("property")
def property_cmd(config: ConfigOpt = None, set_: SetOpt = None, force: ForceOpt = False) -> None:
    """A regression head for a measured property vs fingerprint + ridge vs the mean, on a scaffold split."""
    _print_property(_stage("bio-property", config, set_, force))


@bio_app.command("eval")
def eval_cmd(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Print the tables of the bio artifacts that exist (nothing is run)."""
    from slmforge.artifacts import output_dir, read_manifest
    from slmforge.errors import ArtifactError

    cfg = load_project(config, set_)
    printers = {"bio-sample": _print_samples, "bio-property": _print_property, "bio-mlm": _print_mlm}
    found = 0
    for name, show in printers.items():
        try:
            metrics = read_manifest(output_dir(cfg, name)).metrics
        except ArtifactError:
            continue
        found += 1
        out.print(f"{name} ({output_dir(cfg, name)})")
        show(metrics)
    if not found:
        err.print("No bio-sample, bio-property or bio-mlm artifact yet: run `slmforge run` first.", style="yellow")
        raise typer.Exit(1)


def _print_samples(m: dict[str, Any]) -> None:
    out.print(f"  {m['samples']} samples: validity {m['validity']:.3f}, uniqueness {m['uniqueness']:.3f}, "
              f"novelty {m['novelty']:.3f}")
    out.print(f"  {'property':<8} {'train mean':>10} {'train std':>9} {'gen mean':>9} {'gen std':>8} {'W1':>8}")
    for name, row in m["properties"].items():
        out.print(f"  {name:<8} {row['train_mean']:>10} {row['train_std']:>9} {row['generated_mean']:>9} "
                  f"{row['generated_std']:>8} {row['wasserstein']:>8}")


def _print_property(m: dict[str, Any]) -> None:
    out.print(f"  {m['source']}: {m['train_molecules']} train / {m['val_molecules']} val / {m['test_molecules']} test "
              f"molecules, scaffold split ({m['shared_scaffolds']} shared scaffolds)")
    out.print(f"  {'predictor':<18} {'test RMSE':>9} {'test R2':>8}")
    for name, scores in m["scores"].items():
        test = scores.get("test", {})
        out.print(f"  {name:<18} {test.get('rmse', float('nan')):>9} {test.get('r2', float('nan')):>8}")


def _print_mlm(m: dict[str, Any]) -> None:
    out.print(f"  held-out masked perplexity {m['masked_ppl']} (unigram baseline {m['unigram_masked_ppl']}); "
              f"fill accuracy {m['fill_accuracy']} (unigram {m['unigram_fill_accuracy']}); "
              f"fills in the alphabet {m['fills_in_alphabet']:.1%}")
    if "generated" in m:
        g = m["generated"]
        out.print(f"  generated by unmasking: {g['sequences_in_alphabet']}/{g['sequences']} sequences entirely in the "
                  f"20+X alphabet ({g['residues_in_alphabet']:.1%} of residues)")


def prepare_recipe(cfg) -> None:
    """Before `slmforge quickstart --recipe protein` runs: Biopython's sources (the protein set), downloaded once."""
    if "biopython-tests" in cfg.bio.data.sources and "bio-data" in cfg.project.stages:
        from slmforge.bio.sources import BIOPYTHON_SDIST, fetch_biopython_sdist
        from slmforge.bio.stages import download_dir

        if not (download_dir(cfg) / BIOPYTHON_SDIST).is_file():
            err.print(f"downloading Biopython's sources (its test files hold the protein set) to {download_dir(cfg)} "
                      "(once)", style="dim")
            fetch_biopython_sdist(download_dir(cfg))


def print_recipe(paths: dict, project_file) -> None:
    """After a smiles or protein quickstart: its tables, and what to run next."""
    from slmforge.artifacts import read_manifest

    printers = {"bio-sample": _print_samples, "bio-property": _print_property, "bio-mlm": _print_mlm}
    for name, show in printers.items():
        if name in paths:
            out.print(f"\n{name} ({paths[name]})")
            show(read_manifest(paths[name]).metrics)
    figures = [f"{paths[n]}/{f}" for n, f in (("bio-sample", "properties.png"), ("bio-property", "parity.png"),
                                               ("bio-mlm", "loss.png")) if n in paths]
    again = (f"  slmforge bio sample -c {project_file} --set bio.sample.temperature=0.8 --force\n" if "bio-sample" in paths
             else f"  slmforge bio mlm -c {project_file} --set bio.mlm.max_minutes=15 --force   (train longer)\n")
    print("\nNext:\n" + "".join(f"  open {f}\n" for f in figures)
          + f"  slmforge bio eval -c {project_file}   (the tables again)\n" + again
          + f"  edit {project_file}, then: slmforge run -c {project_file}   (only changed stages re-run)")
