"""What a training run reports while it runs: a progress bar, a small status file and TensorBoard events.

:class:`RunEvents` wraps :func:`ldmflow.training.loop.fit`'s loop (rank 0 only). It writes
``RUN/NAME_status.json`` atomically at the start, at log points (at most every few seconds) and at each
epoch's end, and once more with the final state (done, early-stopped, failed, preempted), so that
``ldmflow status`` never has to open a checkpoint. When the optional ``tensorboard`` package is installed it
also writes ``RUN/tensorboard/`` event files: the losses every ``train.log_every`` steps, every metrics
column at each epoch's end, the epoch sample grids as images and the resolved config as text. A resumed
run opens a new event file whose first record purges every event after the checkpoint's step, so the
curves never show a step twice or out of order.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import socket
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Literal, Self

import numpy as np
import yaml

from ldmflow.artifacts import atomic_write_bytes
from ldmflow.errors import Preempted
from ldmflow.progress import progress_bar
from ldmflow.training.state import EpochTotals, PartialEpoch

log = logging.getLogger(__name__)

STATUS_FORMAT = "ldmflow-status-v1"
RunState = Literal["running", "done", "early-stopped", "failed", "preempted", "interrupted"]
# Only the package's presence is checked at import; torch.utils.tensorboard (0.2 s) is imported when a run starts.
HAVE_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None
_told_no_tensorboard = False
# A status write is an fsync: at log points, at most this often (epoch ends and state changes always write).
STATUS_MIN_INTERVAL_S = 5.0


def write_status(path: str | Path, status: dict[str, Any]) -> None:
    """Write a run's status file atomically (a reader never sees half a file)."""
    atomic_write_bytes(path, json.dumps({"format": STATUS_FORMAT, **status}, indent=1).encode())


def read_status(path: str | Path) -> dict[str, Any] | None:
    """A run's status file, or None when it is missing or not one."""
    try:
        status = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return status if isinstance(status, dict) and status.get("format") == STATUS_FORMAT else None


def wait_for_a_later_second(log_dir: Path) -> None:
    """TensorBoard reads a run's event files in name order, and a name starts with the second the file was
    made (``events.out.tfevents.SECONDS.HOST.PID.N``): a file made in the same second as a killed run's would
    sort before it by pid, and the killed run's purge would then hide the resumed run's events. Start in a
    later second than every existing file (a wait of at most one second, and only right after a crash)."""
    newest = 0
    for path in log_dir.glob("events.out.tfevents.*"):
        with contextlib.suppress(IndexError, ValueError):
            newest = max(newest, int(path.name.split(".")[3]))
    while int(time.time()) <= newest:
        time.sleep(0.05)


class TensorBoardLog:
    """TensorBoard event files of one run, resumable: a new file per process, purging events after ``step``."""

    def __init__(self, log_dir: Path, step: int, resumed: bool, config: dict):
        from torch.utils.tensorboard import SummaryWriter

        # A fresh run purges every earlier event (of a killed run whose checkpoint was dropped); a resumed
        # one, those after its checkpoint's step, which the resumed run computes again.
        first = step + 1 if resumed else 0
        wait_for_a_later_second(log_dir)
        self.writer = SummaryWriter(str(log_dir), purge_step=first, flush_secs=10)
        self.writer.add_text("config", "```yaml\n" + yaml.safe_dump(config, sort_keys=False) + "```", first)

    def scalars(self, values: dict[str, float], step: int) -> None:
        for tag, v in values.items():
            self.writer.add_scalar(tag, v, step)

    def image(self, tag: str, png: Path, step: int) -> None:
        from PIL import Image

        with Image.open(png) as im:
            self.writer.add_image(tag, np.asarray(im.convert("RGB")), step, dataformats="HWC")

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class RunEvents:
    """The progress bar, the status file and the TensorBoard log of one run (all off on ranks > 0).

    ``progress``: True / False force the bar on / off; None shows it only on an interactive terminal.
    """

    # ``run`` is a training.loop.Run (not imported: the loop imports this module)
    def __init__(self, run: Any, resumed: bool, progress: bool | None = None, tensorboard: bool = True):
        self.run, self.enabled = run, run.writer
        self.progress = sys.stderr.isatty() if progress is None else progress
        self.started = time.time()
        self.bar = None
        self.bar_epoch = -1
        self.last_status = 0.0
        self.epoch_t0 = time.time()
        self.epoch_walls: list[float] = []  # wall seconds of this process's epochs: training, validation, saving
        self.start_micro = run.state.micro  # where the first epoch's bar starts (mid-epoch after a resume)
        # the epoch's sums at the previous log point (at first, the checkpoint's)
        self.seen = run.state.partial or PartialEpoch()
        self.stack = ExitStack()
        self.tb = None
        if self.enabled and tensorboard and HAVE_TENSORBOARD:
            self.tb = TensorBoardLog(run.paths.tensorboard, run.state.step, resumed, run.fc.resolved)
        elif self.enabled and tensorboard:
            global _told_no_tensorboard
            if not _told_no_tensorboard:  # once per process
                log.debug("tensorboard is not installed: no event files (pip install 'ldmflow[tensorboard]')")
                _told_no_tensorboard = True

    def __enter__(self) -> Self:
        if self.enabled:
            self.status("running")
            if self.progress:
                from tqdm.contrib.logging import logging_redirect_tqdm

                # log lines are printed above the bar instead of through it
                self.stack.enter_context(logging_redirect_tqdm())
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.stack.close()
        if self.bar is not None:
            self.bar.close()
        if not self.enabled:
            return
        if exc is None:
            if self.run.paths.best.is_file():
                self.status("early-stopped" if self.run.state.early_stopped else "done")
            else:
                self.status("failed", "no epoch gave a finite value of the early-stopping metric")
        elif isinstance(exc, Preempted):
            self.status("preempted", str(exc))
        elif isinstance(exc, Exception):
            self.status("failed", f"{type(exc).__name__}: {exc}")
        else:  # KeyboardInterrupt, SystemExit: the run resumes from its latest checkpoint
            self.status("interrupted", type(exc).__name__)
        if self.tb is not None:
            self.tb.close()

    def status(self, state: RunState, message: str | None = None, epoch_progress: float = 0.0,
               epoch_seconds: float | None = None) -> None:
        """Write the status file now."""
        run, s = self.run, self.run.state
        es = run.fc.train.early_stopping
        history = s.history
        write_status(run.paths.status, {
            "stage": run.fc.stage, "name": run.name, "state": state, "message": message,
            "epoch": s.epoch, "epochs": run.fc.train.epochs, "epoch_progress": round(epoch_progress, 4),
            "epoch_seconds": epoch_seconds,
            "epoch_wall_s": sum(self.epoch_walls[-3:]) / len(self.epoch_walls[-3:]) if self.epoch_walls else None,
            "step": s.step, "total_steps": run.total_steps,
            "metric": es.metric, "mode": es.mode, "best": s.best, "best_epoch": s.best_epoch,
            "samples_per_s": history[-1].get("samples_per_s") if history else None,
            "started": self.started, "updated": time.time(), "pid": os.getpid(), "host": socket.gethostname()})
        self.last_status = time.monotonic()

    def log_point(self, totals: EpochTotals, micro: int) -> None:
        """Every ``train.log_every`` steps: the bar, the losses since the last log point, the status file."""
        if not self.enabled:
            return
        run, state = self.run, self.run.state
        n = totals.n_seen
        sums = {k: float(v) for k, v in totals.sums.items()}  # the only host sync, once per log point
        grad = float(totals.grad_norm_sum)
        if self.bar_epoch != state.epoch:
            if self.bar is not None:
                self.bar.close()
            self.bar = progress_bar(run.micro_per_epoch, f"{run.name} epoch {state.epoch + 1}/{run.fc.train.epochs}",
                                    "batch", self.progress, initial=self.start_micro)
            self.bar_epoch = state.epoch
        self.bar.update(micro - self.bar.n)
        self.bar.set_postfix(loss=f"{sums['loss'] / max(n, 1):.4f}", refresh=False)
        if self.tb is not None and n > self.seen.n_seen:
            new = n - self.seen.n_seen
            values = {f"train/{k}": (v - self.seen.sums.get(k, 0.0)) / new for k, v in sums.items()}
            steps = max(1, new // run.fc.optim.accumulate)
            values["train/grad_norm"] = (grad - self.seen.grad_norm_sum) / steps
            values["train/lr"] = run.optimizer.param_groups[0]["lr"]
            self.tb.scalars(values, state.step)
            self.tb.flush()  # the curves stay live (a write, no fsync, every log_every steps)
        self.seen = PartialEpoch(sums=sums, n_seen=n, grad_norm_sum=grad)
        if time.monotonic() - self.last_status >= STATUS_MIN_INTERVAL_S:
            self.status("running", epoch_progress=micro / run.micro_per_epoch, epoch_seconds=totals.seconds())

    def end_epoch(self, row: dict[str, Any]) -> None:
        """After an epoch's checkpoint: every metrics column and the sample grid (if one was written)."""
        self.seen, self.start_micro = PartialEpoch(), 0
        if not self.enabled:
            return
        run, epoch, step = self.run, self.run.state.epoch, self.run.state.step
        if self.tb is not None:
            self.tb.scalars({f"epoch/{k}": float(v) for k, v in row.items()
                             if k not in ("epoch", "step") and isinstance(v, (int, float))}, step)
            png = run.paths.sample(epoch)
            if png.is_file() and png.stat().st_mtime >= self.epoch_t0 - 1:
                self.tb.image("samples", png, step)
            self.tb.flush()
        self.epoch_walls.append(time.time() - self.epoch_t0)
        self.epoch_t0 = time.time()
        self.status("running")
