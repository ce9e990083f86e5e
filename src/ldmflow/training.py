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
import copy
import csv
import io
import logging
import math
import os
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Protocol

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .config import DataConfig, OptimConfig, TrainConfig

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "ldmflow-checkpoint-v1"
# Keys whose change does not change what a run computes, so a run may resume across them.
RESUMABLE_CHANGES = {"train.epochs", "train.log_every", "train.sample_every", "train.checkpoint_every_steps",
                     "train.checkpoint_every_minutes", "train.early_stopping.patience"}


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite losses, a checkpoint that does not fit the config)."""


class Preempted(RuntimeError):
    """A scheduler signal arrived; the latest checkpoint was saved and the run can be resumed."""


# --------------------------------------------------------------------------------------------------
# Devices, seeds and checkpoints
# --------------------------------------------------------------------------------------------------


def get_device(name: str | None = None) -> torch.device:
    """The device to train on: ``name`` when given ('cpu', 'cuda', 'cuda:1'), else CUDA when present."""
    if name and name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", 0)) if dist.is_initialized() else 0
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def set_deterministic(seed: int = 42) -> None:
    """Seed Python, NumPy and torch, and ask torch for deterministic kernels (same seed, same run on CPU)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True, warn_only=True)
    if torch.cuda.is_available():
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temporary file beside ``path``, flush it to disk, then rename: never a half file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def save_checkpoint(state: dict, path: str | Path) -> None:
    """Atomically save a checkpoint dict (tensors, numbers, strings, lists and dicts only)."""
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint as untrusted input (``weights_only=True``), with a clear error if it is not one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt or unsafe files
        raise TrainingError(f"{path}: not a readable ldmflow checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise TrainingError(f"{path}: not an ldmflow checkpoint (format {CHECKPOINT_FORMAT} expected)")
    return state


def inference_weights(state: dict) -> dict:
    """The weights to sample or evaluate with: the EMA weights when the run kept them."""
    return state["ema"] if state.get("ema") is not None else state["model"]


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


# --------------------------------------------------------------------------------------------------
# Batches: seeded, resumable, weighted, sharded
# --------------------------------------------------------------------------------------------------


class EpochBatchSampler:
    """Batches of dataset indices whose order depends only on (seed, epoch): resumable mid-epoch.

    With ``weights`` the epoch draws n indices with replacement in proportion to them (class balance);
    otherwise a permutation. With DDP each rank takes its slice of every global batch, so 2 ranks at
    batch B see the same samples as 1 rank at batch 2B.
    """

    def __init__(self, n: int, batch_size: int, seed: int, weights: torch.Tensor | None = None,
                 rank: int = 0, world_size: int = 1, drop_last: bool = True, shuffle: bool = True):
        self.n, self.batch_size, self.seed, self.weights = n, batch_size, seed, weights
        self.rank, self.world_size, self.drop_last, self.shuffle = rank, world_size, drop_last, shuffle
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def num_batches(self) -> int:
        global_batch = self.batch_size * self.world_size
        if self.drop_last and self.n >= global_batch:
            return self.n // global_batch
        return math.ceil(self.n / global_batch)

    def order(self) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.n)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        if self.weights is not None:
            return torch.multinomial(self.weights, self.n, replacement=True, generator=gen)
        return torch.randperm(self.n, generator=gen)

    def __iter__(self) -> Iterator[list[int]]:
        order = self.order()
        global_batch = self.batch_size * self.world_size
        for b in range(self.start, self.num_batches()):
            chunk = order[b * global_batch:(b + 1) * global_batch]
            mine = chunk[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
            if len(mine) == 0:  # a short last batch may leave a rank empty: repeat from the start
                mine = order[:self.batch_size]
            yield mine.tolist()

    def __len__(self) -> int:
        return self.num_batches() - self.start


def class_weights(labels: torch.Tensor, power: float = 1.0) -> torch.Tensor:
    """Per-sample weights ~ (1 / class frequency) ** power: power 1 balances classes, 0 is uniform."""
    counts = torch.bincount(labels).double()
    return (counts[labels].reciprocal() ** power).float()


def make_loader(dataset, sampler: EpochBatchSampler, workers: int = 0, pin: bool = False):
    """A DataLoader over whole batches (the dataset's ``__getitems__``) that never draws global RNG."""
    from .data import identity

    return torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, collate_fn=identity, num_workers=workers, pin_memory=pin,
        generator=torch.Generator().manual_seed(0), persistent_workers=False,
        prefetch_factor=4 if workers else None,
    )


# --------------------------------------------------------------------------------------------------
# Optimisation helpers
# --------------------------------------------------------------------------------------------------


def build_optimizer(params, cfg: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW, fused on CUDA (one kernel for all parameters)."""
    params = [p for p in params if p.requires_grad]
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=tuple(cfg.betas),
                             fused=device.type == "cuda")


def lr_factor(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Linear warm-up to 1, then constant or cosine decay to ``min_lr_ratio``."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class Ema:
    """Exponential moving average of a model's weights, with warm-up (decay grows with the step)."""

    def __init__(self, model: nn.Module, decay: float, warmup: int):
        self.decay, self.warmup = decay, warmup
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    def rate(self, step: int) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        d = self.rate(step)
        ema_p = [p for p in self.model.parameters()]
        src_p = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(ema_p, src_p, 1.0 - d)
        for eb, b in zip(self.model.buffers(), model.buffers()):
            eb.copy_(b)


def update_ema(ema: Ema | None, model: nn.Module, step: int) -> None:
    if ema is not None:
        ema.update(model, step)


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


class SignalFlag:
    """Turns SIGTERM / SIGUSR1 into a flag the loop checks between steps (save, then stop)."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.received: int | None = None
        self._old: dict = {}

    def __enter__(self):
        if threading_main():
            for s in self.SIGNALS:
                self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        self.received = signum

    def poll(self, world: int, device: torch.device) -> bool:
        """Whether to stop now; under DDP every rank agrees (a signal seen by any rank stops all)."""
        flag = self.received is not None
        if world > 1:
            t = torch.tensor(int(flag), device=device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = bool(t.item())
            if flag and self.received is None:
                self.received = signal.SIGTERM
        return flag

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


def threading_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


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
class RunPaths:
    out_dir: Path
    name: str

    @property
    def best(self) -> Path:
        return self.out_dir / "checkpoints" / f"{self.name}_checkpoint_best.pt"

    @property
    def latest(self) -> Path:
        return self.out_dir / "checkpoints" / f"{self.name}_checkpoint_latest.pt"

    @property
    def metrics(self) -> Path:
        return self.out_dir / f"{self.name}_metrics.csv"

    def sample(self, epoch: int) -> Path:
        return self.out_dir / "samples" / f"epoch_{epoch:03d}.png"


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
