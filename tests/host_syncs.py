"""Count the reads of tensor values into Python (``.item()``, ``float(t)``, ``.tolist()``, ``.cpu()`` ...) and the
tensors built from Python values (``torch.tensor``): on CUDA each is a wait for the device or a copy from the host.
``torch.cuda.set_sync_debug_mode`` needs a GPU; this counts the same calls on the CPU, where tests run."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

import pytest
import torch

READS = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__", "__index__")
# Code whose reads touch host data by design, (file, function or None for all): the batch sampler's indices,
# the data loader's collation, and AdamW's step count, a host tensor on the CPU (on CUDA the loop's AdamW is
# fused and keeps it on the device).
HOST_SIDE = (("ldmflow/training/batching.py", None), ("torch/utils/data/", None),
             ("torch/optim/optimizer.py", "_get_value"))


class HostSyncs:
    def __init__(self) -> None:
        self.count, self.on = 0, False
        self.where: list[str] = []

    def note(self, name: str) -> None:
        caller = sys._getframe(2).f_code
        if self.on and not any(part in caller.co_filename and function in (None, caller.co_name)
                               for part, function in HOST_SIDE):
            self.count += 1
            self.where.append(f"{name} from {caller.co_filename}:{caller.co_name}")

    @contextlib.contextmanager
    def counting(self) -> Iterator[HostSyncs]:
        self.on = True
        try:
            yield self
        finally:
            self.on = False


def count_host_syncs(monkeypatch: pytest.MonkeyPatch) -> HostSyncs:
    """Counts host reads and host-built tensors while ``.counting()`` is active (until ``monkeypatch`` undoes)."""
    syncs = HostSyncs()
    for name in READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            syncs.note(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    original_tensor = torch.tensor

    def tensor(*args, **kwargs):
        syncs.note("torch.tensor")
        return original_tensor(*args, **kwargs)

    monkeypatch.setattr(torch, "tensor", tensor)
    return syncs
