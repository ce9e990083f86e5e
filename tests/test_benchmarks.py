"""The speed-comparison suite, run as a user runs it (``bash benchmarks/gpu_suite.sh``), at its reduced CPU scale."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from .conftest import REPO

STAGES = {"diffusion_train_step", "diffusion_train_loop", "autoencoder_train_step", "sample_ddim25",
          "sample_ddim50", "embed", "memorization_search"}


@pytest.fixture(scope="module")
def suite_records(tmp_path_factory) -> list[dict]:
    pytest.importorskip("diffusers", reason="the baselines are diffusers' (pip install -e '.[test]')")
    out = tmp_path_factory.mktemp("suite") / "suite.jsonl"
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(["bash", str(REPO / "benchmarks/gpu_suite.sh"), str(out)], cwd=REPO, env=env,
                          check=False, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "suite wall time" in proc.stdout
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_suite_writes_one_complete_record_per_comparison(suite_records):
    failed = [(r["case"], r.get("error") or r.get("skipped")) for r in suite_records if "ours" not in r]
    assert not failed
    assert {r["stage"] for r in suite_records} == STAGES
    for r in suite_records:
        assert r["device_name"].startswith("CPU") and r["mode"] == "eager_fp32" and r["extras"]
        for side in (r["ours"], r["baseline"]):
            assert set(side) == {"name", "params", "gflop_per_step", "items_per_s", "tflop_per_s"}
            assert side["gflop_per_step"] > 0 and side["items_per_s"] > 0 and side["tflop_per_s"] > 0
        for key in ("gflop_per_step", "items_per_s", "tflop_per_s"):
            assert math.isfinite(r["ratio"][key]) and r["ratio"][key] > 0, (r["stage"], key)
        # a parameter ratio wherever there are parameters (the search has none)
        assert (r["ratio"]["params"] is None) == (r["baseline"]["params"] == 0)
        # the same work: FLOPs per step within 10%
        assert r["flop_mismatch"] <= 0.10, (r["stage"], r["flop_mismatch"])


def test_suite_baselines_are_the_same_work(suite_records):
    by_stage = {r["stage"]: r for r in suite_records}
    # diffusers' UNet2DModel is built as our architecture: same FLOPs, parameters within 0.1%
    step = by_stage["diffusion_train_step"]
    assert step["flop_mismatch"] == 0 and abs(step["ratio"]["params"] - 1) < 1e-3
    assert "none" in step["extras"] and "EMA" in by_stage["diffusion_train_loop"]["extras"]
    # both DDIM loops drive the same UNet from the same noise to the same samples
    for steps in (25, 50):
        assert by_stage[f"sample_ddim{steps}"]["max_abs_difference"] < 1e-3


@pytest.mark.parametrize("max_gb", [0.0, 1.0])
def test_store_reads_compare_the_training_path_with_a_numpy_gather_and_the_anchor(tmp_path, max_gb):
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks/store_reads.py"), "--n", "300", "--size", "8",
                           "--batch", "16", "--batches", "3", "--rounds", "1", "--max-gb", str(max_gb),
                           "--workdir", str(tmp_path), "--out", str(tmp_path / "r.json")],
                          env={**os.environ, "PYTHONPATH": str(REPO / "src")}, check=True, capture_output=True,
                          text=True, timeout=120)
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["mode"] == ("streamed" if max_gb == 0 else "in_memory") and r["latent"] == [4, 8, 8]
    assert r["ours"]["items_per_s"] > 0 and r["baseline"]["items_per_s"] > 0
    assert math.isclose(r["ratio_to_anchor"], r["ours"]["items_per_s"] / 3400.0)
    assert "samples/s" in proc.stdout and "the anchor of 3400" in proc.stdout
