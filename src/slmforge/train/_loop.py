"""The one training loop. Pretraining, supervised fine-tuning and encoder heads
differ only in the model and the batch source they hand to it.

Why our own loop rather than ``transformers.Trainer``: a run must resume bit for
bit after ``kill -9`` (weights, AdamW state, schedule, RNG and data position),
batches must be a pure function of (seed, step) so that resuming needs no data
iterator state, and bf16 autocast + ``torch.compile`` on CPU must be one flag.
``benchmarks/train_throughput.py`` measures it against the Trainer.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from slmforge.config import LoopConfig
from slmforge.model import pick_device
from slmforge.train._checkpoint import checkpoint_dirs, load_checkpoint, save_checkpoint
from slmforge.train._distributed import (
    Spread,
    full_training_state,
    gather_to_plain,
    load_deepspeed_state,
    loop_precision,
    prune_deepspeed_states,
    save_deepspeed_state,
    spread as _spread,
)


class BatchSource(Protocol):
    """A fixed, indexable set of examples that turns index lists into model inputs."""

    def __len__(self) -> int: ...

    def batch(self, indices: list[int]) -> dict[str, torch.Tensor]: ...

    def tokens_in(self, batch: dict[str, torch.Tensor]) -> int: ...


@dataclass
class LoopResult:
    steps: int
    final_loss: float
    val_loss: float | None
    tokens: int
    seconds: float
    tokens_per_s: float
    resumed_from: int | None
    stopped_early: bool
    log: list[dict[str, Any]] = field(default_factory=list)
    processes: int = 1  # data-parallel processes that trained it
    strategy: str = "none"  # how they shared it: ddp, fsdp, deepspeed (train.distributed.strategy)


@dataclass(frozen=True)
class World:
    """This process's place in a data-parallel run launched by ``torchrun`` (or ``accelerate launch``):
    ``rank`` of ``size`` processes; (0, 1) for a plain run."""

    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.size > 1:
            torch.distributed.barrier()

    def mean(self, value: float) -> float:
        """The mean of ``value`` over the processes (itself in a plain run)."""
        if self.size == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        torch.distributed.all_reduce(t)
        return float(t[0]) / self.size

    def total(self, value: int) -> int:
        if self.size == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64)
        torch.distributed.all_reduce(t)
        return int(t[0])


def world(device: str = "cpu") -> World:
    """Join the process group the launcher describes (``WORLD_SIZE``, ``RANK``, ``MASTER_ADDR``...: gloo on
    CPU, nccl on CUDA) and say where this process stands; a plain run is ``World(0, 1)``."""
    import os

    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return World(dist.get_rank(), dist.get_world_size())


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 where the hardware runs it natively (CUDA with bf16, CPUs with AVX512-BF16/AMX)."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    native = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)() or getattr(
        torch.cpu, "_is_amx_tile_supported", lambda: False
    )()
    return torch.bfloat16 if native else None


class _EpochOrder:
    """An endless stream of seeded epochs over ``n`` examples: each epoch is a fresh
    permutation, so every example is seen once per epoch, and the examples of any
    position in the stream are a pure function of (seed, position)."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self._cache = n, seed, {}

    def take(self, start: int, count: int) -> list[int]:
        out = []
        for k in range(start, start + count):
            epoch, pos = divmod(k, self.n)
            if epoch not in self._cache:
                self._cache = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.n)}
            out.append(int(self._cache[epoch][pos]))
        return out


class CosineSchedule:
    """The learning-rate factor for a step: linear warm-up, then cosine decay to ``min_lr_ratio``.

    The decay follows whichever budget runs out first: the steps (``step / max_steps``) or, when the run has
    ``max_minutes``, the clock (``used``, the share of them spent, which the loop sets before each step). A
    run that the clock stops, as most runs on a small machine are, then ends annealed instead of at a high
    learning rate partway down a schedule made for steps it never reaches ("budgeted training", Li et al.
    2020). An object, not a function, so that LambdaLR saves ``used`` with the scheduler: a resumed run's
    decay goes on from where it was, never back up.
    """

    def __init__(self, cfg: LoopConfig) -> None:
        self.warmup, self.max_steps, self.floor = cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio
        self.used = 0.0

    def __call__(self, step: int) -> float:
        if self.warmup and step < self.warmup:
            return (step + 1) / self.warmup
        span = max(1, self.max_steps - self.warmup)
        progress = min(1.0, max((step - self.warmup) / span, self.used))
        return self.floor + (1 - self.floor) * 0.5 * (1 + math.cos(math.pi * progress))


def resume_key(cfg: LoopConfig) -> dict[str, Any]:
    """The settings a checkpoint must share with the run that resumes it: everything
    that shapes the trajectory, not bookkeeping like how often to save."""
    # distributed: how the run is spread over processes, not where it goes (checkpoints are whole tensors, so a
    # run resumes under another world size or strategy)
    skip = {"max_minutes", "keep_checkpoints", "save_every", "eval_every", "eval_batches", "compile", "device",
            "distributed"}
    return {k: v for k, v in cfg.model_dump(mode="json").items() if k not in skip}


@torch.no_grad()
def evaluate_loss(model, source: BatchSource, batch_size: int, max_batches: int, device, amp) -> float | None:
    """Mean loss per target token over the first ``max_batches`` batches of ``source``."""
    if source is None or len(source) == 0:
        return None
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for b in range(min(max_batches, math.ceil(len(source) / batch_size))):
        idx = list(range(b * batch_size, min(len(source), (b + 1) * batch_size)))
        batch = {k: v.to(device) for k, v in source.batch(idx).items()}
        n = int((batch["labels"] != -100).sum()) if "labels" in batch else len(idx)
        with _amp(device, amp):
            loss = model(**batch).loss
        total += float(loss) * n
        count += n
    model.train(was_training)
    return total / max(count, 1)


def _amp(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


class _SigintToCheckpoint:
    """Turns the first Ctrl-C into a flag the loop checks after its current step, so the
    step finishes, a checkpoint is written, and then KeyboardInterrupt is raised."""

    def __init__(self) -> None:
        self.hit = False
        self._old = None

    def __enter__(self):
        try:
            self._old = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread: leave Ctrl-C alone
            self._old = None
        return self

    def _handle(self, signum, frame):
        if self.hit:  # second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.hit = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


def run_loop(
    model: torch.nn.Module,
    train: BatchSource,
    val: BatchSource | None,
    cfg: LoopConfig,
    work_dir: Path,
    seed: int,
    run_key: dict[str, Any],
    describe: str = "training",
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> LoopResult:
    """Train ``model`` on ``train`` for ``cfg.max_steps`` optimizer steps.

    Checkpoints go to ``work_dir/checkpoints`` every ``cfg.save_every`` steps and on
    Ctrl-C; the metrics log to ``work_dir/log.jsonl``. A run whose ``run_key`` (plus the
    trajectory-shaping settings of ``cfg``) matches the latest checkpoint resumes from it.
    """
    from slmforge._progress import progress_bar

    device, amp, team = _place(model, cfg, seed)
    spread = _spread(model, cfg, team.size, device, lambda m: _adamw(m, cfg)[1])
    trainable, optimizer = [p for p in model.parameters() if p.requires_grad], spread.optimizer
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule := CosineSchedule(cfg))
    key = {"run": run_key, "loop": resume_key(cfg), "seed": seed, **spread.resume_extra}
    ckpt_root, log_file = work_dir / "checkpoints", work_dir / "log.jsonl"
    work_dir.mkdir(parents=True, exist_ok=True)
    start_step, tokens_seen, elapsed_before, resumed_from, history = _resume(
        ckpt_root, log_file, key, model, optimizer, scheduler, describe, log if team.main else None, team.main, spread)

    forward = torch.compile(spread.forward) if cfg.compile else spread.forward
    order = _EpochOrder(len(train), seed)
    t_start = time.monotonic()
    budget_s = (cfg.max_minutes or 0.0) * 60  # 0: no clock
    last_loss, val_loss, stopped_early = float("nan"), None, False
    logf_cm = open(log_file, "a") if team.main else contextlib.nullcontext(None)
    with progress_bar(progress and team.main) as bar, _SigintToCheckpoint() as sigint, logf_cm as logf:
        task = bar.add_task(describe, total=cfg.max_steps, completed=start_step, info="")
        window_t, window_tokens = time.monotonic(), 0
        for step in range(start_step, cfg.max_steps):
            step_t0 = time.monotonic()
            last_loss, n_tokens = _accumulate(forward, train, order, step, cfg, device, amp, team, spread)
            last_loss, n_tokens = team.mean(last_loss), team.total(n_tokens)
            tokens_seen, window_tokens = tokens_seen + n_tokens, window_tokens + n_tokens
            if budget_s:  # the clock's share, the same in every process
                schedule.used = max(schedule.used, team.mean((time.monotonic() - t_start) / budget_s))
            grad_norm = _optimizer_step(trainable, optimizer, scheduler, cfg.grad_clip, spread)
            done = step + 1
            now = time.monotonic()
            tps = window_tokens / max(now - window_t, 1e-9)
            record = {"step": done, "loss": round(last_loss, 5), "lr": scheduler.get_last_lr()[0],
                      "grad_norm": round(grad_norm, 4), "tokens": tokens_seen, "tokens_per_s": round(tps, 1),
                      "step_s": round(now - step_t0, 4)}
            if done % cfg.eval_every == 0 or done == cfg.max_steps:
                val_loss = _validate_into(record, model, val, cfg, device, amp)
            _append(record, history, logf)
            if done % 10 == 0:
                window_t, window_tokens = now, 0
            _show(bar, task, record, val_loss)
            interrupted = sigint.hit
            out_of_time = bool(budget_s) and now >= t_start + budget_s and done < cfg.max_steps
            if done % cfg.save_every == 0 or interrupted or out_of_time:
                extra = {"key": key, "tokens": tokens_seen, "elapsed_s": elapsed_before + time.monotonic() - t_start}
                _checkpoint(team, ckpt_root, done, model, spread, scheduler, extra, cfg.keep_checkpoints)
            if interrupted:
                raise KeyboardInterrupt(f"interrupted at step {done}; checkpoint saved in {ckpt_root}")
            if out_of_time:
                stopped_early = True
                if val_loss is None or "val_loss" not in record:
                    val_loss = evaluate_loss(model, val, cfg.batch_size, cfg.eval_batches, device, amp)
                break
    if start_step >= cfg.max_steps:  # resumed from a checkpoint at the very end
        last_loss = history[-1]["loss"] if history else float("nan")
        val_loss = evaluate_loss(model, val, cfg.batch_size, cfg.eval_batches, device, amp)
    seconds = elapsed_before + time.monotonic() - t_start
    gather_to_plain(spread, model)  # sharded (FSDP, ZeRO-3) weights become whole: the model saves as usual
    return LoopResult(steps=history[-1]["step"] if history else start_step, final_loss=last_loss, val_loss=val_loss,
                      tokens=tokens_seen, seconds=seconds, tokens_per_s=tokens_seen / max(seconds, 1e-9),
                      resumed_from=resumed_from, stopped_early=stopped_early, log=history, processes=team.size,
                      strategy=spread.strategy)


def _show(bar: Any, task: Any, record: dict[str, Any], val_loss: float | None) -> None:
    bar.update(task, completed=record["step"], info=f"loss {record['loss']:.3f}  lr {record['lr']:.2e}  "
               f"{record['tokens_per_s']:,.0f} tok/s" + (f"  val {val_loss:.3f}" if val_loss is not None else ""))


def _append(record: dict[str, Any], history: list[dict[str, Any]], logf: Any) -> None:
    """A step's record into the history, and into log.jsonl (first process) at once: a kill loses no step."""
    if logf is not None:
        logf.write(json.dumps(record) + "\n")
        logf.flush()
    history.append(record)


def _place(model: torch.nn.Module, cfg: LoopConfig, seed: int) -> tuple[torch.device, torch.dtype | None, World]:
    """Move the model to its device in training mode and seed torch; the device, the autocast dtype and
    the process's place in a data-parallel run.

    Raises:
        TrainError: A batch that does not split evenly over the processes.
    """
    device = torch.device(pick_device(cfg.device))
    if not getattr(model, "hf_device_map", None):  # 4-bit (QLoRA) models are placed when loaded
        model.to(device)
    model.train()
    torch.manual_seed(seed)
    team = world(str(device))
    amp = autocast_dtype(loop_precision(cfg, team.size), device)
    if cfg.batch_size % team.size:
        from slmforge.errors import TrainError

        raise TrainError(f"batch_size {cfg.batch_size} must divide evenly over {team.size} processes: each "
                         "takes an equal share of every batch (the global batch stays batch_size).")
    return device, amp, team


def _checkpoint(team: World, root: Path, step: int, model, spread: Spread, scheduler, extra: dict[str, Any],
                keep: int) -> None:
    """Save a checkpoint (the first process writes: the replicas are identical, and FSDP shards are first
    gathered by all), the others waiting for it."""
    if spread.strategy == "deepspeed":
        extra = {**extra, "deepspeed_state": f"deepspeed-{step:06d}"}
        save_deepspeed_state(spread, root / extra["deepspeed_state"])
    state = full_training_state(model, spread.optimizer, spread.accelerator, spread.forward) if spread.gathers else None
    if team.main:
        save_checkpoint(root, step, model, spread.optimizer, scheduler, extra, keep, state)
        if spread.strategy == "deepspeed":
            prune_deepspeed_states(root)  # keep_checkpoints removed the step folders naming the others
    team.barrier()


def _adamw(model: torch.nn.Module, cfg: LoopConfig) -> tuple[list[torch.nn.Parameter], torch.optim.AdamW]:
    """The trainable parameters, and AdamW over them with weight decay on matrices only."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trainable if p.dim() >= 2]
    no_decay = [p for p in trainable if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=1e-8,
    )
    return trainable, optimizer


def _resume(ckpt_root: Path, log_file: Path, key: dict[str, Any], model, optimizer, scheduler, describe: str,
            log: Callable[[str], None] | None, main: bool = True, spread: Spread | None = None
            ) -> tuple[int, int, float, int | None, list[dict[str, Any]]]:
    """Load the latest checkpoint when its key matches, and rewrite the log up to its step.

    Returns:
        (start step, tokens seen, seconds trained before, the step resumed from or None, the log's records).
    """
    start_step, tokens_seen, elapsed_before, resumed_from = 0, 0, 0.0, None
    history: list[dict[str, Any]] = []
    latest = checkpoint_dirs(ckpt_root)
    if latest:
        meta = json.loads((latest[-1] / "state.json").read_text())
        if meta.get("key") == json.loads(json.dumps(key)):
            if spread is not None and spread.strategy == "deepspeed":  # DeepSpeed's engine holds it all
                state = meta
                load_deepspeed_state(spread, ckpt_root / state["deepspeed_state"])
                scheduler.load_state_dict(state["scheduler"])
            else:
                state = load_checkpoint(latest[-1], model, optimizer, scheduler)
            start_step, tokens_seen = state["step"], state["tokens"]
            elapsed_before = state.get("elapsed_s", 0.0)
            resumed_from = start_step
            if log:
                log(f"{describe}: resuming from {latest[-1]} (step {start_step})")
        elif log:
            log(f"{describe}: checkpoints in {ckpt_root} are from a different configuration; starting over")
    if log_file.exists() and resumed_from is not None:
        history = [r for r in map(json.loads, log_file.read_text().splitlines()) if r["step"] <= start_step]
    if main:
        log_file.write_text("".join(json.dumps(r) + "\n" for r in history))
    return start_step, tokens_seen, elapsed_before, resumed_from, history


def _accumulate(forward, train: BatchSource, order: _EpochOrder, step: int, cfg: LoopConfig, device: torch.device,
                amp, team: World = World(), spread: Spread | None = None) -> tuple[float, int]:
    """Forward and backward over one optimizer step's micro-batches (gradients add up in place).

    Returns:
        (the step's loss, tokens in its batches).
    """
    per_step = cfg.batch_size * cfg.grad_accum
    loss_sum, tokens = 0.0, 0
    for micro in range(cfg.grad_accum):
        idx = order.take(step * per_step + micro * cfg.batch_size, cfg.batch_size)[team.rank::team.size]
        batch = {k: v.to(device) for k, v in train.batch(idx).items()}
        n_tokens = train.tokens_in(batch)
        with _amp(device, amp):
            loss = forward(**batch).loss
        if spread is None:
            (loss / cfg.grad_accum).backward()
        else:
            spread.backward(loss, cfg.grad_accum)
        loss_sum += float(loss.detach()) / cfg.grad_accum
        tokens += n_tokens
    return loss_sum, tokens


def _optimizer_step(trainable: list[torch.nn.Parameter], optimizer, scheduler, grad_clip: float | None,
                    spread: Spread | None = None) -> float:
    """Clip (when ``grad_clip``), step the optimizer and the schedule, clear the gradients; the gradient norm
    before clipping (NaN when not clipped)."""
    if spread is not None:
        grad_norm = spread.clip(trainable, grad_clip)
    elif grad_clip:
        grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, grad_clip))
    else:
        grad_norm = float("nan")
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def _validate_into(record: dict[str, Any], model, val: BatchSource | None, cfg: LoopConfig, device: torch.device,
                   amp) -> float | None:
    """The validation loss (None without a validation set), also written into the step's log record."""
    val_loss = evaluate_loss(model, val, cfg.batch_size, cfg.eval_batches, device, amp)
    if val_loss is not None:
        record["val_loss"] = round(val_loss, 5)
        record["val_ppl"] = round(math.exp(min(val_loss, 50)), 3)
    return val_loss
