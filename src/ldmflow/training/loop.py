"""The training engine shared by every stage: resumable, deterministic, atomic, preemption-safe.

A stage (autoencoder, diffusion, ControlNet) describes itself as a :class:`Task` (its model, its loss on
a batch, its validation metrics, its sample images); :func:`fit` runs the loop that every stage needs
the same way: seeded batch order, AdamW with warm-up and cosine decay, gradient accumulation and
clipping, mixed precision, EMA, best and latest checkpoints written atomically, a metrics CSV rebuilt
from the checkpoint's history, early stopping, resume after ``kill -9`` with identical final weights on
CPU, a save on SIGINT / SIGTERM / SIGUSR1 / SIGUSR2 (what schedulers send before a kill), and DDP when
launched by torchrun (each rank with its own random draws, restored on resume).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn

from ldmflow.artifacts import (
    CHECKPOINT_FORMAT,
    RunPaths,
    load_checkpoint,
    run_lock,
    save_checkpoint,
    set_aside_run,
)
from ldmflow.config.common import DataConfig, OptimConfig, TrainConfig
from ldmflow.devices import (
    get_device,
    resolve_deterministic,
    resolve_precision,
    rng_state,
    set_deterministic,
    set_rng_state,
)
from ldmflow.errors import Preempted, TrainingError
from ldmflow.training.batching import EpochBatchSampler, make_loader
from ldmflow.training.distributed import ShardBatches, from_rank0, shards_validation, validate
from ldmflow.training.events import RunEvents
from ldmflow.training.optim import Ema, build_optimizer, lr_factor, update_ema
from ldmflow.training.preemption import SignalFlag
from ldmflow.training.state import EpochTotals, LoopState, write_metrics_csv

log = logging.getLogger(__name__)
# Keys whose change does not change what a run computes, so a run may resume across them.
RESUMABLE_CHANGES = {"train.epochs", "train.log_every", "train.sample_every", "train.checkpoint_every_steps",
                     "train.checkpoint_every_minutes", "train.checkpoint_every_epochs",
                     "train.early_stopping.patience", "train.deterministic",
                     "model.checkpointing"}  # recomputes the same values


def flat_diff(a: dict, b: dict, prefix: str = "") -> set[str]:
    """Dotted keys whose values differ between two nested mappings."""
    keys = set(a) | set(b)
    out = set()
    for k in keys:
        va, vb = a.get(k), b.get(k)
        name = f"{prefix}{k}"
        if isinstance(va, dict) and isinstance(vb, dict):
            out |= flat_diff(va, vb, name + ".")
        elif va != vb:
            out.add(name)
    return out


def autocast(device: torch.device, precision: str):
    """bf16 / fp16 autocast on the device (CUDA or CPU); fp32 is a no-op. ``precision`` as
    :func:`resolve_precision` resolves it ("auto" is resolved here)."""
    if precision == "auto":
        precision = resolve_precision(precision, device)
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def isolated_rng(device: torch.device):
    """Run validation and sample grids without touching the training RNG streams (they may build models
    or draw noise; a resumed run, which skips them for finished epochs, must stay in step)."""
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], device_type=device.type)


def unwrap(model: nn.Module) -> nn.Module:
    """The module under DDP and torch.compile wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


# --------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------


class Task(Protocol):
    """What a stage gives :func:`fit`. ``model`` is the trainable module."""

    model: nn.Module

    def loss(self, model: nn.Module, batch: dict, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Total loss and its named parts (detached or not) for one micro-batch already on the device."""

    def validate(self, model: nn.Module, loader) -> dict[str, float]:
        """Validation metrics (``val_loss`` at least) of ``model`` (the EMA model when EMA is on)."""

    def write_samples(self, model: nn.Module, epoch: int, path: Path) -> None:
        """Write an image of samples or reconstructions to ``path``."""


@dataclass
class FitConfig:
    """What the loop needs from an experiment: its seed, data, optimiser and training sections."""

    stage: str
    seed: int
    data: DataConfig
    optim: OptimConfig
    train: TrainConfig
    resolved: dict  # the whole resolved experiment config, stored in every checkpoint
    extra: dict = field(default_factory=dict)  # stage provenance stored in checkpoints (e.g. the store's AE)


def _improved(value: float, best: float | None, mode: str, min_delta: float) -> bool:
    if value is None or not math.isfinite(value):
        return False
    if best is None:
        return True
    return value < best - min_delta if mode == "min" else value > best + min_delta


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


@dataclass
class Run:
    """What the loop's helpers share: the models, optimiser, loaders and the resumable loop ``state``."""

    task: Task
    fc: FitConfig
    name: str
    paths: RunPaths
    device: torch.device
    world: int
    writer: bool  # rank 0: the only process that writes checkpoints, metrics and samples
    model: nn.Module
    step_model: nn.Module  # the model under DDP / torch.compile, used for the forward pass
    ema: Ema | None
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    sampler: EpochBatchSampler
    train_loader: Any
    val_loader: Any
    micro_per_epoch: int
    total_steps: int
    flag_group: Any  # the process group of the per-step signal flag (gloo: CPU only); None outside DDP
    state: LoopState = field(default_factory=LoopState)
    last_save: float = field(default_factory=time.monotonic)
    precision: str = "fp32"  # train.precision resolved on the device (resolve_precision)


def start_run(task: Task, train_set, val_set, fc: FitConfig, out_dir: str | Path, name: str,
              device: torch.device | None, workers: int, sample_weights: torch.Tensor | None) -> Run:
    """Seed, build the optimiser, the scaler, the EMA and the loaders, and wrap the model for DDP / compile."""
    device = device or get_device()
    world, rank = (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)
    tcfg, ocfg = fc.train, fc.optim
    # DiT's per-rank seed: each rank draws its own timesteps, noise, label dropout and KL samples (one
    # process keeps the plain seed); the batch order has its own generator, shared, so shards stay disjoint.
    set_deterministic(fc.seed * world + rank, resolve_deterministic(tcfg.deterministic, device))

    model = task.model.to(device)
    ema = Ema(model, tcfg.ema.decay, tcfg.ema.warmup) if tcfg.ema.decay > 0 else None
    optimizer = build_optimizer(model, fc)
    precision = resolve_precision(tcfg.precision, device)
    scaler = torch.amp.GradScaler(device.type, init_scale=tcfg.fp16_init_scale, enabled=precision == "fp16")

    sampler = EpochBatchSampler(len(train_set), fc.data.batch_size, fc.seed, sample_weights, rank, world)
    val_sampler: Any = EpochBatchSampler(len(val_set), fc.data.batch_size, fc.seed, drop_last=False, shuffle=False)
    if world > 1 and shards_validation(task):  # each rank validates its share of the batches
        val_sampler = ShardBatches(val_sampler, rank, world)
    pin = device.type == "cuda"
    steps_per_epoch = sampler.num_batches() // ocfg.accumulate
    if steps_per_epoch < 1:
        raise TrainingError(
            f"{name}: {len(train_set)} training samples make no optimizer step of data.batch_size="
            f"{fc.data.batch_size} x optim.accumulate={ocfg.accumulate} x {world} process(es); lower them")

    step_model: nn.Module = model
    flag_group = None
    if world > 1:
        # the per-step signal flag and RNG gathers are host data: a gloo group keeps them off the GPU
        flag_group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else None
        device_ids = [device.index] if device.type == "cuda" else None
        step_model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    if tcfg.compile and device.type == "cuda":
        step_model = torch.compile(step_model, mode="reduce-overhead" if tcfg.cuda_graphs else None)
    return Run(task, fc, name, RunPaths(Path(out_dir), name), device, world, rank == 0, model, step_model, ema,
               optimizer, scaler, sampler, make_loader(train_set, sampler, workers, pin),
               make_loader(val_set, val_sampler, workers, pin),
               # leftover micro-batches would leak into the next epoch
               micro_per_epoch=steps_per_epoch * ocfg.accumulate, total_steps=steps_per_epoch * tcfg.epochs,
               flag_group=flag_group, precision=precision)


def save_state(run: Run, path: Path, resumable: bool = True) -> None:
    """Checkpoint everything a resume needs: weights, EMA, optimiser, scaler, every rank's RNG, loop state.
    ``resumable=False`` (the best checkpoint, read for inference and fine-tuning, never resumed from): weights,
    EMA and loop state alone, half the bytes, written by rank 0 without a collective.

    Under DDP every rank calls the resumable save at the same points (it gathers the RNG states); rank 0 writes."""
    fc, device = run.fc, run.device
    rngs = [rng_state(device)]
    if resumable:
        run.last_save = time.monotonic()
    if resumable and run.world > 1:
        gathered: list | None = [None] * run.world if run.writer else None
        dist.gather_object(rngs[0], gathered, dst=0, group=run.flag_group)
        rngs = gathered or []
    if not run.writer:
        return
    state = {"format": CHECKPOINT_FORMAT, "stage": fc.stage, "name": run.name, "config": fc.resolved, "extra": fc.extra,
             "model": unwrap(run.model).state_dict(), "ema": run.ema.model.state_dict() if run.ema else None,
             **run.state.to_checkpoint()}
    if resumable:
        state |= {"optimizer": run.optimizer.state_dict(),
                  "scaler": run.scaler.state_dict() if run.scaler.is_enabled() else None,
                  "rng": rngs}  # rank r's states at index r
    save_checkpoint(state, path)


def load_state(run: Run, ckpt: dict) -> None:
    """Put what :func:`save_state` wrote back into ``run``: weights, EMA, optimiser, scaler, RNG, loop state."""
    unwrap(run.model).load_state_dict(ckpt["model"])
    run.optimizer.load_state_dict(ckpt["optimizer"])
    if run.ema is not None and ckpt.get("ema") is not None:
        run.ema.model.load_state_dict(ckpt["ema"])
    if ckpt.get("scaler"):
        run.scaler.load_state_dict(ckpt["scaler"])
    states = ckpt["rng"] if isinstance(ckpt["rng"], list) else [ckpt["rng"]]  # one per rank
    if len(states) == run.world:
        set_rng_state(states[dist.get_rank() if run.world > 1 else 0], run.device)
    else:
        log.warning("%s was saved by %d process(es), this run has %d: the random draws do not continue the "
                    "saved ones, so the run is no longer reproducible", run.paths.latest, len(states), run.world)
    run.state = LoopState.from_checkpoint(ckpt)


def resume(run: Run) -> dict | None:
    """Load the latest checkpoint into ``run`` when it was made by the same config and inputs; returns where
    the run resumed (epoch, step, micro-batch), or None for a fresh run."""
    fc = run.fc
    if not run.paths.latest.is_file():
        return None
    ckpt = load_checkpoint(run.paths.latest)
    changed = flat_diff(ckpt["config"], fc.resolved) - RESUMABLE_CHANGES
    changed |= {f"inputs.{k}" for k in flat_diff(ckpt.get("extra", {}), fc.extra) if k.endswith("sha256")}
    if changed or ckpt.get("stage") != fc.stage:
        log.warning("%s: config changed (%s); starting a fresh run", run.paths.latest, ", ".join(sorted(changed)))
        if run.writer:  # the earlier run's outputs move to RUN/previous/: no stale best checkpoint or sample
            set_aside_run(run.paths)
        return None
    load_state(run, ckpt)
    state = run.state
    log.info("resumed %s from epoch %d, step %d", run.name, state.epoch, state.step)
    return {"epoch": state.epoch, "step": state.step, "micro": state.micro}


def forward_backward(run: Run, batch: dict, totals: EpochTotals, sync: bool) -> None:
    """One micro-batch: loss and backward, adding to the epoch's sums. ``sync``: whether DDP all-reduces the
    gradients (the last micro-batch of an accumulation)."""
    ocfg = run.fc.optim
    no_sync = contextlib.nullcontext() if (run.world == 1 or sync) else run.step_model.no_sync()
    with no_sync:
        with autocast(run.device, run.precision):
            loss, parts = run.task.loss(run.step_model, batch, run.state.step)
        run.scaler.scale(loss / ocfg.accumulate).backward()
    totals.loss_bad = totals.loss_bad | ~torch.isfinite(loss.detach())
    for k, v in {"loss": loss, **parts}.items():
        zero = torch.zeros((), device=run.device, dtype=torch.float64)
        totals.sums[k] = totals.sums.get(k, zero) + v.detach().double()
    totals.n_seen += 1


def optimizer_step(run: Run, totals: EpochTotals) -> None:
    """Clip, step (a non-finite step is zeroed on the device and counted), clear the gradients.

    With fp16's grad scaler, a step whose scaled gradients overflowed is skipped whole by ``scaler.step``
    (no weight decay, no moment update) and lowers the scale: expected early on, so it is counted as
    skipped, not bad; only a non-finite loss, which no scale can fix, counts as bad."""
    params = [p for p in run.model.parameters() if p.grad is not None]
    run.scaler.unscale_(run.optimizer)
    norm = torch.nn.utils.clip_grad_norm_(params, run.fc.optim.grad_clip or float("inf"))
    finite = torch.isfinite(norm)
    # The counts are read only every log_every steps, so the loop never waits on the GPU for them.
    if run.scaler.is_enabled():
        totals.skipped = totals.skipped + (~finite).long()
        totals.bad = totals.bad + totals.loss_bad.long()
    else:
        for p in params:
            p.grad.masked_fill_(~finite, 0.0)
        totals.bad = totals.bad + (~finite).long()
    totals.loss_bad = torch.zeros_like(totals.loss_bad)
    totals.grad_norm_sum = totals.grad_norm_sum + torch.where(finite, norm.double(), 0.0)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)


def count_bad_steps(run: Run, totals: EpochTotals) -> None:
    """Add the epoch's non-finite steps to the run's count; stop past ``train.max_bad_steps``."""
    tcfg, state = run.fc.train, run.state
    bad, skipped = torch.stack([totals.bad, totals.skipped]).tolist()  # one wait for the device, not two
    state.bad_steps += bad
    totals.bad.zero_()
    totals.skipped.zero_()
    if skipped:
        log.info("%s: the fp16 grad scaler skipped %d overflowing step(s) before step %d; loss scale now %g",
                 run.name, skipped, state.step, run.scaler.get_scale())
    if state.bad_steps > tcfg.max_bad_steps:
        raise TrainingError(
            f"{run.name}: {state.bad_steps} optimizer step(s) with a NaN or inf loss/gradient "
            f"(train.max_bad_steps={tcfg.max_bad_steps}). Lower optim.lr, set optim.grad_clip, or use "
            "precision fp32/bf16.")


def checkpoint_mid_epoch(run: Run, totals: EpochTotals, signals: SignalFlag) -> None:
    """Save the latest checkpoint when one is due (steps, minutes) or a signal came; on a signal, stop."""
    tcfg, state = run.fc.train, run.state
    # every step: DDP ranks agree on the signal and on the clock (rank clocks differ; the save is collective)
    stop, late = signals.poll(run.world, run.flag_group, also=minutes_due(run))
    due = (tcfg.checkpoint_every_steps and state.step % tcfg.checkpoint_every_steps == 0) or late
    # at the epoch's last step the epoch's end decides, with the epoch's metrics row
    if (due or stop) and state.micro < run.micro_per_epoch:
        state.partial = totals.partial()
        save_state(run, run.paths.latest)
        if stop:
            raise Preempted(f"{run.name}: signal {signals.received} received; saved {run.paths.latest} "
                            f"at epoch {state.epoch}, step {state.step} ({signals.name})")


def minutes_due(run: Run) -> bool:
    """Whether ``train.checkpoint_every_minutes`` have passed since the last resumable save (this rank's clock)."""
    return bool(run.fc.train.checkpoint_every_minutes
                and time.monotonic() - run.last_save > run.fc.train.checkpoint_every_minutes * 60)


def train_epoch(run: Run, signals: SignalFlag, bar: RunEvents) -> EpochTotals:
    """Train from the run's position to the end of its current epoch, one optimizer step per turn."""
    ocfg, tcfg, state = run.fc.optim, run.fc.train, run.state
    run.model.train()
    run.sampler.set_epoch(state.epoch, start=state.micro)
    totals = EpochTotals.resume(state.partial, run.device)
    batches = iter(run.train_loader)
    while state.micro < run.micro_per_epoch:
        set_lr(run.optimizer, ocfg.lr * lr_factor(state.step, run.total_steps, ocfg))
        for i in range(ocfg.accumulate):
            forward_backward(run, to_device(next(batches), run.device), totals, sync=i == ocfg.accumulate - 1)
            state.micro += 1
        optimizer_step(run, totals)
        state.step += 1
        update_ema(run.ema, run.model, state.step)
        if state.step % tcfg.log_every == 0 or state.micro == run.micro_per_epoch:
            count_bad_steps(run, totals)
            bar.log_point(totals, state.micro)
        checkpoint_mid_epoch(run, totals, signals)
    count_bad_steps(run, totals)
    return totals


def epoch_row(run: Run, totals: EpochTotals) -> dict[str, Any]:
    """The epoch's metrics row: mean training losses (over every rank), validation metrics, speed."""
    n_seen, seconds = totals.n_seen, totals.seconds()
    if run.world > 1:
        for v in totals.sums.values():
            dist.all_reduce(v)
        n_seen *= run.world
    row: dict[str, Any] = {"epoch": run.state.epoch + 1, "step": run.state.step}
    row.update({f"train_{k}": float(v) / max(n_seen, 1) for k, v in totals.sums.items()})
    eval_model = eval_model_of(run)
    eval_model.eval()
    with torch.no_grad(), autocast(run.device, run.precision), isolated_rng(run.device):
        row.update(validate(run.task, eval_model, run.val_loader, run.flag_group))
    row["grad_norm"] = float(totals.grad_norm_sum) / max(1, run.micro_per_epoch // run.fc.optim.accumulate)
    row["lr"] = run.optimizer.param_groups[0]["lr"]
    row["samples_per_s"] = n_seen * run.fc.data.batch_size / max(seconds, 1e-9)
    row["seconds"] = seconds
    return row


def eval_model_of(run: Run) -> nn.Module:
    """The model that is validated, sampled and kept as "best": the EMA model when EMA is on."""
    return run.ema.model if run.ema is not None else run.model


def record_epoch(state: LoopState, row: dict[str, Any], tcfg: TrainConfig) -> bool:
    """Close the epoch in ``state`` (history, position, early stopping); returns whether it is the best so far."""
    es = tcfg.early_stopping
    metric = row.get(es.metric)
    if metric is None:
        raise TrainingError(f"train.early_stopping.metric {es.metric!r} is not a metrics column; "
                            f"allowed: {', '.join(k for k in row if k not in ('epoch', 'step'))}")
    state.history.append(row)
    state.epoch, state.micro, state.partial = state.epoch + 1, 0, None
    best = _improved(metric, state.best, es.mode, es.min_delta)
    if best:
        state.best, state.best_epoch, state.bad_epochs = metric, state.epoch, 0
    else:
        state.bad_epochs += 1
    state.early_stopped = bool(es.patience and state.bad_epochs >= es.patience)
    return best


def end_epoch(run: Run, row: dict[str, Any], signals: SignalFlag) -> bool:
    """Record the epoch, keep the best checkpoint, write samples, the metrics and, when due, the latest checkpoint
    (every ``train.checkpoint_every_epochs``, by the minutes, at the last epoch, on early stopping or a signal;
    a resume rebuilds the CSV, which runs ahead, from the checkpoint). Returns whether a signal came."""
    tcfg, state = run.fc.train, run.state
    # rank 0's row decides "best" and early stopping for every rank
    if record_epoch(state, from_rank0(row, run.flag_group), tcfg):
        save_state(run, run.paths.best, resumable=False)
    last_epoch = state.early_stopped or state.epoch >= tcfg.epochs
    if run.writer and (state.epoch % tcfg.sample_every == 0 or last_epoch):
        with torch.no_grad(), isolated_rng(run.device):
            run.task.write_samples(eval_model_of(run), state.epoch, run.paths.sample(state.epoch))
    # one agreement for DDP ranks: a signal on any rank, or the clock of any rank, makes it due on every rank
    stop, late = signals.poll(run.world, run.flag_group, also=minutes_due(run))
    if last_epoch or stop or late or (tcfg.checkpoint_every_epochs and state.epoch % tcfg.checkpoint_every_epochs == 0):
        save_state(run, run.paths.latest)
    if run.writer:
        write_metrics_csv(state.history, run.paths.metrics)
    log.info("%s epoch %d/%d: %s", run.name, state.epoch, tcfg.epochs,
             ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    return stop


def fit(task: Task, train_set, val_set, fc: FitConfig, out_dir: str | Path, name: str, *,
        device: torch.device | None = None, workers: int = 0, sample_weights: torch.Tensor | None = None,
        progress: bool | None = None) -> dict:
    """Train ``task.model`` until ``train.epochs`` or early stopping; resume from the latest checkpoint. The run
    is this process's while it trains (:func:`ldmflow.artifacts.run_lock`: a second process is refused).

    Returns the final state summary: ``{"epoch", "best": {...}, "history": [...], "resumed_from"}``.
    """
    # one process owns a run folder's run; under DDP rank 0 holds the lock for every rank
    owner = not dist.is_initialized() or dist.get_rank() == 0
    with run_lock(RunPaths(Path(out_dir), name)) if owner else contextlib.nullcontext():
        return _fit(task, train_set, val_set, fc, out_dir, name, device, workers, sample_weights, progress)


def _fit(task: Task, train_set, val_set, fc: FitConfig, out_dir: str | Path, name: str, device: torch.device | None,
         workers: int, sample_weights: torch.Tensor | None, progress: bool | None) -> dict:
    run = start_run(task, train_set, val_set, fc, out_dir, name, device, workers, sample_weights)
    resumed_from = resume(run)
    state = run.state
    if run.writer and state.history:
        write_metrics_csv(state.history, run.paths.metrics)
    with SignalFlag() as signals, RunEvents(run, resumed_from is not None, progress) as bar:
        while not state.early_stopped and state.epoch < fc.train.epochs:
            totals = train_epoch(run, signals, bar)
            row = epoch_row(run, totals)
            stop = end_epoch(run, row, signals)
            bar.end_epoch(row)
            if stop:
                raise Preempted(f"{name}: signal {signals.received} received after epoch {state.epoch}; "
                                f"saved {run.paths.latest} ({signals.name})")
    if run.writer and not run.paths.best.is_file():
        raise TrainingError(f"{name}: no epoch gave a finite {fc.train.early_stopping.metric}; no best checkpoint")
    return {"epoch": state.epoch, "best": {"metric": fc.train.early_stopping.metric, "value": state.best,
            "epoch": state.best_epoch}, "history": state.history, "resumed_from": resumed_from}
