"""Where a training run stands: the loop state a checkpoint keeps besides weights, optimizer and RNG, and
the running sums of the current epoch.

A checkpoint stores these fields as plain top-level keys (``ckpt["epoch"]``, ``ckpt["best"]``, ...), the
layout every earlier checkpoint has, so a ``weights_only`` load accepts them and older runs resume.
:meth:`LoopState.to_checkpoint` and :meth:`LoopState.from_checkpoint` are the one place that layout is written
and read.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ldmflow.artifacts import atomic_write_bytes


@dataclass
class PartialEpoch:
    """An epoch's running sums at a mid-epoch checkpoint, so the resumed epoch reports the same means."""

    sums: dict[str, float] = field(default_factory=dict)  # summed training losses by name, over micro-batches
    n_seen: int = 0  # micro-batches summed
    grad_norm_sum: float = 0.0  # summed gradient norms of the epoch's finite optimizer steps
    seconds: float = 0.0  # training time of the epoch so far

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> PartialEpoch:
        return cls(**{f.name: values[f.name] for f in dataclasses.fields(cls) if f.name in values})


@dataclass
class LoopState:
    """The position and the bookkeeping of a run: advanced by the loop, saved in every checkpoint."""

    epoch: int = 0  # epochs finished
    step: int = 0  # optimizer steps taken
    micro: int = 0  # micro-batches of the current epoch already trained
    best: float | None = None  # best value of train.early_stopping.metric so far
    best_epoch: int | None = None  # the epoch (1-based) that gave it
    bad_epochs: int = 0  # epochs since the best one, for early stopping's patience
    bad_steps: int = 0  # optimizer steps with a non-finite loss or gradient, for train.max_bad_steps
    early_stopped: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)  # one metrics row per finished epoch
    partial: PartialEpoch | None = None  # the current epoch's sums, set at a mid-epoch checkpoint

    def to_checkpoint(self) -> dict[str, Any]:
        """The checkpoint's loop-state keys, in plain types."""
        return dataclasses.asdict(self)

    @classmethod
    def from_checkpoint(cls, ckpt: dict[str, Any]) -> LoopState:
        """The loop state a checkpoint holds; a key an older checkpoint lacks keeps its default."""
        values = {f.name: ckpt[f.name] for f in dataclasses.fields(cls) if f.name in ckpt}
        if values.get("partial") is not None:
            values["partial"] = PartialEpoch.from_dict(values["partial"])
        return cls(**values)


@dataclass
class EpochTotals:
    """Running sums of one epoch's training losses, on the device (read once at the epoch's end)."""

    sums: dict[str, torch.Tensor]
    n_seen: int
    grad_norm_sum: torch.Tensor
    bad: torch.Tensor  # non-finite optimizer steps since the last log point
    skipped: torch.Tensor  # fp16: steps the grad scaler skipped (overflow) since the last log point
    loss_bad: torch.Tensor  # whether a micro-batch of the current optimizer step had a non-finite loss
    seconds_before: float  # time spent on this epoch before a resume
    t0: float

    @classmethod
    def resume(cls, partial: PartialEpoch | None, device: torch.device) -> EpochTotals:
        """The sums of an epoch that starts now, or that resumes from a mid-epoch checkpoint's ``partial``."""
        partial = partial or PartialEpoch()
        f64 = {"device": device, "dtype": torch.float64}
        return cls(sums={k: torch.tensor(v, **f64) for k, v in partial.sums.items()}, n_seen=partial.n_seen,
                   grad_norm_sum=torch.tensor(partial.grad_norm_sum, **f64), bad=torch.tensor(0, device=device),
                   skipped=torch.tensor(0, device=device), loss_bad=torch.tensor(False, device=device),
                   seconds_before=partial.seconds, t0=time.monotonic())

    def partial(self) -> PartialEpoch:
        """What a mid-epoch checkpoint stores, so a resumed epoch reports the same means."""
        return PartialEpoch(sums={k: float(v) for k, v in self.sums.items()}, n_seen=self.n_seen,
                            grad_norm_sum=float(self.grad_norm_sum), seconds=self.seconds())

    def seconds(self) -> float:
        return self.seconds_before + time.monotonic() - self.t0


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
