"""Shared fixtures: a tiny demo dataset and tiny experiment configs (CPU, seconds)."""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

torch.set_num_threads(1)


def pytest_collection_modifyitems(items):
    """The SLURM test first, then the other `slow` ones, then the rest, each group in file order: on pytest-xdist
    workers the long whole-workflow runs start early and the short tests fill the gaps, instead of one long
    test running alone at the end. `gpu` tests are skipped where torch sees no CUDA device."""
    if not torch.cuda.is_available():
        for item in items:
            if item.get_closest_marker("gpu"):
                item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))
    items.sort(key=lambda item: 0 if item.get_closest_marker("slurm") else 1 if item.get_closest_marker("slow") else 2)


@pytest.fixture(scope="session")
def demo_manifest(tmp_path_factory) -> Path:
    from ldmflow.data.demo import write_demo_data

    return write_demo_data(tmp_path_factory.mktemp("demo") / "data", n=40, size=16, seed=3)


TINY_AE = {
    "name": "tiny",
    "seed": 42,
    "data": {"image_size": 16, "batch_size": 8, "mask_classes": 4},
    "model": {"variant": "kl", "downsample": 4, "latent_channels": 4, "base_channels": 8},
    "optim": {"lr": 3e-3},
    "train": {"epochs": 2, "sample_every": 1},
}


@pytest.fixture
def tiny_ae() -> dict:
    return copy.deepcopy(TINY_AE)


def run_cli(*args: str, cwd: Path | None = None, check: bool = True,
            timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``python -m ldmflow.cli ARGS`` in a subprocess (one torch thread), capturing its output."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "ldmflow.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"ldmflow {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def start_cli(*args: str) -> subprocess.Popen:
    """Start ``python -m ldmflow.cli ARGS`` in the background (one torch thread)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "ldmflow.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Poll ``predicate`` until it holds; fail if ``proc`` ends first or time runs out."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if predicate():
                return
        except Exception:  # a checkpoint being replaced mid-read
            pass
        if proc.poll() is not None:
            raise AssertionError(f"process ended early ({proc.returncode}): {proc.stderr.read()[-3000:]}")
        time.sleep(0.02)
    raise AssertionError("timed out")


def snakemake_bin() -> str:
    found = shutil.which("snakemake", path=str(Path(sys.executable).parent)) or shutil.which("snakemake")
    if not found:
        pytest.skip("snakemake not installed")
    return found


def assert_checkpointing_changes_nothing(loss_and_grads) -> None:
    """``loss_and_grads(checkpointing)`` -> (loss, gradients): activation checkpointing gives the plain model's
    loss and every gradient."""
    (plain, plain_grads), (ckpt, ckpt_grads) = loss_and_grads(False), loss_and_grads(True)
    torch.testing.assert_close(ckpt, plain)
    for a, b in zip(ckpt_grads, plain_grads, strict=True):
        torch.testing.assert_close(a, b)
