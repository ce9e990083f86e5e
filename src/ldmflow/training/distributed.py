"""Multi-process (DDP) training: join the process group torchrun sets up, or launch torchrun."""

from __future__ import annotations

import os
import subprocess
import sys

import torch
import torch.distributed as dist


def init_from_env() -> bool:
    """Join the process group when started by torchrun (WORLD_SIZE > 1): NCCL on CUDA, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or dist.is_initialized():
        return dist.is_initialized()
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    return True


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))


def run_cli(argv: list[str], nproc: int = 1) -> None:
    """Run an ``ldmflow`` command: in this process, or under torchrun with ``nproc`` processes (DDP).

    The training rules call this with the job's ``gpu`` resource, so a rule given ``gpu=N`` with N > 1
    trains with N processes, one per GPU; only rank 0 writes checkpoints, samples and metrics.
    """
    if nproc <= 1:
        from ldmflow.cli import main

        code = main(argv)
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "ldmflow.cli", *argv]
        code = subprocess.run(cmd).returncode
    if code:
        raise SystemExit(code)


def run_training(argv: list[str], gpus: int, environ) -> None:
    """What a training rule runs: ``ldmflow ARGV`` on the job's GPUs.

    ``gpus`` > 1 (the rule's ``gpu`` resource): torchrun with that many processes, rank r on cuda:r of
    the devices the scheduler gave the job (DDP). Otherwise one process on a GPU no other job on this
    machine holds (:func:`ldmflow.devices.claim_gpu`), or on the CPU when there is none.
    """
    from ldmflow.training.devices import claim_gpu

    if gpus > 1:
        run_cli(argv, nproc=gpus)
        return
    with claim_gpu(environ) as device:
        run_cli([*argv, *(["--device", device] if device else [])])
