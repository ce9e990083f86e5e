"""Devices and seeds: pick a device, check that this torch can run on it, make a run deterministic, claim a
free GPU."""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import functools
import logging
import os
import platform
import random
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ldmflow.errors import ConfigError, CudaSetupError

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
    keep_freed_memory()
    return device


def set_deterministic(seed: int = 42, deterministic: bool = True) -> None:
    """Seed Python, NumPy and torch. ``deterministic``: also ask torch for deterministic kernels (same seed, same
    run on the CPU); otherwise let cuDNN time its algorithms and keep the fastest (``cudnn.benchmark``)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    flush_denormals()
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


def flush_denormals() -> bool:
    """Round subnormal floats to zero on the CPU (x86 FTZ/DAZ); returns whether this CPU supports it.

    Once a segmentation or classification head grows confident, its softmax gradients underflow into
    subnormals that flow back through every convolution, and CPU arithmetic on subnormals is many times
    slower: a trained demo autoencoder's step ran 2-3x slower without this. Values below ~1.2e-38 carry no
    information for training, and the flush is the same on every run, so results stay reproducible.
    """
    return torch.set_flush_denormal(True)


# mallopt(3) parameters (malloc.h) and the values set: blocks up to 32 MiB (glibc's largest mmap threshold)
# come from the heap, up to 256 MiB of freed heap stays mapped, and the heap grows 64 MiB at a time
MALLOPT = ((-3, 32 << 20), (-1, 256 << 20), (-2, 64 << 20))  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD, M_TOP_PAD


@functools.cache
def keep_freed_memory() -> bool:
    """Let glibc's malloc keep freed blocks for reuse instead of handing them back to the kernel; returns
    whether it applied (glibc only).

    A model's activations are large blocks allocated and freed on every batch. By default glibc serves
    such blocks with fresh pages from the kernel and returns them on free, so every batch pays a page fault
    per 4 KiB touched: encoding 64 px images on a CPU spent more time in the kernel than in half its
    convolutions. Kept, the pages are reused; the numbers computed do not change.
    """
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return all(libc.mallopt(param, value) == 1 for param, value in MALLOPT)


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
# CUDA_VISIBLE_DEVICES entries that already are machine-wide names
UUID_PREFIXES = ("GPU-", "MIG-")

GpuQuery = Callable[[], Mapping[str, str]]


def cuda_device_count() -> int:
    """GPUs this process can see (0 without CUDA); torch already honours CUDA_VISIBLE_DEVICES."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def visible_device_names(environ: Mapping[str, str], count: int) -> list[str]:
    """The ``count`` visible devices as CUDA_VISIBLE_DEVICES names them (ids or UUIDs), or 0..count-1 when it
    is unset: what a child process's CUDA_VISIBLE_DEVICES takes to see the same devices."""
    listed = [d.strip() for d in environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return listed[:count] if len(listed) >= count else [str(i) for i in range(count)]


def nvidia_smi_uuids() -> dict[str, str]:
    """index -> UUID of every GPU of this machine, as ``nvidia-smi`` numbers them."""
    out = subprocess.run(["nvidia-smi", "--query-gpu=index,uuid", "--format=csv,noheader"], capture_output=True,
                         text=True, timeout=30, check=True).stdout
    rows = [line.split(",") for line in out.splitlines() if line.strip()]
    return {index.strip(): uuid.strip() for index, uuid in rows}


def gpu_lock_names(environ: Mapping[str, str], count: int, query: GpuQuery = nvidia_smi_uuids) -> list[str]:
    """Machine-wide names of the ``count`` visible devices, for their lock files: UUIDs, so two jobs that see one
    physical GPU under different indices (one inside an allocation, one outside) still exclude each other.
    Without a UUID table (``query`` fails: no nvidia-smi) the CUDA_VISIBLE_DEVICES names stand in."""
    names = visible_device_names(environ, count)
    if all(n.startswith(UUID_PREFIXES) for n in names):
        return names
    try:
        table = query()
    except (OSError, subprocess.SubprocessError, ValueError) as exc:
        log.warning("could not list the GPUs' UUIDs (%s); locking GPUs by their CUDA_VISIBLE_DEVICES ids", exc)
        return names
    return [n if n.startswith(UUID_PREFIXES) else table.get(n, n) for n in names]


def _open_lock_file(path: Path) -> int:
    """A descriptor of the lock file ``path``, created readable and writable by every user when missing.

    Never O_CREAT on an existing file: under ``fs.protected_regular`` (Ubuntu's default) that fails with EACCES
    for a file another user owns in a sticky world-writable folder such as the lock folder."""
    while True:
        with contextlib.suppress(FileNotFoundError):
            return os.open(path, os.O_RDONLY)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:  # another job created it between the two opens: open that one
            continue
        with contextlib.suppress(PermissionError):
            os.fchmod(fd, 0o666)  # the umask narrowed the mode
        return fd


def _try_lock(path: Path) -> int | None:
    """An open descriptor holding an exclusive lock on ``path``, or None when another process holds it."""
    fd = _open_lock_file(path)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _try_lock_many(lock_dir: Path, names: list[str], n: int) -> dict[int, int] | None:
    """Locks on ``n`` of the devices ``names`` (index -> descriptor), or None, holding nothing, when fewer are free:
    a job never waits while it holds part of what it needs, so two DDP jobs cannot deadlock."""
    held: dict[int, int] = {}
    for index, name in enumerate(names):
        fd = _try_lock(lock_dir / f"gpu-{name}.lock")
        if fd is not None:
            held[index] = fd
            if len(held) == n:
                return held
    for fd in held.values():
        os.close(fd)
    return None


@dataclass(frozen=True)
class GpuClaim:
    """The visible devices a job holds: their indices (``cuda:i``) and the CUDA_VISIBLE_DEVICES value that shows a
    child process exactly these devices."""

    indices: tuple[int, ...]
    visible_devices: str


@contextlib.contextmanager
def claim_gpus(environ: Mapping[str, str], n: int = 1, lock_dir: str | Path = DEFAULT_LOCK_DIR, *,
               device_count: int | None = None, uuid_query: GpuQuery = nvidia_smi_uuids, poll_seconds: float = 5.0,
               timeout: float | None = None) -> Iterator[GpuClaim | None]:
    """Hold ``n`` visible GPUs that no other job on this machine holds until the block ends, all or none.

    - no CUDA device: ``None`` (train on the CPU), no lock;
    - one visible device inside a scheduler job (``SLURM_JOB_ID``, ``LSB_JOBID`` or ``PBS_JOBID`` in ``environ``):
      that device, no lock (the scheduler gave it to this job alone);
    - otherwise, also inside an allocation of several GPUs that several jobs share (``snakemake --resources
      gpu=4`` in ``salloc``), the first ``n`` visible devices whose lock files (``gpu-<UUID>.lock`` in
      ``lock_dir``) are free; when fewer are free it waits, holding none, polling every ``poll_seconds``
      (``TimeoutError`` after ``timeout`` seconds).

    ``environ`` is the process environment (``os.environ``); ``device_count`` overrides the number of visible
    devices and ``uuid_query`` the machine's index -> UUID table (tests).
    """
    count = cuda_device_count() if device_count is None else device_count
    if count == 0:
        yield None
        return
    if n > count:
        raise ConfigError(f"the job asks for {n} GPUs but sees {count} (CUDA_VISIBLE_DEVICES="
                          f"{environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); lower the rule's `gpu` resource")
    names = visible_device_names(environ, count)
    if count == 1 and any(environ.get(var) for var in SCHEDULER_JOB_VARIABLES):
        log.info("using the GPU the scheduler assigned (CUDA_VISIBLE_DEVICES=%s)", environ.get("CUDA_VISIBLE_DEVICES",
                                                                                             "unset"))
        yield GpuClaim((0,), names[0])
        return
    lock_dir = _lock_folder(lock_dir)
    held = _wait_for_locks(lock_dir, gpu_lock_names(environ, count, uuid_query), n, poll_seconds, timeout)
    claim = GpuClaim(tuple(held), ",".join(names[i] for i in held))
    log.info("training on cuda:%s (CUDA_VISIBLE_DEVICES=%s; locks in %s)", ",".join(map(str, claim.indices)),
             claim.visible_devices, lock_dir)
    try:
        yield claim
    finally:
        for fd in held.values():
            os.close(fd)


def _lock_folder(lock_dir: str | Path) -> Path:
    lock_dir = Path(lock_dir)
    lock_dir.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(PermissionError):  # other users' jobs must be able to create their locks
        lock_dir.chmod(0o1777)
    return lock_dir


def _wait_for_locks(lock_dir: Path, names: list[str], n: int, poll_seconds: float,
                    timeout: float | None) -> dict[int, int]:
    start, warned = time.monotonic(), False
    while (held := _try_lock_many(lock_dir, names, n)) is None:
        waited = time.monotonic() - start
        if timeout is not None and waited >= timeout:
            raise TimeoutError(f"{n} of all {len(names)} GPU(s) did not come free from other jobs in {waited:.0f} s "
                               f"(locks in {lock_dir})")
        if not warned:
            log.warning("fewer than %d of the %d GPU(s) are free of other jobs (locks in %s); waiting. Lower the "
                        "`gpu` limit in profiles/default/config.yaml to the number of GPUs to avoid this.", n,
                        len(names), lock_dir)
            warned = True
        time.sleep(poll_seconds)
    return held


@contextlib.contextmanager
def claim_gpu(environ: Mapping[str, str], lock_dir: str | Path = DEFAULT_LOCK_DIR, *,
              device_count: int | None = None, uuid_query: GpuQuery = nvidia_smi_uuids, poll_seconds: float = 5.0,
              timeout: float | None = None, requested_gpus: int = 0) -> Iterator[str | None]:
    """Yield the device a job should train on (``"cuda:N"``, or None for the CPU), holding it until the block
    ends: :func:`claim_gpus` for one GPU. ``requested_gpus``: the rule's ``gpu`` resource; when >= 1, a torch
    that cannot use this machine's GPUs stops the job first (:func:`check_cuda`) instead of running on the CPU."""
    if requested_gpus:
        check_cuda(requested_gpus)
    with claim_gpus(environ, 1, lock_dir, device_count=device_count, uuid_query=uuid_query,
                    poll_seconds=poll_seconds, timeout=timeout) as claim:
        yield None if claim is None else f"cuda:{claim.indices[0]}"
