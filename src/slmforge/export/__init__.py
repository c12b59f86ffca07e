"""Export: a trained model out of slmforge, as ONNX (ONNX Runtime, onnxruntime-genai),
GGUF (llama.cpp) or an Ollama Modelfile + GGUF.

    slmforge export onnx   --set export.onnx.precision=int4
    slmforge export gguf   --set export.gguf.type=Q8_0
    slmforge export ollama

Each format's writer lives in its own module (``onnx``, ``gguf``, ``ollama``);
this module turns a model (a LoRA adapter is merged first) into an artifact folder.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slmforge.artifacts import MANIFEST, ArtifactWriter, parent_ref, read_manifest
from slmforge.config import ProjectConfig
from slmforge.errors import ArtifactError, ModelError

__all__ = ["ExportResult", "run_export", "FORMATS"]


@dataclass
class ExportResult:
    path: Path
    metrics: dict[str, Any]


def _full_model(model: Path, scratch: Path) -> Path:
    """A full model folder: the model itself, or an adapter merged into its base."""
    try:
        kind = read_manifest(model).kind
    except ArtifactError:
        return model
    if kind != "adapter":
        return model
    import json

    from slmforge.train import merge_adapter

    base = json.loads((model / "slmforge_adapter.json").read_text())["base"]
    return merge_adapter(base, model, scratch / "merged", command=["merge-for-export"])


def _size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def _onnx(cfg: ProjectConfig, full: Path, folder: Path, out_dir: Path, log) -> dict[str, Any]:
    """An ONNX graph (and onnxruntime-genai config), checked against the PyTorch model it came from."""
    from slmforge.export.onnx import choose_providers, export_onnx, parity_report

    ecfg = cfg.export
    export_onnx(full, folder, precision=ecfg.onnx.precision, optimization=ecfg.onnx.optimization)
    providers = choose_providers(ecfg.onnx.providers)
    # The exported graph against the PyTorch model it came from: logits and greedy tokens.
    parity = parity_report(full, folder, ["def fibonacci(n):", "The standard library"], max_new_tokens=16,
                           providers=providers)
    return {"precision": ecfg.onnx.precision, "optimization": ecfg.onnx.optimization, "providers": providers,
            "parity": parity}


def _gguf(cfg: ProjectConfig, full: Path, folder: Path, out_dir: Path, log) -> dict[str, Any]:
    """A GGUF file, loaded in llama.cpp and compared with the source model when ``export.gguf.verify``."""
    from slmforge.export.gguf import export_gguf

    ecfg = cfg.export
    gguf = export_gguf(full, folder / f"{cfg.project.name}-{ecfg.gguf.type}.gguf", type=ecfg.gguf.type)
    metrics: dict[str, Any] = {"type": ecfg.gguf.type, "gguf": gguf.name}
    if ecfg.gguf.verify:
        import time

        from slmforge.export.gguf import gguf_parity_report

        # llama.cpp itself loads the file: its tokenizer and greedy tokens against the source model.
        # A file it cannot load is an error here, and the artifact folder is not replaced.
        if log:
            log(f"checking {gguf.name} in llama.cpp")
        start = time.perf_counter()
        try:
            metrics["parity"] = gguf_parity_report(full, gguf)
        except ModelError as exc:
            raise ModelError(f"{exc} Nothing was exported: {out_dir} keeps what it held.") from None
        metrics["parity"]["seconds"] = round(time.perf_counter() - start, 3)
    return metrics


def _ollama(cfg: ProjectConfig, full: Path, folder: Path, out_dir: Path, log) -> dict[str, Any]:
    """The GGUF export plus a Modelfile that imports it (``ollama create``)."""
    from slmforge.export.ollama import write_modelfile
    from slmforge.generate import resolve_profile

    metrics = _gguf(cfg, full, folder, out_dir, log)
    ecfg = cfg.export
    profile = resolve_profile(ecfg.ollama.profile, full, cfg.generate)
    modelfile = write_modelfile(folder / metrics["gguf"], folder, full, profile, system=ecfg.ollama.system)
    final = out_dir.resolve() / modelfile.name
    return {**metrics, "modelfile": modelfile.name, "import": f"ollama create {cfg.project.name} -f {final}"}


# Format name (`slmforge export FORMAT`; each has a section of the same name under ``export:`` in the
# config, which tests/test_tables.py checks) -> writer: (cfg, full model folder, artifact folder being
# written, final output folder, log or None: a message gets "export FORMAT: " before it) -> the format's
# metrics for the manifest.
FORMATS: dict[str, Callable[[ProjectConfig, Path, Path, Path, Any], dict[str, Any]]] = {
    "onnx": _onnx,
    "gguf": _gguf,
    "ollama": _ollama,
}


def run_export(cfg: ProjectConfig, fmt: str, model: str | Path | None = None, out: str | Path | None = None,
               command: list[str] | None = None, log=None) -> ExportResult:
    """Export the project's model (``export.model``, else sft, else train) to ``fmt``.

    Raises:
        ArtifactError: The model is missing.
        ModelError: The model cannot be converted, or (``export.gguf.verify``) llama.cpp cannot load the
            GGUF file; the output folder then keeps its previous export.
        ValueError: Unknown format.
    """
    from slmforge.generate import default_model_dir

    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose from {tuple(FORMATS)}")
    ecfg = cfg.export
    model_path = Path(str(model)) if model else (cfg.resolve(ecfg.model) if ecfg.model else default_model_dir(cfg))
    out_dir = Path(out) if out else cfg.stage_dir(f"export-{fmt}", ecfg.out)
    parents = [parent_ref(model_path)] if (model_path / MANIFEST).exists() else []
    config = {"export": ecfg.model_dump(mode="json"), "format": fmt, "model": str(model_path)}
    with tempfile.TemporaryDirectory() as scratch, \
            ArtifactWriter(out_dir, kind=f"export-{fmt}", config=config, parents=parents, command=command) as w:
        full = _full_model(model_path, Path(scratch))
        if log:
            log(f"export {fmt}: {full}")
        say = (lambda msg: log(f"export {fmt}: {msg}")) if log else None
        metrics: dict[str, Any] = {"format": fmt, **FORMATS[fmt](cfg, full, w.path, out_dir, say)}
        metrics["bytes"] = _size(w.path)
        w.metrics.update(metrics)
    return ExportResult(out_dir.resolve(), metrics)
