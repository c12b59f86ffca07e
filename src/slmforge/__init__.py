"""slmforge: own a domain-specific small language model end to end.

The public Python API is re-exported here lazily, so that ``import slmforge``
(and ``slmforge --help``) stay fast: torch, transformers and tokenizers load only
when a stage that needs them runs.

    >>> import slmforge
    >>> cfg = slmforge.load_config("slmforge.yaml")
    >>> data = slmforge.run_data_stage(cfg)
    >>> tok = slmforge.train_tokenizer(cfg)
    >>> model = slmforge.pretrain(cfg)
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# name -> module that defines it. Explicit on purpose: no scanning, no registration.
_EXPORTS = {
    "SlmForgeError": "slmforge.errors",
    "ConfigError": "slmforge.errors",
    "ArtifactError": "slmforge.errors",
    "DataError": "slmforge.errors",
    "TokenizerError": "slmforge.errors",
    "ModelError": "slmforge.errors",
    "TrainError": "slmforge.errors",
    "GenerateError": "slmforge.errors",
    "ProjectConfig": "slmforge.config",
    "load_config": "slmforge.config",
    "render_template": "slmforge.config",
    "init_project": "slmforge.config",
    "ArtifactWriter": "slmforge.artifacts",
    "Manifest": "slmforge.artifacts",
    "read_manifest": "slmforge.artifacts",
    "verify_artifact": "slmforge.artifacts",
    "run_data_stage": "slmforge.data",
    "DataResult": "slmforge.data",
    "train_tokenizer": "slmforge.tokenizer",
    "analyze_tokenizers": "slmforge.tokenizer",
    "load_tokenizer": "slmforge.tokenizer",
    "estimate": "slmforge.model",
    "build_model": "slmforge.model",
    "load_causal_lm": "slmforge.model",
    "pretrain": "slmforge.train",
    "finetune": "slmforge.train",
    "merge_adapter": "slmforge.train",
    "SamplingParams": "slmforge.generate",
    "TorchGenerator": "slmforge.generate",
    "write_report": "slmforge.evaluate.report",
    "run_pipeline": "slmforge.pipeline",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'slmforge' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
