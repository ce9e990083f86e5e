"""Batches: seeded, resumable, weighted, sharded across DDP ranks."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator

import torch

log = logging.getLogger(__name__)


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


def balancing_weights(labels: torch.Tensor | None, power: float) -> torch.Tensor | None:
    """Per-sample weights that balance the classes (``data.balance_power``), or None: no balancing asked,
    or some samples are unlabelled (-1)."""
    if power > 0 and labels is not None and bool((labels >= 0).all()):
        return class_weights(labels, power)
    return None


def make_loader(dataset, sampler: EpochBatchSampler, workers: int = 0, pin: bool = False):
    """A DataLoader over whole batches (the dataset's ``__getitems__``) that never draws global RNG."""

    return torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, collate_fn=identity, num_workers=workers, pin_memory=pin,
        generator=torch.Generator().manual_seed(0), persistent_workers=False,
        prefetch_factor=4 if workers else None,
    )


def identity(batch):
    """DataLoader collate for datasets that build whole batches in ``__getitems__``."""
    return batch
