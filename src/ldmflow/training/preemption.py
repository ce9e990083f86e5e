"""Preemption: a scheduler's kill signal becomes a checkpoint and a retryable exit."""

from __future__ import annotations

import logging
import signal

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)




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
