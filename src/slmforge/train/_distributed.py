"""How the one training loop spreads a model over data-parallel processes (``train.distributed.strategy``).

Every strategy keeps the loop's contract: the global batch is ``batch_size`` examples, a pure function of
(seed, step); process ``rank`` of ``size`` takes ``[rank::size]`` of it; the update equals the one-process
update on the same global batch up to the order of floating-point sums. What differs is where the weights and
optimizer state live, and each strategy is the library's, not ours:

- ``ddp``: torch ``DistributedDataParallel``: every process holds everything, gradients are averaged;
- ``fsdp``: torch FSDP2 ``fully_shard`` on each of the model's ``_no_split_modules`` layers and on the root
  (what accelerate's FSDP2 plugin does on GPUs; accelerate maps FSDP on a CPU to DDP, so slmforge applies it
  itself, on CPUs with gloo as on GPUs with nccl). Parameters and AdamW state are DTensor shards;
- ``deepspeed``: ``accelerate.Accelerator`` with the DeepSpeed config ``accelerate launch`` passed on (ZeRO
  1/2/3, CPU offload). CUDA only.

Checkpoints stay world-size independent for ddp and fsdp: shards are gathered into the full tensors a
one-process run writes (same names, same optimizer indices), and loading scatters them again. So a run
checkpointed under FSDP on 2 processes resumes on 1 or 4, or under DDP. DeepSpeed keeps its own sharded
optimizer state (``accelerator.save_state``) and resumes at the same world size and ZeRO stage only.

What "exact" resume means across world sizes: the resumed run sees the same examples in the same steps, with
the same AdamW state, schedule position, step count and token count, and ends at the uninterrupted run's
weights to floating-point tolerance (1e-4 in tests/test_accelerate.py), not bit for bit: another split of the
batch adds the gradient in another order. At the same world size under ddp or fsdp it is bit for bit. Dropout
masks are drawn per process, so a model with dropout drifts further.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from slmforge.config import DistributedConfig, LoopConfig
from slmforge.errors import TrainError


def strategy_of(cfg: LoopConfig) -> DistributedConfig:
    dist = getattr(cfg, "distributed", None)
    return dist if isinstance(dist, DistributedConfig) else DistributedConfig()


def loop_precision(cfg: LoopConfig, world_size: int) -> str:
    """The loop's autocast setting: the section's ``precision``, unless a launched run (several processes, or
    DeepSpeed) sets ``distributed.mixed_precision`` (DeepSpeed casts the model itself: no autocast)."""
    dist = strategy_of(cfg)
    if dist.strategy == "deepspeed":
        return "fp32"
    if world_size > 1 and dist.mixed_precision in ("no", "bf16"):
        return {"no": "fp32", "bf16": "bf16"}[dist.mixed_precision]
    return cfg.precision


def _is_dtensor(t: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind a DTensor shard (a collective: every process calls it), on the CPU."""
    if _is_dtensor(t):
        t = t.full_tensor()  # type: ignore[attr-defined]
    return t.detach().contiguous().cpu()


def like(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``value`` (a whole tensor) laid out as ``param``: this process's shard of it for a DTensor parameter
    (every process holds the same checkpoint, so each cuts its own shard: no communication)."""
    if _is_dtensor(param):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(value.to(param.device, param.dtype), param.device_mesh,  # type: ignore[attr-defined]
                                 param.placements, src_data_rank=None)  # type: ignore[attr-defined]
    return value.to(param.device, param.dtype)


def full_training_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, accelerator: Any = None,
                        engine: Any = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(trainable weights, optimizer state dict) as a one-process run holds them: shards gathered. Every
    process must call it under FSDP and DeepSpeed (the gathers are collectives). Under DeepSpeed the optimizer
    state is DeepSpeed's own (``save_deepspeed_state``) and this one is empty; ``engine`` is DeepSpeed's engine
    around ``model``."""
    if accelerator is not None:
        names = {n for n, p in model.named_parameters() if p.requires_grad}
        gathered = accelerator.get_state_dict(engine) or {}  # ZeRO-3: the shards gathered (16-bit)
        weights = {n: t.detach().contiguous().cpu() for n, t in gathered.items() if n in names}
        return weights, {"state": {}, "param_groups": []}
    weights = {n: full(p) for n, p in model.named_parameters() if p.requires_grad}
    state = optimizer.state_dict()
    state = {"param_groups": state["param_groups"],
             "state": {i: {k: (full(v) if torch.is_tensor(v) and v.dim() > 0 else v) for k, v in s.items()}
                       for i, s in state["state"].items()}}
    return weights, state


def shard_optimizer_state(state: dict[str, Any], optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """A whole-tensor optimizer state dict laid out as ``optimizer``'s parameters (shards for DTensors)."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    return {"param_groups": state["param_groups"],
            "state": {i: {k: (like(v, params[int(i)]) if torch.is_tensor(v) and v.dim() > 0 else v)
                          for k, v in s.items()} for i, s in state["state"].items()}}


@dataclass
class Spread:
    """The model as the loop drives it: ``forward`` is what the steps call; ``accelerator`` is set under
    DeepSpeed (its engine takes the backward pass and the optimizer step)."""

    strategy: str
    forward: Any
    optimizer: torch.optim.Optimizer
    accelerator: Any = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def resume_extra(self) -> dict[str, Any]:
        """What a checkpoint's key adds for this strategy: DeepSpeed's sharded state resumes only at the same
        world size and ZeRO stage (ddp and fsdp checkpoints hold whole tensors and add nothing)."""
        return {"deepspeed": self.info} if self.strategy == "deepspeed" else {}

    @property
    def gathers(self) -> bool:
        """Whether saving needs every process (shards are gathered)."""
        return self.strategy in ("fsdp", "deepspeed")

    def backward(self, loss: torch.Tensor, grad_accum: int) -> None:
        """Backward of one micro-batch's mean loss; the step's gradient is the mean over its micro-batches."""
        if self.accelerator is not None:  # DeepSpeed divides by its gradient_accumulation_steps itself
            with self.accelerator.accumulate(self.forward):
                self.accelerator.backward(loss)
            return
        (loss / grad_accum).backward()

    def clip(self, trainable: list[torch.nn.Parameter], grad_clip: float | None) -> float:
        """Clip the gradient norm (DeepSpeed clips inside its step: gradient_clipping); the norm before."""
        if not grad_clip or self.accelerator is not None:
            return float("nan")
        norm = torch.nn.utils.clip_grad_norm_(trainable, grad_clip)
        return float(full(norm)) if _is_dtensor(norm) else float(norm)


def _layer_classes(model: torch.nn.Module) -> set[type]:
    """The classes of the model's ``_no_split_modules`` layers (a PEFT model: of its base model)."""
    names = set()
    for m in model.modules():
        names.update(getattr(m, "_no_split_modules", None) or [])
    return {type(m) for m in model.modules() if type(m).__name__ in names}


def _fully_shard(model: torch.nn.Module, dist: DistributedConfig, device: torch.device
                 ) -> list[tuple[torch.nn.Module, type]]:
    """FSDP2: each transformer layer a unit, then the root (embeddings, final norm, head)."""
    import torch.distributed as tdist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

    mesh = init_device_mesh(device.type, (tdist.get_world_size(),))
    kwargs: dict[str, Any] = {"mesh": mesh}
    if dist.offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    layers = _layer_classes(model)
    if not layers:
        raise TrainError(f"strategy fsdp: {type(model).__name__} names no transformer layers (_no_split_modules) "
                         "to shard; use distributed.strategy ddp.")
    # Every process must shard the same weights: rank 0's, as DDP broadcasts them (an unseeded initialisation,
    # such as LoRA's, differs per process otherwise). fully_shard keeps each process's own slice.
    for t in [*model.parameters(), *model.buffers()]:
        tdist.broadcast(t.data, src=0)
    units = [m for m in model.modules() if type(m) in layers] + [model]
    classes = [(m, type(m)) for m in units]
    for module in units:
        fully_shard(module, **kwargs)
    return classes


def spread(model: torch.nn.Module, cfg: LoopConfig, world_size: int, device: torch.device,
           make_optimizer: Any) -> Spread:
    """Spread ``model`` over the processes as ``cfg.distributed.strategy`` says and build its optimizer
    (``make_optimizer(model)``) after sharding, over the parameters the processes train.

    Raises:
        TrainError: DeepSpeed without CUDA, accelerate's launcher or the deepspeed package.
    """
    dist = strategy_of(cfg)
    name = dist.strategy if world_size > 1 or dist.strategy == "deepspeed" else "none"
    if name == "deepspeed":
        return _deepspeed(model, make_optimizer, cfg.grad_accum, {"processes": world_size,
                                                                  "zero_stage": dist.zero_stage})
    if name == "fsdp":
        classes = _fully_shard(model, dist, device)
        return Spread("fsdp", model, make_optimizer(model), info={"classes": classes})
    optimizer = make_optimizer(model)
    forward = torch.nn.parallel.DistributedDataParallel(model) if name == "ddp" else model
    return Spread(name, forward, optimizer)


def _deepspeed(model: torch.nn.Module, make_optimizer: Any, grad_accum: int, info: dict[str, Any]) -> Spread:
    import importlib.util
    import os

    if not torch.cuda.is_available() or importlib.util.find_spec("deepspeed") is None:
        raise TrainError("distributed.strategy deepspeed needs CUDA GPUs and `pip install deepspeed`; on this "
                         "machine use strategy ddp or fsdp.")
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() != "true":
        raise TrainError("distributed.strategy deepspeed runs under `slmforge train --launcher accelerate` (it "
                         "passes the DeepSpeed config to every process).")
    from accelerate import Accelerator

    accelerator = Accelerator(gradient_accumulation_steps=grad_accum)  # as the DeepSpeed file says
    engine, optimizer = accelerator.prepare(model, make_optimizer(model))
    return Spread("deepspeed", engine, optimizer, accelerator, info)


def save_deepspeed_state(s: Spread, folder: Path) -> None:
    """DeepSpeed's own (sharded) optimizer and engine state, written by every process."""
    s.accelerator.save_state(str(folder))


def load_deepspeed_state(s: Spread, folder: Path) -> None:
    s.accelerator.load_state(str(folder))


def prune_deepspeed_states(root: Path) -> None:
    """Remove DeepSpeed state folders (``deepspeed-NNNNNN``) that no kept checkpoint names any more."""
    import json
    import shutil

    named = {json.loads(f.read_text()).get("deepspeed_state") for f in root.glob("step-*/state.json")}
    for folder in root.glob("deepspeed-*"):
        if folder.name not in named:
            shutil.rmtree(folder, ignore_errors=True)


def gather_to_plain(s: Spread, model: torch.nn.Module) -> None:
    """After training: replace sharded parameters by whole ordinary ones on every process, so the model saves
    as an ordinary Hugging Face folder (``save_pretrained``). A collective under FSDP and ZeRO-3."""
    if s.strategy == "deepspeed":
        state = s.accelerator.get_state_dict(s.forward)  # gathers ZeRO-3 shards (stage3_gather_16bit...)
        plain = s.accelerator.unwrap_model(s.forward)
        if state:
            with torch.no_grad():
                for n, p in plain.named_parameters():
                    if n in state:
                        p.data = state[n].to(torch.float32).cpu()
        return
    if s.strategy != "fsdp":
        return
    _strip_fsdp(model, s.info["classes"])
    replaced: dict[int, torch.nn.Parameter] = {}
    for module in model.modules():
        for key, p in list(module._parameters.items()):
            if p is None or not _is_dtensor(p):
                continue
            if id(p) not in replaced:  # tied weights: one whole tensor for every slot of the shared parameter
                replaced[id(p)] = torch.nn.Parameter(full(p), requires_grad=p.requires_grad)
            module._parameters[key] = replaced[id(p)]


def _from_fsdp(hook: Any) -> bool:
    fn = getattr(hook, "hook", hook)  # load-state-dict hooks come wrapped
    fn = getattr(fn, "func", fn)  # and some as functools.partial
    return str(getattr(fn, "__module__", "")).startswith("torch.distributed.fsdp")


def _strip_fsdp(model: torch.nn.Module, classes: list[tuple[torch.nn.Module, type]]) -> None:
    """Make the sharded units ordinary modules again: their own classes (FSDP2 subclassed them, and
    ``save_pretrained`` writes the class name into config.json), without FSDP's forward and state-dict hooks
    (which would gather or re-shard). The parameters are swapped for whole ones next (``gather_to_plain``)."""
    for module in model.modules():
        for hooks in (module._forward_pre_hooks, module._forward_hooks, module._state_dict_pre_hooks,
                      module._load_state_dict_pre_hooks, module._state_dict_hooks):
            for key in [k for k, h in hooks.items() if _from_fsdp(h)]:
                del hooks[key]
    for module, cls in classes:
        module.__class__ = cls
