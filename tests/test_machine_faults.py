"""Faults of the machine: a full, read-only or vanished disk is one line naming the path and the errno with
nothing lost, and a run folder is owned by one process at a time (a live holder is named, a dead one's lock is
taken over)."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from ldmflow.artifacts import (
    LOCK_STALE_AFTER_S,
    RunPaths,
    atomic_write_bytes,
    load_checkpoint,
    publish_dir,
    run_lock,
    take_run_lock,
)
from ldmflow.cli import main
from ldmflow.data.demo import write_demo_data
from ldmflow.errors import RunLockedError, StorageError, exit_code

from .conftest import TINY_AE


def enospc(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_during_an_atomic_write_names_path_and_errno_and_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "ckpt.pt"
    atomic_write_bytes(target, b"old")
    monkeypatch.setattr(os, "fsync", enospc)
    with pytest.raises(StorageError, match=r"ckpt.pt: cannot write \(ENOSPC: No space left on device\)") as info:
        atomic_write_bytes(target, b"new")
    assert exit_code(info.value) == 2
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]


def test_a_vanished_or_read_only_folder_is_a_storage_error(tmp_path, monkeypatch):
    def erofs(*_args, **_kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(os, "replace", erofs)
    with pytest.raises(StorageError, match="EROFS"):
        atomic_write_bytes(tmp_path / "a" / "b.json", b"{}")
    (tmp_path / "tmp").mkdir()
    with pytest.raises(StorageError, match=r"store.zarr: cannot write \(EROFS"):
        publish_dir(tmp_path / "tmp", tmp_path / "store.zarr")
    assert not (tmp_path / "tmp").exists()


@pytest.fixture
def tiny_run(tmp_path) -> tuple[list[str], Path]:
    """A 1-epoch run of the tiny autoencoder already trained, and the argv that trains it on."""
    manifest = write_demo_data(tmp_path / "data", n=8, size=16, seed=1)
    config = tmp_path / "ae.yaml"
    config.write_text(yaml.safe_dump({**TINY_AE, "train": {"epochs": 1, "sample_every": 5}}))
    argv = ["train-ae", "--config", str(config), "--data", str(manifest), "--out", str(tmp_path / "run"),
            "--device", "cpu", "--threads", "1"]
    assert main(argv) == 0
    return argv, tmp_path / "run"


def test_a_full_disk_while_checkpointing_is_one_line_then_the_run_resumes(tiny_run, monkeypatch, capsys):
    argv, run = tiny_run
    paths = RunPaths(run, "tiny")
    before = paths.latest.read_bytes()
    with monkeypatch.context() as m:
        m.setattr(os, "fsync", enospc)
        assert main([*argv, "--set", "train.epochs=2"]) == 2
    printed = capsys.readouterr().err
    assert "Traceback" not in printed
    assert f"{run}/" in printed.strip().splitlines()[-1] and "cannot write (ENOSPC" in printed.strip().splitlines()[-1]
    assert paths.latest.read_bytes() == before and load_checkpoint(paths.latest)["epoch"] == 1
    assert not list(run.rglob(".*tmp*")) and not paths.lock.exists()
    assert main([*argv, "--set", "train.epochs=2"]) == 0  # space is back
    assert load_checkpoint(paths.latest)["epoch"] == 2
    assert "resumed tiny from epoch 1" in capsys.readouterr().err


def hold_lock(run: Path) -> subprocess.Popen:
    """Another process that takes the run's lock and sleeps (prints 'held' once it holds it)."""
    code = ("import sys, time; from pathlib import Path; from ldmflow.artifacts import RunPaths, take_run_lock; "
            f"take_run_lock(RunPaths(Path({str(run)!r}), 'tiny')); print('held', flush=True); time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_process_on_a_held_run_exits_2_naming_the_holder(tiny_run, capsys):
    argv, run = tiny_run
    holder = hold_lock(run)
    try:
        assert main([*argv, "--set", "train.epochs=2"]) == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert f"run tiny is held by pid {holder.pid} on {socket.gethostname()} since " in last
        assert load_checkpoint(RunPaths(run, "tiny").latest)["epoch"] == 1  # the refused process trained nothing
    finally:
        holder.kill()
        holder.wait()


def test_the_lock_of_a_sigkilled_holder_is_taken_over_with_a_note(tiny_run, capsys):
    argv, run = tiny_run
    holder = hold_lock(run)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert main([*argv, "--set", "train.epochs=2"]) == 0
    printed = capsys.readouterr().err
    assert f"taking over the lock of pid {holder.pid}" in printed and "is gone" in printed
    assert not RunPaths(run, "tiny").lock.exists()


def test_a_lock_of_another_host_is_kept_while_it_lives_and_taken_over_when_quiet(tmp_path):
    paths = RunPaths(tmp_path, "x")
    paths.lock.write_text(json.dumps({"host": "node-elsewhere", "pid": 1, "since": "2026-01-01T00:00:00+00:00"}))
    with pytest.raises(RunLockedError, match="held by pid 1 on node-elsewhere since 2026-01-01"):
        take_run_lock(paths)
    old = time.time() - LOCK_STALE_AFTER_S - 60
    os.utime(paths.lock, (old, old))
    paths.status.write_text("{}")  # a fresh status write is a sign of life
    with pytest.raises(RunLockedError):
        take_run_lock(paths)
    os.utime(paths.status, (old, old))
    with run_lock(paths) as me:
        assert json.loads(paths.lock.read_text()) == me
    assert not paths.lock.exists()


def test_the_lock_is_released_when_the_block_raises(tmp_path):
    paths = RunPaths(tmp_path, "x")
    with pytest.raises(KeyError), run_lock(paths):
        raise KeyError("boom")
    assert not paths.lock.exists()


def can_mount_tmpfs(where: Path) -> bool:
    where.mkdir(parents=True, exist_ok=True)
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(where)], capture_output=True)
    except OSError:
        return False
    if done.returncode == 0:
        subprocess.run(["umount", str(where)], check=True)
    return done.returncode == 0


def test_a_real_full_tmpfs_is_one_line_and_the_run_resumes_after_it_grows(tmp_path):
    small = tmp_path / "small"
    if not can_mount_tmpfs(small):
        pytest.skip("mounting a tmpfs needs root")
    manifest = write_demo_data(tmp_path / "data", n=8, size=16, seed=1)
    config = tmp_path / "ae.yaml"
    config.write_text(yaml.safe_dump({**TINY_AE, "train": {"epochs": 2, "sample_every": 5}}))
    argv = [sys.executable, "-m", "ldmflow.cli", "train-ae", "--config", str(config), "--data", str(manifest),
            "--out", str(small / "run"), "--device", "cpu", "--threads", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=160k", "tmpfs", str(small)], check=True)
    try:
        full = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
        assert full.returncode == 2 and "Traceback" not in full.stderr
        assert "ENOSPC" in full.stderr.strip().splitlines()[-1]
        assert not list(small.rglob(".*.tmp*")) and not list(small.rglob("*.lock"))
        subprocess.run(["mount", "-o", "remount,size=16m", str(small)], check=True)
        grown = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
        assert grown.returncode == 0, grown.stderr[-2000:]
        assert load_checkpoint(small / "run/checkpoints/tiny_checkpoint_latest.pt")["epoch"] == 2
    finally:
        subprocess.run(["umount", "-l", str(small)])


def test_any_os_error_of_the_machine_is_one_line_naming_the_path_and_the_errno(tmp_path, monkeypatch, capsys):
    import ldmflow.data.demo

    def lost(out, **_kwargs):
        raise OSError(errno.ESTALE, "Stale file handle", str(out))

    monkeypatch.setattr(ldmflow.data.demo, "write_demo_data", lost)
    assert main(["demo-data", "--out", str(tmp_path / "d")]) == 2
    printed = capsys.readouterr().err.strip().splitlines()
    assert len(printed) == 1 and printed[0].endswith(f"{tmp_path / 'd'}: ESTALE: Stale file handle")
