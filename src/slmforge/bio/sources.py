"""Where molecules and protein sequences come from, offline.

Molecules: data files inside the RDKit wheel (named sources below), or the user's ``.smi``,
``.csv`` and ``.sdf`` files. Proteins: FASTA files read with Biopython's ``SeqIO``, or the
protein records among the test files of the Biopython source distribution (``biopython-tests``),
which ``fetch_biopython_sdist`` downloads once from PyPI.
"""

from __future__ import annotations

import csv
import io
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from slmforge.bio.chem import require
from slmforge.errors import DataError

# Named molecule sources: files of the rdkit wheel, relative to rdkit.RDConfig.RDDataDir / RDContribDir.
MOLECULE_SOURCES: dict[str, tuple[str, str]] = {
    "rdkit-nci": ("data", "NCI/first_5K.smi"),  # 4,999 NCI compounds, no values
    "rdkit-wehi": ("data", "Pains/test_data/wehi_mols.csv"),  # 10,000 screening compounds, no values
    "rdkit-tpsa": ("data", "NCI/first_5k.tpsa.csv"),  # the NCI set with TPSA computed by Ertl's program
    "rdkit-chembl-activity": ("contrib", "FreeWilson/data/CHEMBL2321810.smi"),  # 1,017 measured pIC50s
}
PROTEIN_SOURCES = ("biopython-tests",)
BIOPYTHON_SDIST = "biopython-1.88.tar.gz"
FASTA_SUFFIXES = (".fasta", ".fa", ".faa", ".fas", ".pro")

AMINO_ACIDS = "ACDEFGHIKLMNPQRSTVWY"
# Ambiguous and rare residues are written X, so the alphabet is the 20 standard ones plus X.
_TO_X = str.maketrans({c: "X" for c in "BZJUO"})


@dataclass
class Molecule:
    """A molecule as read: its SMILES, and its measured value when the source has one."""

    smiles: str
    value: float | None = None
    name: str | None = None


@dataclass
class Protein:
    id: str
    sequence: str


def rdkit_file(name: str) -> Path:
    """The file of a named molecule source inside the installed rdkit wheel.

    Raises:
        ConfigError: rdkit is not installed.
        DataError: The name is unknown, or this rdkit build lacks the file.
    """
    if name not in MOLECULE_SOURCES:
        raise DataError(f"Unknown molecule source {name!r}; built-in ones: {', '.join(MOLECULE_SOURCES)} "
                        "(or give a .smi, .csv or .sdf file).")
    config = require("rdkit.RDConfig")
    root, rel = MOLECULE_SOURCES[name]
    path = Path(config.RDDataDir if root == "data" else config.RDContribDir) / rel
    if not path.is_file():
        raise DataError(f"{path} is missing from this rdkit installation; install rdkit from its PyPI wheel.")
    return path


def read_molecules(source: str, base_dir: Path, value_field: str | None = None) -> list[Molecule]:
    """Every molecule of one source (a built-in name or a file), with values where it has them.

    Raises:
        DataError: An unknown name, a missing or unreadable file, or a value column that is not there.
    """
    if source == "rdkit-chembl-activity":
        return _chembl_activity(rdkit_file(source))
    path = rdkit_file(source) if source in MOLECULE_SOURCES else base_dir / source
    if not path.is_file():
        raise DataError(f"Molecule source {path} does not exist; give a .smi, .csv or .sdf file or one of "
                        f"{', '.join(MOLECULE_SOURCES)}.")
    suffix = path.suffix.lower()
    if suffix == ".sdf":
        return _read_sdf(path, value_field)
    if suffix == ".csv":
        return _read_csv(path, value_field)
    return [Molecule(line.split()[0], None, " ".join(line.split()[1:2]) or None)
            for line in _lines(path) if line.split()]


def _lines(path: Path) -> Iterator[str]:
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if line.strip() and not line.startswith("#") and not line.lower().startswith("smiles"):
            yield line


def _chembl_activity(smi: Path) -> list[Molecule]:
    """RDKit's Free-Wilson example: a ChEMBL series (CHEMBL2321810) and its measured pIC50 per compound id."""
    values = {row["Name"]: float(row["Act"]) for row in csv.DictReader(io.StringIO(
        smi.with_name("CHEMBL2321810_act.csv").read_text(encoding="utf-8")))}
    out = []
    for line in _lines(smi):
        smiles, name = line.split()[:2]
        if name in values:
            out.append(Molecule(smiles, values[name], name))
    return out


def _number(text: str) -> float | None:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def _read_csv(path: Path, value_field: str | None) -> list[Molecule]:
    """A CSV with a SMILES column (named smiles, else the first) and optionally a value column (``value_field``,
    else the first column whose first row is a number, as FreeSolv's expt). Files without a header row are read too."""
    rows = list(csv.reader(line for line in _raw_lines(path)))
    if not rows:
        return []
    header = [h.strip() for h in rows[0]]
    has_header = any(h.lower() == "smiles" for h in header) or not _looks_like_smiles(header[0])
    body = rows[1:] if has_header else rows
    names = header if has_header else [str(i) for i in range(len(header))]
    smiles_col = next((i for i, h in enumerate(names) if h.lower() == "smiles"), 0)
    if value_field is not None:
        if value_field not in names:
            raise DataError(f"{path} has no column {value_field!r}; its columns: {', '.join(names)}.")
        value_col: int | None = names.index(value_field)
    else:
        numeric = [i for i, v in enumerate(body[0]) if i != smiles_col and _number(v) is not None] if body else []
        value_col = numeric[0] if numeric else None
    return [Molecule(r[smiles_col].strip(), _number(r[value_col]) if value_col is not None else None)
            for r in body if len(r) > smiles_col and r[smiles_col].strip()]


def _raw_lines(path: Path) -> Iterator[str]:
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if line.strip() and not line.startswith("#"):
            yield line


def _looks_like_smiles(text: str) -> bool:
    """Whether a CSV cell looks like a SMILES string rather than a column name (used to spot a header row)."""
    return bool(re.fullmatch(r"[A-Za-z0-9@+\-\[\]\(\)=#$/\\%.:~*]+", text)) and any(c in text for c in "()=#[]123456789")


def _read_sdf(path: Path, value_field: str | None) -> list[Molecule]:
    """An SD file; the value is ``value_field``, else the first numeric property (e.g. SOL in ESOL's files)."""
    chem = require("rdkit.Chem")
    out = []
    for mol in chem.SDMolSupplier(str(path)):
        if mol is None:
            continue
        props = mol.GetPropsAsDict()
        if value_field is not None and value_field not in props:
            raise DataError(f"{path}: a record has no field {value_field!r}; its fields: {', '.join(props)}.")
        key = value_field or next((k for k, v in props.items() if isinstance(v, float)), None)
        out.append(Molecule(chem.MolToSmiles(mol), _number(props[key]) if key else None,
                            mol.GetProp("_Name") if mol.HasProp("_Name") else None))
    return out


# --------------------------------------------------------------------------- proteins


def clean_protein(sequence: str) -> str | None:
    """Upper-case, gaps and stop marks removed, rare residues as X; None for what is not a protein
    (nucleotides, or letters outside the amino-acid alphabet)."""
    s = re.sub(r"[\s\-.*]", "", sequence.upper()).translate(_TO_X)
    if not s or set(s) - set(AMINO_ACIDS + "X"):
        return None
    if len(set(s) - set("ACGTUN")) < 3:  # DNA/RNA letters only (plus a stray X or two)
        return None
    return s


def read_fasta(path: str | Path) -> list[Protein]:
    """Protein records of a FASTA file (Biopython ``SeqIO``), cleaned with ``clean_protein``; records that
    are not protein sequences are skipped.

    Raises:
        ConfigError: Biopython is missing (``pip install slmforge[bio]``).
        DataError: The file does not exist.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"FASTA file {path} does not exist.")
    return _parse_proteins(path.read_text(encoding="utf-8", errors="replace"), "fasta")


def _parse_proteins(text: str, fmt: str) -> list[Protein]:
    seqio = require("Bio.SeqIO")
    out = []
    try:
        for record in seqio.parse(io.StringIO(text), fmt):
            seq = clean_protein(str(record.seq))
            if seq:
                out.append(Protein(str(record.id), seq))
    except Exception as exc:  # Biopython raises ValueError and others on malformed files
        raise DataError(f"not a readable {fmt} file: {exc}") from None
    return out


def read_proteins(source: str, base_dir: Path, cache: Path) -> list[Protein]:
    """The proteins of one source: a FASTA file, a folder of them (sorted, recursively), or ``biopython-tests``.

    Raises:
        DataError: A missing path, or ``biopython-tests`` before ``fetch_biopython_sdist``.
    """
    if source == "biopython-tests":
        return _biopython_tests(cache / BIOPYTHON_SDIST)
    path = base_dir / source
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in FASTA_SUFFIXES)
        return [p for f in files for p in read_fasta(f)]
    return read_fasta(path)


def _genbank_translations(text: str) -> list[Protein]:
    """The proteins a GenBank file annotates: each CDS feature's ``/translation``."""
    seqio = require("Bio.SeqIO")
    out = []
    for record in seqio.parse(io.StringIO(text), "genbank"):
        for feature in record.features:
            if feature.type == "CDS" and (seq := clean_protein(feature.qualifiers.get("translation", [""])[0])):
                name = feature.qualifiers.get("protein_id", feature.qualifiers.get("locus_tag", [record.id]))[0]
                out.append(Protein(str(name), seq))
    return out


def _test_file_format(name: str) -> str | None:
    """How to read one file of Biopython's ``Tests/`` for proteins (None: not a sequence file we read)."""
    lower = name.lower()
    if "/Tests/" not in name:
        return None
    if lower.endswith(FASTA_SUFFIXES):
        return "fasta"
    if "/SwissProt/" in name and lower.endswith(".txt"):
        return "swiss"
    return "genbank" if "/GenBank/" in name and lower.endswith((".gb", ".gbk")) else None


def _biopython_tests(sdist: Path) -> list[Protein]:
    """Protein records of the FASTA and SwissProt test files inside Biopython's source distribution, and the
    CDS translations of its GenBank files (duplicates are removed later, by sequence)."""
    import tarfile
    import warnings

    if not sdist.is_file():
        raise DataError(f"{sdist} is missing: run `pip download --no-deps --no-binary :all: biopython==1.88 -d "
                        f"{sdist.parent}` (or `slmforge quickstart --recipe protein`, which does it once).")
    out = []
    with tarfile.open(sdist) as tar, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the test files include deliberately malformed records
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            fmt = _test_file_format(member.name)
            file = tar.extractfile(member) if member.isfile() and fmt else None
            if file is None:
                continue
            text = file.read().decode("utf-8", "replace")
            try:
                out += _genbank_translations(text) if fmt == "genbank" else _parse_proteins(text, fmt)
            except Exception:  # a deliberately malformed test file (Biopython raises many kinds)
                continue
    return out


def fetch_biopython_sdist(cache: Path) -> Path:
    """Download Biopython's source distribution from PyPI into ``cache`` (once); its ``Tests/`` hold ~220
    distinct protein sequences.

    Raises:
        DataError: pip could not download it.
    """
    target = cache / BIOPYTHON_SDIST
    if target.is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
           "biopython==1.88", "-d", str(cache)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0 or not target.is_file():
        raise DataError(f"Could not download biopython's sources with `{' '.join(cmd[2:])}`: "
                        f"{done.stderr.strip()[-400:]}")
    return target
