"""Preemption: a scheduler's kill signal becomes a checkpoint and a retryable exit."""

from __future__ import annotations

import logging
import signal
import threading

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


class SignalFlag:
    """Turns a scheduler's warning signals into a flag the loop checks between steps (save, then stop).

    SIGINT: LSF's default kill (bkill, a job past its -W limit) sends SIGINT, then SIGTERM, then SIGKILL;
    Ctrl-C too. SIGTERM: SLURM's time limit, scancel and preemption; PBS. SIGUSR1 / SIGUSR2: what
    ``#SBATCH --signal=USR1@120`` and ``bsub -wa USR2`` send ahead of the wall-time kill. All four give the
    same exit (:data:`ldmflow.errors.EXIT_PREEMPTED`), so the retry logic needs one code.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)

    def __init__(self):
        self.received: int | None = None
        self._old: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        # keep the first signal: LSF's SIGTERM follows its SIGINT, and torchrun forwards what it got
        if self.received is None:
            self.received = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else "none"

    def poll(self, world: int, group=None, also: bool = False) -> tuple[bool, bool]:
        """Whether to stop now, and whether ``also`` holds on any rank (e.g. a checkpoint is due by the clock).

        Under DDP every rank gets the same answers: one all-reduce (MAX) of two ints on the CPU, over
        ``group`` (a gloo group, so it never waits on the GPU), cheap enough to run every optimizer step.
        """
        if world == 1:
            return self.received is not None, bool(also)
        t = torch.tensor([self.received or 0, int(also)])
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
        if t[0] and self.received is None:  # another rank got it: report the same signal
            self.received = int(t[0])
        return bool(t[0]), bool(t[1])

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old.clear()
