"""What runs leave on disk: run-folder paths (in one place), checkpoints, sha256, atomic writes."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import shutil
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from ldmflow.errors import ConfigError, RunLockedError, StorageError, TrainingError

log = logging.getLogger(__name__)


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """Flush every file and folder of a store to disk before the rename makes it visible.

    The fsyncs run in a few threads: the file system commits concurrent ones together, so a store of many
    chunk files costs a few journal commits instead of one per file.
    """
    tree = list(os.walk(root))
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(_fsync, [os.path.join(folder, name) for folder, _, files in tree for name in files]))
        # folders after their files, so that each folder's entries are on disk when it is flushed
        list(pool.map(_fsync, [folder for folder, _, _ in tree]))


def remove_stale_temporaries(out: Path) -> None:
    """Remove temporary stores of earlier runs that were killed (their process no longer exists)."""
    for kind in ("tmp", "old"):
        for tmp in out.parent.glob(f".{out.name}.{kind}*"):
            pid = tmp.name.rsplit(f".{kind}", 1)[-1]
            if pid.isdigit() and int(pid) != os.getpid() and not process_alive(int(pid)):
                log.info("removing %s, left by an interrupted run", tmp)
                shutil.rmtree(tmp, ignore_errors=True)


def process_alive(pid: int) -> bool:
    """Whether a process of this machine still runs (one we may not signal counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def publish_dir(tmp: Path, out: Path) -> None:
    """Move a finished store to its final name, replacing an older store only once the new one is whole.

    A failed move (a lost or read-only file system) is a :class:`StorageError`; the older store is put back
    when it was already moved aside, and the temporary store is removed."""
    old = out.with_name(f".{out.name}.old{os.getpid()}")
    moved = False
    try:
        if out.exists():
            os.replace(out, old)
            moved = True
        os.replace(tmp, out)
    except OSError as exc:
        with contextlib.suppress(OSError):
            if moved and not out.exists():
                os.replace(old, out)
        shutil.rmtree(tmp, ignore_errors=True)
        raise StorageError(out, exc) from None
    if moved:
        shutil.rmtree(old, ignore_errors=True)


CHECKPOINT_FORMAT = "ldmflow-checkpoint-v1"


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Any]:
    """A binary file object on a temporary file beside ``path``; on a clean exit it is flushed to disk and
    renamed to ``path``, so readers see the old file or the whole new one, never a half file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:  # a full disk, a read-only or vanished folder: the old file stays, the temporary goes
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise StorageError(path, exc) from None
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temporary file beside ``path``, flush it to disk, then rename: never a half file."""
    with atomic_file(path) as fh:
        fh.write(data)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


def atomic_write_figure(fig: Any, path: str | Path, dpi: int = 100) -> None:
    """Render a matplotlib figure to PNG and write it atomically (then close it)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    atomic_write_bytes(path, buf.getvalue())
    fig.clear()


def save_checkpoint(state: dict, path: str | Path) -> None:
    """Atomically save a checkpoint dict (tensors, numbers, strings, lists and dicts only).

    torch.save writes straight into the temporary file: no second copy of the checkpoint in memory."""
    with atomic_file(path) as fh:
        torch.save(state, fh)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint as untrusted input (``weights_only=True``), with a clear error if it is not one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt or unsafe files
        raise TrainingError(f"{path}: not a readable ldmflow checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise TrainingError(f"{path}: not an ldmflow checkpoint (format {CHECKPOINT_FORMAT} expected)")
    return state


def inference_weights(state: dict) -> dict:
    """The weights to sample or evaluate with: the EMA weights when the run kept them."""
    return state["ema"] if state.get("ema") is not None else state["model"]


METRICS_SUFFIX = "_metrics.csv"


@dataclass
class RunPaths:
    """The one place the layout of a run folder is spelled out (RUN/NAME_metrics.csv, RUN/checkpoints/...)."""

    out_dir: Path
    name: str

    @classmethod
    def of_metrics(cls, metrics: str | Path) -> RunPaths:
        """The run a metrics CSV belongs to (the workflow's rules name runs by their metrics file)."""
        metrics = Path(metrics)
        return cls(metrics.parent, metrics.name.removesuffix(METRICS_SUFFIX))

    @classmethod
    def find(cls, run_dir: str | Path) -> list[RunPaths]:
        """Every run in a folder (one per NAME_metrics.csv)."""
        return [cls.of_metrics(p) for p in sorted(Path(run_dir).glob(f"*{METRICS_SUFFIX}"))]

    @property
    def best(self) -> Path:
        return self.out_dir / "checkpoints" / f"{self.name}_checkpoint_best.pt"

    @property
    def latest(self) -> Path:
        return self.out_dir / "checkpoints" / f"{self.name}_checkpoint_latest.pt"

    @property
    def metrics(self) -> Path:
        return self.out_dir / f"{self.name}{METRICS_SUFFIX}"

    @property
    def status(self) -> Path:
        """A small JSON file the loop rewrites while it runs (read by ``ldmflow status``)."""
        return self.out_dir / f"{self.name}_status.json"

    @property
    def lock(self) -> Path:
        """The run's lock file: which process (host, pid, since when) owns the run (see :func:`run_lock`)."""
        return self.out_dir / f"{self.name}.lock"

    @property
    def tensorboard(self) -> Path:
        return self.out_dir / "tensorboard"

    def sample(self, epoch: int) -> Path:
        return self.out_dir / "samples" / f"epoch_{epoch:03d}.png"

    @property
    def previous(self) -> Path:
        return self.out_dir / "previous"

    def run_outputs(self) -> list[Path]:
        """What a run of this experiment leaves in its folder and a fresh run must not inherit: its
        checkpoints, metrics CSV, curves, epoch samples and evaluation samples (named, never a listing:
        the folder may be one a user gave with ``--out``)."""
        return [self.best, self.latest, self.metrics, self.out_dir / f"{self.name}_curves.png",
                self.out_dir / "samples", self.out_dir / "eval_samples"]


def set_aside_run(paths: RunPaths) -> Path | None:
    """Move an earlier run's outputs into ``RUN/previous/`` (same relative names; an older ``previous/`` is
    replaced), so a fresh run after a changed config or input leaves no stale best checkpoint or sample
    beside its own. Returns the folder, or None when there was nothing to move."""
    found = [p for p in paths.run_outputs() if p.exists()]
    if not found:
        return None
    shutil.rmtree(paths.previous, ignore_errors=True)
    for path in found:
        target = paths.previous / path.relative_to(paths.out_dir)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, target)
    log.warning("moved the earlier run's %s into %s", ", ".join(str(p.relative_to(paths.out_dir)) for p in found),
                paths.previous)
    return paths.previous


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def require_sha256(path: Path, expected: str, error: type[Exception], recorded: str, hint: str) -> Path:
    """The one check of a file against the sha256 an artifact recorded for it: returns ``path``, or raises
    ``error`` naming what recorded the digest (``recorded``), the file's own digest and what to do (``hint``)."""
    got = file_sha256(path)
    if got != expected:
        raise error(f"{recorded} (sha256 {expected[:12]}...), but {path} has sha256 {got[:12]}...; {hint}")
    return path


def resolve_checkpoint(checkpoint: str | Path) -> tuple[Path, Path | None]:
    """An autoencoder checkpoint path from a ``.pt`` file or a ``selected.json``: (checkpoint, selected)."""
    path = Path(checkpoint)
    if path.suffix != ".json":
        if not path.is_file():
            raise FileNotFoundError(f"{path}: autoencoder checkpoint not found")
        return path, None
    try:
        chosen = json.loads(path.read_text())["checkpoint"]
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: selection file not found") from None
    except (json.JSONDecodeError, KeyError, TypeError):
        raise ConfigError(f"{path}: expected a selected.json written by `ldmflow select-ae`, with the key "
                          "'checkpoint'") from None
    if not Path(chosen).is_file():
        raise FileNotFoundError(f"{path}: key 'checkpoint' names {chosen}, which does not exist")
    return Path(chosen), path


# A lock written by another host cannot be checked by pid: it is stale when neither it nor the run's status file
# (rewritten at every log point and epoch end while the run lives) has changed for this long.
LOCK_STALE_AFTER_S = 3600.0
LOCK_UNREADABLE_AFTER_S = 60.0  # a lock file without its JSON (its writer died between create and write)


def _read_lock(path: Path) -> dict:
    try:
        holder = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _age(path: Path, now: float) -> float:
    try:
        return now - path.stat().st_mtime
    except OSError:
        return float("inf")


def lock_stale_reason(holder: dict, paths: RunPaths, now: float) -> str | None:
    """Why a held lock may be taken over, or None while its holder may still run: a holder on this host by
    its pid (gone, or this very process), one on another host by how long the run gave no sign of life."""
    host, pid = holder.get("host"), holder.get("pid")
    if not isinstance(pid, int):
        age = _age(paths.lock, now)
        return f"an unreadable lock {age:.0f} s old" if age > LOCK_UNREADABLE_AFTER_S else None
    if host == socket.gethostname():
        if pid == os.getpid() or not process_alive(pid):
            return f"process {pid} on this host is gone"
        return None
    quiet = min(_age(paths.lock, now), _age(paths.status, now))
    if quiet > LOCK_STALE_AFTER_S:
        return f"no sign of life from {host} for {quiet / 60:.0f} min"
    return None


def _describe_holder(holder: dict, paths: RunPaths) -> str:
    if not holder:
        return f"{paths.out_dir}: run {paths.name} is being taken by another process ({paths.lock})"
    return (f"{paths.out_dir}: run {paths.name} is held by pid {holder.get('pid')} on {holder.get('host')} since "
            f"{holder.get('since')} ({paths.lock}); wait for it to end or stop it (a lock left by a process that is "
            f"gone is taken over: on its host at once, from another host after {LOCK_STALE_AFTER_S / 60:.0f} min "
            "without a status update)")


def _remove_stale(lock: Path, holder: dict) -> None:
    """Remove a stale lock unless another process took it over meanwhile (rename first: one remover wins)."""
    aside = lock.with_name(f".{lock.name}.stale{os.getpid()}")
    try:
        os.replace(lock, aside)
    except FileNotFoundError:
        return
    if _read_lock(aside) != holder:  # a fresh lock of another taker: give it back
        with contextlib.suppress(OSError):
            os.link(aside, lock)
    aside.unlink(missing_ok=True)


def take_run_lock(paths: RunPaths) -> dict:
    """Own a run folder's run: create ``paths.lock`` with O_CREAT|O_EXCL (atomic on NFS and other shared file
    systems, where flock may not be) holding this process's host, pid and start time. A stale lock is taken
    over with a warning; a live holder is a :class:`RunLockedError` naming it."""
    me = {"host": socket.gethostname(), "pid": os.getpid(),
          "since": datetime.now(UTC).isoformat(timespec="seconds")}
    for _ in range(5):
        try:
            paths.out_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(paths.lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read_lock(paths.lock)
            reason = lock_stale_reason(holder, paths, time.time())
            if reason is None:
                raise RunLockedError(_describe_holder(holder, paths)) from None
            log.warning("%s: taking over the lock of pid %s on %s since %s: %s", paths.lock, holder.get("pid"),
                        holder.get("host"), holder.get("since"), reason)
            _remove_stale(paths.lock, holder)
            continue
        except OSError as exc:
            raise StorageError(paths.lock, exc) from None
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps(me) + "\n")
        return me
    raise RunLockedError(_describe_holder(_read_lock(paths.lock), paths))


def release_run_lock(paths: RunPaths, me: dict) -> None:
    """Remove the run's lock when it is still this process's (never a lock another process took over)."""
    if _read_lock(paths.lock) == me:
        with contextlib.suppress(OSError):
            paths.lock.unlink()


@contextlib.contextmanager
def run_lock(paths: RunPaths) -> Iterator[dict]:
    """Hold the run's lock for the block: released on a normal end, an error and a preemption alike."""
    me = take_run_lock(paths)
    try:
        yield me
    finally:
        release_run_lock(paths, me)
