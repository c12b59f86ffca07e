"""Training checkpoints: everything needed to continue a run bit for bit.

A checkpoint folder holds the trainable weights and the AdamW state as
safetensors, and the step, scheduler, RNG state and run fingerprint as JSON.
It is written to a temporary name and renamed, so a kill -9 mid-save leaves
the previous checkpoint as the latest one. No pickle: ``torch.save`` would be
simpler but a checkpoint must be safe to load from anywhere.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from slmforge.errors import TrainError

_PREFIX = "step-"


def checkpoint_dirs(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(_PREFIX) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(_PREFIX) :]))


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for idx, entry in state["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in list(tensors.items()) + list(meta["scalars"].items()):
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(
    root: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    extra: dict[str, Any],
    keep: int,
    state: tuple[dict[str, torch.Tensor], dict[str, Any]] | None = None,
) -> Path:
    """Write ``root/step-NNNNNN`` atomically and keep only the newest ``keep`` checkpoints.

    ``state`` is (trainable weights, optimizer state dict) already gathered from shards (FSDP); without it
    they are read from ``model`` and ``optimizer``.
    """
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{_PREFIX}{step:06d}"
    tmp = root / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    if state is None:
        weights = {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}
        state = (weights, optimizer.state_dict())
    save_file(state[0], str(tmp / "trainable.safetensors"))
    opt_tensors, opt_meta = _flatten_optimizer(state[1])
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    save_file(rng, str(tmp / "rng.safetensors"))
    meta = {"step": step, "optimizer": opt_meta, "scheduler": scheduler.state_dict(), **extra}
    (tmp / "state.json").write_text(json.dumps(meta, indent=1, default=float))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in checkpoint_dirs(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any
) -> dict[str, Any]:
    """Restore a checkpoint into the model, optimizer, scheduler and RNG; return its state.json. Sharded
    (FSDP) parameters and optimizer state take this process's shards of the whole tensors saved."""
    from slmforge.train._distributed import like, shard_optimizer_state

    state = json.loads((path / "state.json").read_text())
    weights = load_file(str(path / "trainable.safetensors"))
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in weights]
    unknown = [n for n in weights if n not in params]
    if missing or unknown:
        raise TrainError(
            f"Checkpoint {path} does not fit this model ({len(missing)} trainable weights missing, "
            f"{len(unknown)} unknown, e.g. {(missing + unknown)[:3]}). Delete the checkpoint folder "
            f"{path.parent} to start over."
        )
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(like(value, params[name]))
    opt_tensors = load_file(str(path / "optimizer.safetensors"))
    optimizer.load_state_dict(shard_optimizer_state(_unflatten_optimizer(opt_tensors, state["optimizer"]), optimizer))
    scheduler.load_state_dict(state["scheduler"])
    rng = load_file(str(path / "rng.safetensors"))
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return state
