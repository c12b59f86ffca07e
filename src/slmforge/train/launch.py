"""Launching a training run over several processes with ``accelerate launch``.

``slmforge train --launcher accelerate`` writes two files from the section's ``distributed`` key into the
run's work folder and hands the same ``slmforge train`` command to ``accelerate launch``:

- ``accelerate.yaml``: accelerate's own config file (what ``accelerate config`` would write): processes,
  machines, the rendezvous, mixed precision, and the FSDP (version 2) or DeepSpeed settings;
- ``deepspeed.json`` (strategy deepspeed): the DeepSpeed config it names, with every batch number written
  out (``accelerate launch`` cannot fill "auto" values: slmforge hands it no DataLoader).

Inside each process the loop (``_loop.run_loop``) reads the same project file and spreads the model the way
``strategy`` says (``_distributed``). Nothing here imports torch: printing a config stays instant.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

from slmforge.config import DistributedConfig, LoopConfig
from slmforge.errors import ConfigError

__all__ = ["accelerate_config", "deepspeed_config", "launch_files", "mixed_precision", "accelerate_command"]

# accelerate's name for each strategy. MULTI_GPU is accelerate's multi-process launcher (torchrun underneath);
# on a machine without CUDA the processes join with gloo and train on the CPU all the same.
_DISTRIBUTED_TYPE = {"ddp": "MULTI_GPU", "fsdp": "FSDP", "deepspeed": "DEEPSPEED"}


def _distributed(section: LoopConfig) -> DistributedConfig:
    dist = getattr(section, "distributed", None)
    return dist if isinstance(dist, DistributedConfig) else DistributedConfig()


def mixed_precision(section: LoopConfig) -> str:
    """accelerate's ``mixed_precision`` for the section: ``distributed.mixed_precision``, or with ``auto`` the
    section's ``precision`` (fp32 -> no, bf16 -> bf16, auto -> bf16 where the hardware runs it natively).

    Raises:
        ConfigError: fp16 without DeepSpeed (fp16 needs the loss scaling DeepSpeed does; our loop does not).
    """
    dist = _distributed(section)
    if dist.mixed_precision == "fp16" and dist.strategy != "deepspeed":
        raise ConfigError(f"distributed.mixed_precision fp16 needs distributed.strategy deepspeed (which scales "
                          f"the loss); with {dist.strategy} use bf16 or no.")
    if dist.mixed_precision != "auto":
        return dist.mixed_precision
    if section.precision == "fp32":
        return "no"
    if section.precision == "bf16":
        return "bf16"
    import torch

    from slmforge.train._loop import autocast_dtype

    device = torch.device("cuda" if section.device != "cpu" and torch.cuda.is_available() else "cpu")
    return "bf16" if autocast_dtype("auto", device) is not None else "no"


def deepspeed_config(section: LoopConfig, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config: ZeRO stage and offload from ``distributed``, batch numbers from the section (the
    global batch ``batch_size`` is split over ``world_size`` processes, as in every other strategy).

    Raises:
        ConfigError: A batch that does not split evenly over the processes.
    """
    dist = _distributed(section)
    if section.batch_size % world_size:
        raise ConfigError(f"batch_size {section.batch_size} must divide evenly over {world_size} processes.")
    mp = mixed_precision(section)
    zero: dict[str, Any] = {"stage": dist.zero_stage, "overlap_comm": True, "contiguous_gradients": True}
    if dist.offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        if dist.zero_stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    if dist.zero_stage == 3:  # saving gathers the shards into one ordinary state dict
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return {
        "train_batch_size": section.batch_size * section.grad_accum,
        "train_micro_batch_size_per_gpu": section.batch_size // world_size,
        "gradient_accumulation_steps": section.grad_accum,
        "gradient_clipping": section.grad_clip or 0.0,
        "zero_optimization": zero,
        "bf16": {"enabled": mp == "bf16"},
        "fp16": {"enabled": mp == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        # our AdamW stays the optimizer when its state is offloaded (DeepSpeed would insist on its own)
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 1_000_000_000,
        "wall_clock_breakdown": False,
    }


def accelerate_config(section: LoopConfig, num_processes: int, deepspeed_file: Path | None = None,
                      port: int | None = None) -> dict[str, Any]:
    """accelerate's config for the section's ``distributed`` key, as ``accelerate config`` writes it.

    ``num_processes`` counts processes on every machine together (accelerate's meaning). FSDP is version 2
    (``fully_shard``), wrapping each of the model's ``_no_split_modules`` layers, and saves a full state dict.
    """
    dist = _distributed(section)
    out: dict[str, Any] = {
        "compute_environment": "LOCAL_MACHINE",
        "distributed_type": _DISTRIBUTED_TYPE[dist.strategy],
        "num_processes": num_processes,
        "num_machines": dist.num_machines,
        "machine_rank": dist.machine_rank,
        "rdzv_backend": "static",
        "same_network": True,
        "gpu_ids": "all",
        "use_cpu": False,
        "debug": False,
        "main_training_function": "main",
        "enable_cpu_affinity": False,
        "downcast_bf16": "no",
    }
    if dist.main_process_ip:
        out["main_process_ip"] = dist.main_process_ip
    if port or dist.main_process_port:
        out["main_process_port"] = port or dist.main_process_port
    if dist.strategy == "deepspeed":  # mixed precision lives in the DeepSpeed file (accelerate refuses both)
        out["deepspeed_config"] = {"deepspeed_config_file": str(deepspeed_file or "deepspeed.json"),
                                   "zero3_init_flag": False}
        return out
    out["mixed_precision"] = mixed_precision(section)
    if dist.strategy == "fsdp":
        out["fsdp_config"] = {
            "fsdp_version": 2,
            "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",  # the model's _no_split_modules layers
            "fsdp_state_dict_type": "FULL_STATE_DICT",
            "fsdp_offload_params": dist.offload,
            "fsdp_reshard_after_forward": True,
            "fsdp_cpu_ram_efficient_loading": False,
            "fsdp_activation_checkpointing": False,
        }
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch_files(section: LoopConfig, folder: Path, nproc: int | None = None) -> Path:
    """Write ``accelerate.yaml`` (and ``deepspeed.json`` for strategy deepspeed) into ``folder``; the yaml's path.

    ``nproc`` (processes on this machine) overrides ``distributed.num_processes``. A single machine without a
    ``main_process_port`` gets a free port, so two runs on one machine do not collide.

    Raises:
        ConfigError: A batch that does not split evenly, or fp16 without DeepSpeed.
    """
    import yaml

    dist = _distributed(section)
    world = (nproc or dist.num_processes) * dist.num_machines
    if section.batch_size % world:
        raise ConfigError(f"batch_size {section.batch_size} must divide evenly over {world} processes: each takes "
                          "an equal share of every batch (the global batch stays batch_size).")
    folder.mkdir(parents=True, exist_ok=True)
    ds_file = None
    (folder / "deepspeed.json").unlink(missing_ok=True)  # from an earlier run with another strategy
    if dist.strategy == "deepspeed":
        ds_file = folder / "deepspeed.json"
        ds_file.write_text(json.dumps(deepspeed_config(section, world), indent=1) + "\n")
    port = _free_port() if dist.num_machines == 1 and dist.main_process_port is None else None
    path = folder / "accelerate.yaml"
    path.write_text(yaml.safe_dump(accelerate_config(section, world, ds_file, port), sort_keys=False))
    return path


def accelerate_command(executable_dir: Path, config_file: Path, args: list[str]) -> list[str]:
    """``accelerate launch --config_file FILE -m slmforge ARGS`` with the ``accelerate`` next to ``python``."""
    return [str(executable_dir / "accelerate"), "launch", "--config_file", str(config_file), "-m", "slmforge", *args]
