"""Multi-process (DDP) training: join the process group torchrun set up, ask which rank this is, take rank 0's
decisions, and share validation out among the ranks."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Protocol, TypeVar

import torch
import torch.distributed as dist
from torch import nn

T = TypeVar("T")


def init_from_env(environ: Mapping[str, str]) -> bool:
    """Join the process group when started by torchrun (``WORLD_SIZE`` > 1 in ``environ``): NCCL on CUDA,
    gloo on CPU. Returns whether this process is one rank of several."""
    world = int(environ.get("WORLD_SIZE", "1"))
    if world <= 1 or dist.is_initialized():
        return dist.is_initialized()
    if torch.cuda.is_available():
        torch.cuda.set_device(int(environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    return True


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    """This process's rank (0 outside DDP)."""
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def from_rank0(obj: T, group: Any = None) -> T:
    """Rank 0's ``obj`` on every rank (``obj`` itself outside DDP). What every rank decides from it is then rank
    0's decision: ranks that decided apart would call different collectives and wait on each other forever."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


def sum_over_ranks(sums: Mapping[str, torch.Tensor], group: Any = None) -> dict[str, torch.Tensor]:
    """Every rank's additive statistics summed key by key, in rank order, so each rank gets the same tensors (a
    rank with no batches may lack keys). Statistics are small: they travel as objects on the host."""
    if world_size() == 1:
        return dict(sums)
    parts: list[Any] = [None] * world_size()
    dist.all_gather_object(parts, {k: v.detach().cpu() for k, v in sums.items()}, group=group)
    total: dict[str, torch.Tensor] = {}
    for part in parts:
        for key, value in part.items():
            total[key] = total[key] + value if key in total else value.clone()
    return total


class ShardedValidation(Protocol):
    """A task whose validation adds up over batches, so each rank can validate its share (optional next to
    :class:`ldmflow.training.loop.Task`'s ``validate``, which is ``validation_metrics`` of ``validation_sums`` over
    the numbered batches of the whole loader)."""

    def validation_sums(self, model: nn.Module, batches: Iterable[tuple[int, dict]]) -> dict[str, torch.Tensor]:
        """Additive statistics (sums and counts) of ``batches``: (the batch's number in the whole validation
        set, batch) pairs; per-batch randomness is drawn from the number, so a batch scores alike on any rank."""

    def validation_metrics(self, model: nn.Module, sums: dict[str, torch.Tensor]) -> dict[str, float]:
        """The metrics of the whole validation set from the statistics of all its batches."""


def shards_validation(task: object) -> bool:
    return hasattr(task, "validation_sums") and hasattr(task, "validation_metrics")


class ShardBatches:
    """Rank ``rank``'s whole batches of a validation ``sampler``: batches rank, rank + world, ... Each batch is
    the batch one process would make, so the summed statistics equal one process's."""

    def __init__(self, sampler: Iterable[list[int]], rank: int, world: int):
        self.sampler, self.rank, self.world = sampler, rank, world

    def numbers(self) -> range:
        return range(self.rank, len(self.sampler), self.world)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[list[int]]:
        for number, batch in enumerate(self.sampler):
            if number % self.world == self.rank:
                yield batch

    def __len__(self) -> int:
        return len(self.numbers())


def validate(task: Any, model: nn.Module, loader: Any, group: Any = None) -> dict[str, float]:
    """The task's validation metrics: from each rank's share of the batches, summed over the ranks, when the
    loader's sampler is a :class:`ShardBatches`; from the whole loader otherwise."""
    sampler = loader.batch_sampler
    if not isinstance(sampler, ShardBatches):
        return task.validate(model, loader)
    sums = task.validation_sums(model, zip(sampler.numbers(), loader))
    return task.validation_metrics(model, sum_over_ranks(sums, group))
