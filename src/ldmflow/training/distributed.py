"""Multi-process (DDP) training: join the process group torchrun set up, and ask which rank this is."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.distributed as dist


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
