"""The training engine shared by every stage: resumable, deterministic, atomic, preemption-safe.

A stage (autoencoder, diffusion, ControlNet) describes itself as a :class:`Task` (its model, its loss on
a batch, its validation metrics, its sample images); :func:`fit` runs the loop that every stage needs
the same way: seeded batch order, AdamW with warm-up and cosine decay, gradient accumulation and
clipping, mixed precision, EMA, best and latest checkpoints written atomically, a metrics CSV rebuilt
from the checkpoint's history, early stopping, resume after ``kill -9`` with identical final weights on
CPU, a save on SIGTERM / SIGUSR1 (what schedulers send before a kill), and DDP when launched by torchrun.
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn

from ldmflow.artifacts import CHECKPOINT_FORMAT, RunPaths, atomic_write_bytes, load_checkpoint, save_checkpoint
from ldmflow.config.common import DataConfig, OptimConfig, TrainConfig
from ldmflow.errors import Preempted, TrainingError
from ldmflow.training.batching import EpochBatchSampler, make_loader
from ldmflow.training.devices import get_device, set_deterministic
from ldmflow.training.optim import Ema, build_optimizer, lr_factor, update_ema
from ldmflow.training.preemption import SignalFlag

log = logging.getLogger(__name__)
# Keys whose change does not change what a run computes, so a run may resume across them.
RESUMABLE_CHANGES = {"train.epochs", "train.log_every", "train.sample_every", "train.checkpoint_every_steps",
                     "train.checkpoint_every_minutes", "train.early_stopping.patience"}




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
    """bf16 / fp16 autocast on CUDA; a no-op on CPU (CPU always trains in fp32)."""
    if device.type != "cuda" or precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def isolated_rng(device: torch.device):
    """Run validation and sample grids without touching the training RNG streams (they may build models
    or draw noise; a resumed run, which skips them for finished epochs, must stay in step)."""
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], device_type=device.type)


def unwrap(model: nn.Module) -> nn.Module:
    """The module under DDP and torch.compile wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


# --------------------------------------------------------------------------------------------------
# Metrics and progress
# --------------------------------------------------------------------------------------------------


def write_metrics_csv(history: list[dict], path: str | Path) -> None:
    """Rewrite the whole metrics CSV from the checkpoint's history, atomically (never out of step)."""
    columns: list[str] = []
    for row in history:
        columns += [k for k in row if k not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    for row in history:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    atomic_write_bytes(path, buf.getvalue().encode())


class Progress:
    """A one-line progress bar on an interactive terminal; silent in batch jobs (logs carry epochs)."""

    def __init__(self, enabled: bool | None = None):
        self.enabled = sys.stderr.isatty() if enabled is None else enabled

    def update(self, text: str) -> None:
        if self.enabled:
            sys.stderr.write("\r" + text[:150].ljust(80))
            sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")


# --------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------


class Task(Protocol):
    """What a stage gives :func:`fit`. ``model`` is the trainable module."""

    model: nn.Module

    def loss(self, model: nn.Module, batch: dict, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Total loss and its named parts (detached or not) for one micro-batch already on the device."""

    def evaluate(self, model: nn.Module, loader) -> dict[str, float]:
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


def _device_batch(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def fit(task: Task, train_set, val_set, fc: FitConfig, out_dir: str | Path, name: str, *,
        device: torch.device | None = None, workers: int = 0, sample_weights: torch.Tensor | None = None,
        progress: bool | None = None) -> dict:
    """Train ``task.model`` until ``train.epochs`` or early stopping; resume from the latest checkpoint.

    Returns the final state summary: ``{"epoch", "best": {...}, "history": [...], "resumed_from"}``.
    """
    paths = RunPaths(Path(out_dir), name)
    device = device or get_device()
    world, rank = (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)
    writer = rank == 0
    tcfg, ocfg = fc.train, fc.optim
    set_deterministic(fc.seed)

    model = task.model.to(device)
    ema = Ema(model, tcfg.ema.decay, tcfg.ema.warmup) if tcfg.ema.decay > 0 else None
    optimizer = build_optimizer(model.parameters(), ocfg, device)
    use_scaler = device.type == "cuda" and tcfg.precision == "fp16"
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)

    sampler = EpochBatchSampler(len(train_set), fc.data.batch_size, fc.seed, sample_weights, rank, world)
    val_sampler = EpochBatchSampler(len(val_set), fc.data.batch_size, fc.seed, drop_last=False, shuffle=False)
    pin = device.type == "cuda"
    train_loader = make_loader(train_set, sampler, workers, pin)
    val_loader = make_loader(val_set, val_sampler, workers, pin)
    steps_per_epoch = sampler.num_batches() // ocfg.accumulate
    if steps_per_epoch < 1:
        raise TrainingError(
            f"{name}: {len(train_set)} training samples make no optimizer step of data.batch_size="
            f"{fc.data.batch_size} x optim.accumulate={ocfg.accumulate} x {world} process(es); lower them")
    micro_per_epoch = steps_per_epoch * ocfg.accumulate  # leftover micro-batches would leak into the next epoch
    total_steps = steps_per_epoch * tcfg.epochs

    # ---- resume --------------------------------------------------------------------------------
    state = {"epoch": 0, "step": 0, "micro": 0, "best": None, "best_epoch": None, "bad_epochs": 0,
             "history": [], "early_stopped": False, "bad_steps": 0, "partial": None}
    resumed_from = None
    if paths.latest.is_file():
        ckpt = load_checkpoint(paths.latest)
        changed = flat_diff(ckpt["config"], fc.resolved) - RESUMABLE_CHANGES
        changed |= {f"inputs.{k}" for k in flat_diff(ckpt.get("extra", {}), fc.extra) if k.endswith("sha256")}
        if changed or ckpt.get("stage") != fc.stage:
            log.warning("%s: config changed (%s); starting a fresh run", paths.latest, ", ".join(sorted(changed)))
            if writer:  # a fresh run moves the earlier one's outputs to RUN/previous/
                from ldmflow.artifacts import set_aside_run

                set_aside_run(paths)
        else:
            unwrap(model).load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            if ema is not None and ckpt.get("ema") is not None:
                ema.model.load_state_dict(ckpt["ema"])
            if ckpt.get("scaler"):
                scaler.load_state_dict(ckpt["scaler"])
            torch.set_rng_state(ckpt["rng"]["torch"])
            if device.type == "cuda" and ckpt["rng"].get("cuda") is not None:
                torch.cuda.set_rng_state(ckpt["rng"]["cuda"], device)
            state.update({k: ckpt[k] for k in state if k in ckpt})
            resumed_from = {"epoch": state["epoch"], "step": state["step"], "micro": state["micro"]}
            log.info("resumed %s from epoch %d, step %d", name, state["epoch"], state["step"])
    if writer and state["history"]:
        write_metrics_csv(state["history"], paths.metrics)

    def checkpoint(path: Path) -> None:
        if not writer:
            return
        save_checkpoint({
            "format": CHECKPOINT_FORMAT, "stage": fc.stage, "name": name, "config": fc.resolved, "extra": fc.extra,
            "model": unwrap(model).state_dict(), "ema": ema.model.state_dict() if ema else None,
            "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict() if use_scaler else None,
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None},
            **{k: state[k] for k in state},
        }, path)

    step_model: nn.Module = model
    if world > 1:
        step_model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if tcfg.compile and device.type == "cuda":
        step_model = torch.compile(step_model, mode="reduce-overhead" if tcfg.cuda_graphs else None)

    bar = Progress(progress if writer else False)
    last_save = time.monotonic()
    with SignalFlag() as signals:
        while not state["early_stopped"] and state["epoch"] < tcfg.epochs:
            epoch = state["epoch"]
            model.train()
            sampler.set_epoch(epoch, start=state["micro"])
            partial = state["partial"] or {}
            sums = {k: torch.tensor(v, device=device, dtype=torch.float64) for k, v in partial.get("sums", {}).items()}
            n_seen = partial.get("n_seen", 0)
            grad_norm_sum = torch.tensor(partial.get("grad_norm_sum", 0.0), device=device, dtype=torch.float64)
            bad = torch.tensor(0, device=device)
            t0, seconds_before = time.monotonic(), partial.get("seconds", 0.0)
            micro = state["micro"]
            for batch in train_loader:
                if micro >= micro_per_epoch:
                    break
                batch = _device_batch(batch, device)
                lr = ocfg.lr * lr_factor(state["step"], total_steps, ocfg)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                last_micro = (micro + 1) % ocfg.accumulate == 0
                sync = contextlib.nullcontext() if (world == 1 or last_micro) else step_model.no_sync()
                with sync:
                    with autocast(device, tcfg.precision):
                        loss, parts = task.loss(step_model, batch, state["step"])
                    scaler.scale(loss / ocfg.accumulate).backward()
                for k, v in {"loss": loss, **parts}.items():
                    sums[k] = sums.get(k, torch.zeros((), device=device, dtype=torch.float64)) + v.detach().double()
                n_seen += 1
                micro += 1
                if not last_micro:
                    continue
                scaler.unscale_(optimizer)
                params = [p for p in model.parameters() if p.grad is not None]
                norm = torch.nn.utils.clip_grad_norm_(params, ocfg.grad_clip or float("inf"))
                finite = torch.isfinite(norm)
                # A non-finite step is zeroed on the device and counted; the count is read only every
                # log_every steps, so the loop never waits on the GPU to decide.
                if not use_scaler:
                    for p in params:
                        p.grad.masked_fill_(~finite, 0.0)
                bad = bad + (~finite).long()
                grad_norm_sum = grad_norm_sum + torch.where(finite, norm.double(), 0.0)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                state["step"] += 1
                update_ema(ema, model, state["step"])
                at_log = state["step"] % tcfg.log_every == 0 or micro == micro_per_epoch
                if at_log:
                    state["bad_steps"] += int(bad.item())
                    bad.zero_()
                    if state["bad_steps"] > tcfg.max_bad_steps:
                        raise TrainingError(
                            f"{name}: {state['bad_steps']} optimizer step(s) with a NaN or inf loss/gradient "
                            f"(train.max_bad_steps={tcfg.max_bad_steps}); last loss {float(loss.detach()):.4g}. "
                            "Lower optim.lr, set optim.grad_clip, or use precision fp32/bf16."
                        )
                    bar.update(f"{name} epoch {epoch + 1}/{tcfg.epochs} batch {micro}/{micro_per_epoch} "
                               f"loss {float(sums['loss'] / n_seen):.4f}")
                # one process checks its flag every step; DDP ranks agree at log points
                stop = signals.poll(world, device) if (world == 1 or at_log) else False
                minutes = tcfg.checkpoint_every_minutes
                due = (tcfg.checkpoint_every_steps and state["step"] % tcfg.checkpoint_every_steps == 0) or (
                    minutes and time.monotonic() - last_save > minutes * 60)
                if (due or stop) and micro < micro_per_epoch:
                    state["micro"] = micro
                    state["partial"] = {"sums": {k: float(v) for k, v in sums.items()}, "n_seen": n_seen,
                                        "grad_norm_sum": float(grad_norm_sum),
                                        "seconds": seconds_before + time.monotonic() - t0}
                    checkpoint(paths.latest)
                    last_save = time.monotonic()
                    if stop:
                        raise Preempted(f"{name}: signal {signals.received} received; saved {paths.latest} "
                                        f"at epoch {epoch}, step {state['step']}")

            # ---- end of epoch: validate, keep best and latest, write metrics -----------------------
            state["bad_steps"] += int(bad.item())
            if state["bad_steps"] > tcfg.max_bad_steps:
                raise TrainingError(f"{name}: {state['bad_steps']} optimizer step(s) with a NaN or inf loss")
            seconds = seconds_before + time.monotonic() - t0
            if world > 1:
                for v in sums.values():
                    dist.all_reduce(v)
                n_seen *= world
            row: dict[str, Any] = {"epoch": epoch + 1, "step": state["step"]}
            row.update({f"train_{k}": float(v) / max(n_seen, 1) for k, v in sums.items()})
            eval_model = ema.model if ema is not None else model
            eval_model.eval()
            with torch.no_grad(), autocast(device, tcfg.precision), isolated_rng(device):
                row.update(task.evaluate(eval_model, val_loader))
            row["grad_norm"] = float(grad_norm_sum) / max(1, micro_per_epoch // ocfg.accumulate)
            row["lr"] = optimizer.param_groups[0]["lr"]
            row["samples_per_s"] = n_seen * fc.data.batch_size / max(seconds, 1e-9)
            row["seconds"] = seconds
            state["history"].append(row)
            state["epoch"], state["micro"], state["partial"] = epoch + 1, 0, None

            es = tcfg.early_stopping
            metric = row.get(es.metric)
            if metric is None:
                raise TrainingError(f"train.early_stopping.metric {es.metric!r} is not a metrics column; "
                                    f"allowed: {', '.join(k for k in row if k not in ('epoch', 'step'))}")
            if _improved(metric, state["best"], es.mode, es.min_delta):
                state["best"], state["best_epoch"], state["bad_epochs"] = metric, epoch + 1, 0
                checkpoint(paths.best)
            else:
                state["bad_epochs"] += 1
            state["early_stopped"] = bool(es.patience and state["bad_epochs"] >= es.patience)
            last_epoch = state["early_stopped"] or state["epoch"] >= tcfg.epochs
            if writer and ((epoch + 1) % tcfg.sample_every == 0 or last_epoch):
                with torch.no_grad(), isolated_rng(device):
                    task.write_samples(eval_model, epoch + 1, paths.sample(epoch + 1))
            checkpoint(paths.latest)
            last_save = time.monotonic()
            if writer:
                write_metrics_csv(state["history"], paths.metrics)
            log.info("%s epoch %d/%d: %s", name, epoch + 1, tcfg.epochs,
                     ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
            if signals.poll(world, device):
                raise Preempted(f"{name}: signal {signals.received} received after epoch {epoch + 1}; "
                                f"saved {paths.latest}")
    bar.close()
    if writer and not paths.best.is_file():
        raise TrainingError(f"{name}: no epoch gave a finite {tcfg.early_stopping.metric}; no best checkpoint")
    return {"epoch": state["epoch"], "best": {"metric": tcfg.early_stopping.metric, "value": state["best"],
            "epoch": state["best_epoch"]}, "history": state["history"], "resumed_from": resumed_from}
