"""On a CUDA machine: training, checkpoints and resume on the GPU, and DDP over two GPUs with NCCL.

Marked ``gpu``: skipped without CUDA (tests/conftest.py), run by ``bash benchmarks/gpu_check.sh`` on a GPU
machine. Only the packages the GPU machine gets from benchmarks/gpu_wheels.sh are imported (no Snakemake)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import yaml

from ldmflow.artifacts import RunPaths, load_checkpoint
from ldmflow.cli import main

from .conftest import TINY_AE

pytestmark = pytest.mark.gpu


def train_tiny(tmp_path, manifest, epochs: int, *extra: str) -> list[str]:
    config = tmp_path / "ae.yaml"
    config.write_text(yaml.safe_dump({**TINY_AE, "train": {"epochs": epochs, "checkpoint_every_epochs": 2}}))
    return ["train-ae", "--config", str(config), "--data", str(manifest), "--out", str(tmp_path / "run"),
            "--threads", "1", *extra]


def test_a_run_on_the_gpu_resumes_and_keeps_a_weights_only_best_checkpoint(tmp_path, demo_manifest):
    argv = train_tiny(tmp_path, demo_manifest, 3, "--device", "cuda")
    assert main(argv) == 0
    paths = RunPaths(tmp_path / "run", "tiny")
    assert load_checkpoint(paths.latest)["epoch"] == 3  # the last epoch is always saved
    best = load_checkpoint(paths.best)
    assert "optimizer" not in best and all(v.device.type == "cpu" for v in best["model"].values())
    assert main([*argv, "--set", "train.epochs=4"]) == 0
    resumed = load_checkpoint(paths.latest)
    assert resumed["epoch"] == 4 and [r["epoch"] for r in resumed["history"]] == [1, 2, 3, 4]
    assert all(torch.isfinite(v).all() for v in resumed["model"].values() if v.is_floating_point())


def test_two_gpus_train_one_run_with_nccl_without_hanging(tmp_path, demo_manifest):
    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs 2 GPUs, {torch.cuda.device_count()} visible")
    argv = train_tiny(tmp_path, demo_manifest, 2)
    code = "from ldmflow.launch import run_cli; import sys; run_cli(sys.argv[1:], nproc=2)"
    proc = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    latest = load_checkpoint(RunPaths(tmp_path / "run", "tiny").latest)
    assert latest["epoch"] == 2 and len(latest["rng"]) == 2  # one random state per rank
