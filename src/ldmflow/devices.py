"""Devices and seeds: pick a device, check that this torch can run on it, make a run deterministic, claim a
free GPU."""

from __future__ import annotations

import contextlib
import fcntl
import functools
import logging
import os
import random
import re
import shutil
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ldmflow.errors import CudaSetupError

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------
# Devices, seeds and checkpoints
# --------------------------------------------------------------------------------------------------


def get_device(name: str | None = None) -> torch.device:
    """The device to train on: ``name`` when given ('cpu', 'cuda', 'cuda:1'), else CUDA when present. A CUDA
    device that this torch build has no kernels for stops here (:func:`check_cuda`), not at its first kernel."""
    if name and name != "auto":
        device = torch.device(name)
    elif torch.cuda.is_available():
        # under DDP, init_process_group's caller has already set this rank's device (LOCAL_RANK)
        device = torch.device("cuda", torch.cuda.current_device() if dist.is_initialized() else 0)
    else:
        device = torch.device("cpu")
    if device.type == "cuda":
        check_cuda(0)
    return device


def set_deterministic(seed: int = 42, deterministic: bool = True) -> None:
    """Seed Python, NumPy and torch. ``deterministic``: also ask torch for deterministic kernels (same seed, same
    run on the CPU); otherwise let cuDNN time its algorithms and keep the fastest (``cudnn.benchmark``)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.backends.cudnn.benchmark = not deterministic
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    if deterministic and torch.cuda.is_available():
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def resolve_deterministic(deterministic: bool | None, device: torch.device) -> bool:
    """``train.deterministic`` on ``device``: null is on for the CPU and off on CUDA, where deterministic kernels
    cost speed and some CUDA kernels stay nondeterministic anyway."""
    return device.type != "cuda" if deterministic is None else deterministic


def device_capability(device: torch.device) -> tuple[int, int]:
    """The CUDA device's compute capability (major, minor), e.g. (7, 0) for a V100, (8, 0) for an A100."""
    return torch.cuda.get_device_capability(device)


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


# Compute capability from which cuDNN has bf16 convolutions (Ampere); below it bf16 takes a slow fallback.
BF16_CAPABILITY = (8, 0)


def resolve_precision(precision: str, device: torch.device, capability: tuple[int, int] | None = None) -> str:
    """``train.precision`` on ``device``: "auto" is bf16 on GPUs of compute capability 8.0 or later (Ampere on),
    fp16 (with the grad scaler) on older GPUs, whose cuDNN has no bf16 convolutions, and fp32 on the CPU (bf16
    is slow on most CPUs); an explicit bf16 on an older GPU warns once. ``capability``: the GPU's (major, minor),
    queried from the device when None."""
    if device.type != "cuda":
        return "fp32" if precision == "auto" else precision
    capability = tuple(capability or device_capability(device))
    if precision == "auto":
        return "bf16" if capability >= BF16_CAPABILITY else "fp16"
    if precision == "bf16" and capability < BF16_CAPABILITY:
        _warn_slow_bf16(str(device), capability)
    return precision


@functools.cache
def _warn_slow_bf16(device: str, capability: tuple[int, int]) -> None:
    log.warning("train.precision bf16 on %s (compute capability %d.%d): below 8.0 bf16 convolutions take a slow "
                "fallback; precision auto (fp16 with a grad scaler) is faster there", device, *capability)


# --------------------------------------------------------------------------------------------------
# Start-up checks: can the installed torch run on this machine's GPUs?
# --------------------------------------------------------------------------------------------------

WHEEL_INDEX = "https://download.pytorch.org/whl"
# PyTorch's CUDA wheels from 2.11 on (RELEASE.md's support matrix, pytorch#172352): cu126 is the last variant
# with Volta (sm_70) and older kernels, and has no Blackwell; cu128 covers Turing (sm_75) to Blackwell (sm_120).
LEGACY_WHEEL, CURRENT_WHEEL = "cu126", "cu128"
OLDEST_LEGACY = (5, 0)  # Maxwell: the oldest GPU that cu126 builds for
OLDEST_CURRENT = (7, 5)  # Turing


@dataclass(frozen=True)
class CudaInfo:
    """What decides whether this process can use its GPUs: the installed torch build and the visible devices."""

    torch_version: str  # torch.__version__, e.g. "2.13.0+cu128"
    cuda_version: str | None  # torch.version.cuda; None for a CPU-only build
    arch_list: tuple[str, ...]  # torch.cuda.get_arch_list(): "sm_XY" kernels and "compute_XY" PTX of this build
    devices: tuple[tuple[str, tuple[int, int]], ...]  # (name, compute capability) of each visible device
    driver: bool  # the machine has an NVIDIA driver loaded, whatever torch makes of it

    @classmethod
    def query(cls) -> CudaInfo:
        """This process's torch and devices."""
        count = cuda_device_count()
        devices = tuple((torch.cuda.get_device_name(i), torch.cuda.get_device_capability(i)) for i in range(count))
        driver = Path("/proc/driver/nvidia/version").exists() or shutil.which("nvidia-smi") is not None
        return cls(torch.__version__, torch.version.cuda, tuple(torch.cuda.get_arch_list()) if count else (),
                   devices, driver)


def runs_on(arch_list: tuple[str, ...] | list[str], capability: tuple[int, int]) -> bool:
    """Whether a build with ``arch_list`` has code for a GPU of ``capability``: SASS ``sm_XY`` runs on the same
    major version at minor Y or later ("a" variants only on X.Y itself), PTX ``compute_XY`` is compiled at load
    time for any X.Y or later. An empty list (a build that does not say) counts as yes."""
    if not arch_list:
        return True
    for entry in arch_list:
        m = re.fullmatch(r"(sm|compute)_(\d+)(\d)([a-z]?)", entry)
        if m is None:
            continue
        kind, built, suffix = m[1], (int(m[2]), int(m[3])), m[4]
        if suffix == "a":
            ok = capability == built
        elif kind == "compute":
            ok = capability >= built
        else:
            ok = capability[0] == built[0] and capability[1] >= built[1]
        if ok:
            return True
    return False


def install_line(torch_version: str, capability: tuple[int, int] | None) -> str:
    """The pip command that installs this torch version's wheel built for ``capability`` (None: unknown)."""
    version = torch_version.split("+")[0]
    if capability is not None and capability < OLDEST_LEGACY:
        return f"none: no current torch build supports compute capability {capability[0]}.{capability[1]}"
    variant = LEGACY_WHEEL if capability is not None and capability < OLDEST_CURRENT else CURRENT_WHEEL
    return f"pip install torch=={version} --index-url {WHEEL_INDEX}/{variant}"


def check_cuda(requested_gpus: int, info: CudaInfo | None = None) -> None:
    """Stop with one line that names the torch build to install when this torch cannot use the machine's GPUs.

    - a visible GPU whose compute capability has no kernels in this build (a V100 under a cu128 wheel);
    - ``requested_gpus`` >= 1 (a GPU rule's ``gpu`` resource) on a machine with an NVIDIA driver where torch sees
      no GPU: a CPU-only build (``torch.version.cuda`` is None), or a CUDA build the driver cannot serve.
    Without any NVIDIA driver (a CPU node that a scheduler gave a GPU request to) the job goes on on the CPU, with
    a warning. ``info`` defaults to :meth:`CudaInfo.query` (tests pass their own)."""
    info = info or CudaInfo.query()
    for index, (name, capability) in enumerate(info.devices):
        if not runs_on(info.arch_list, capability):
            raise CudaSetupError(
                f"cuda:{index} ({name}, compute capability {capability[0]}.{capability[1]}) has no kernels in torch "
                f"{info.torch_version} (built for {' '.join(info.arch_list)}); install a build for it: "
                f"{install_line(info.torch_version, capability)}")
    if requested_gpus < 1 or info.devices:
        return
    if not info.driver:
        log.warning("the job asked for %d GPU(s) but this machine has no NVIDIA driver; running on the CPU",
                    requested_gpus)
        return
    if info.cuda_version is None:
        raise CudaSetupError(
            f"the job asked for {requested_gpus} GPU(s) but torch {info.torch_version} is a CPU-only build; install "
            f"a CUDA build: {install_line(info.torch_version, None)} ({LEGACY_WHEEL} for Volta/V100 and older)")
    raise CudaSetupError(
        f"the job asked for {requested_gpus} GPU(s) but torch {info.torch_version} (CUDA {info.cuda_version}) "
        f"sees none; check CUDA_VISIBLE_DEVICES and nvidia-smi (a driver older than CUDA {info.cuda_version} "
        f"needs an older build: {install_line(info.torch_version, OLDEST_LEGACY)})")


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
