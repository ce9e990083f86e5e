"""Devices and seeds: pick a device, make a run deterministic, claim a free GPU."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import random
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------
# Devices, seeds and checkpoints
# --------------------------------------------------------------------------------------------------


def get_device(name: str | None = None) -> torch.device:
    """The device to train on: ``name`` when given ('cpu', 'cuda', 'cuda:1'), else CUDA when present."""
    if name and name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        # under DDP, init_process_group's caller has already set this rank's device (LOCAL_RANK)
        return torch.device("cuda", torch.cuda.current_device() if dist.is_initialized() else 0)
    return torch.device("cpu")


def set_deterministic(seed: int = 42) -> None:
    """Seed Python, NumPy and torch, and ask torch for deterministic kernels (same seed, same run on CPU)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    flush_denormals()
    torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True, warn_only=True)
    if torch.cuda.is_available():
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def flush_denormals() -> bool:
    """Round subnormal floats to zero on the CPU (x86 FTZ/DAZ); returns whether this CPU supports it.

    Once a segmentation or classification head grows confident, its softmax gradients underflow into
    subnormals that flow back through every convolution, and CPU arithmetic on subnormals is many times
    slower: a trained demo autoencoder's step ran 2-3x slower without this. Values below ~1.2e-38 carry no
    information for training, and the flush is the same on every run, so results stay reproducible.
    """
    return torch.set_flush_denormal(True)


def rng_state(device: torch.device) -> dict:
    """This process's random-number states (torch CPU, the device's CUDA, NumPy, Python), in types that a
    ``weights_only`` checkpoint load accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "gauss": float(gauss)},
            "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next}}


def set_rng_state(state: dict, device: torch.device) -> None:
    """Restore what :func:`rng_state` returned; a state without NumPy's or Python's generator leaves that one as
    it is, so a checkpoint that lacks them still resumes."""
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)
    if state.get("numpy"):
        n = state["numpy"]
        np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if state.get("python"):
        p = state["python"]
        random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))


log = logging.getLogger(__name__)

# One folder per machine, shared by every workflow and user on it (a fixed path: a job's TMPDIR may differ).
DEFAULT_LOCK_DIR = Path("/tmp/ldmflow-gpu-locks")
# Variables a scheduler sets inside a job; there CUDA_VISIBLE_DEVICES already names the job's own GPUs.
SCHEDULER_JOB_VARIABLES = ("SLURM_JOB_ID", "LSB_JOBID", "PBS_JOBID")


def cuda_device_count() -> int:
    """GPUs this process can see (0 without CUDA); torch already honours CUDA_VISIBLE_DEVICES."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def visible_device_names(environ: Mapping[str, str], count: int) -> list[str]:
    """Machine-wide names of the ``count`` visible devices: their CUDA_VISIBLE_DEVICES entries (ids or
    UUIDs), or 0..count-1 when it is unset. Locks use these, so two jobs that see the same physical GPU
    under different indices still exclude each other."""
    listed = [d.strip() for d in environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return listed[:count] if len(listed) >= count else [str(i) for i in range(count)]


def _try_lock(path: Path) -> int | None:
    """An open descriptor holding an exclusive lock on ``path``, or None when another process holds it."""
    fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


@contextlib.contextmanager
def claim_gpu(environ: Mapping[str, str], lock_dir: str | Path = DEFAULT_LOCK_DIR, *,
              device_count: int | None = None, poll_seconds: float = 5.0,
              timeout: float | None = None) -> Iterator[str | None]:
    """Yield the device a job should train on, holding it until the block ends.

    - no CUDA device: ``None`` (the trainer's default, the CPU), no lock;
    - inside a scheduler job (``SLURM_JOB_ID``, ``LSB_JOBID`` or ``PBS_JOBID`` in ``environ``): ``"cuda:0"``,
      the first of the devices the scheduler gave the job, no lock;
    - otherwise ``"cuda:N"``, the first visible device whose lock file in ``lock_dir`` is free; when all
      are held it waits, polling every ``poll_seconds`` (``TimeoutError`` after ``timeout`` seconds).

    ``environ`` is the process environment (``os.environ``); ``device_count`` overrides the number of
    visible devices (tests).
    """
    count = cuda_device_count() if device_count is None else device_count
    if count == 0:
        yield None
        return
    if any(environ.get(var) for var in SCHEDULER_JOB_VARIABLES):
        log.info("using the GPU the scheduler assigned (CUDA_VISIBLE_DEVICES=%s)",
                 environ.get("CUDA_VISIBLE_DEVICES", "unset"))
        yield "cuda:0"
        return

    lock_dir = Path(lock_dir)
    lock_dir.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(PermissionError):  # other users' jobs must be able to create their locks
        lock_dir.chmod(0o1777)
    names = visible_device_names(environ, count)
    start, warned = time.monotonic(), False
    while True:
        for index, name in enumerate(names):
            fd = _try_lock(lock_dir / f"gpu-{name}.lock")
            if fd is None:
                continue
            log.info("training on cuda:%d (GPU %s; lock %s)", index, name, lock_dir / f"gpu-{name}.lock")
            try:
                yield f"cuda:{index}"
            finally:
                os.close(fd)
            return
        waited = time.monotonic() - start
        if timeout is not None and waited >= timeout:
            raise TimeoutError(f"all {count} GPU(s) stayed held by other jobs for {waited:.0f} s (locks in {lock_dir})")
        if not warned:
            log.warning("all %d GPU(s) are held by other jobs (locks in %s); waiting for one. Lower the `gpu` "
                        "limit in profiles/default/config.yaml to the number of GPUs to avoid this.", count, lock_dir)
            warned = True
        time.sleep(poll_seconds)
