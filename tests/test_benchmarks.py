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


BLOCK_ZARR = '''import importlib.abc, sys


class NoZarr(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.partition(".")[0] == "zarr":
            raise ImportError("zarr is blocked by the test")


sys.meta_path.insert(0, NoZarr())
'''


def test_the_suite_runs_its_other_cases_and_notes_the_skipped_embedding_on_a_machine_without_zarr(tmp_path):
    pytest.importorskip("diffusers", reason="the baselines are diffusers' (pip install -e '.[test]')")
    (tmp_path / "block").mkdir()
    (tmp_path / "block" / "sitecustomize.py").write_text(BLOCK_ZARR)  # every python3 the script starts lacks zarr
    out = tmp_path / "suite.jsonl"
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": str(tmp_path / "block"), "LDMFLOW_WHEELS": str(tmp_path / "no-wheels"),
           "LDMFLOW_SITE": str(tmp_path / "site")}
    proc = subprocess.run(["bash", str(REPO / "benchmarks/gpu_suite.sh"), str(out), "--cases", "embedding",
                           "memorization search", "DDIM 25"], cwd=REPO, env=env, check=False, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "zarr is not installed, so the embedding case is skipped" in proc.stdout
    records = {r["case"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert set(records) == {"embedding", "memorization search", "sampling DDIM 25 eager_fp32 batch 4"}
    assert records["embedding"]["skipped"].startswith("zarr is not installed")
    assert all("ours" in r for name, r in records.items() if name != "embedding")


@pytest.mark.parametrize("script", ["gpu_suite.sh", "gpu_wheels.sh", "gpu_check.sh"])
def test_the_gpu_machine_scripts_are_valid_bash(script):
    proc = subprocess.run(["bash", "-n", str(REPO / "benchmarks" / script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
# --------------------------------------------------------------------------------------------------
# The scale ladder (benchmarks/scale.py): every stage, seconds, peak memory and a slope
# --------------------------------------------------------------------------------------------------


def _scale_module():
    sys.path.insert(0, str(REPO / "benchmarks"))  # a script beside the package, not part of it
    import scale

    return scale


def test_scale_ladder_reports_seconds_memory_and_a_slope_for_every_stage(tmp_path, capsys):
    scale = _scale_module()
    out = tmp_path / "scale.json"
    result = scale.main(["--sizes", "16", "32", "--samples", "8", "--image-size", "16", "--feature-size", "16",
                         "--threads", "1", "--same-process", "--out", str(out)])
    table = capsys.readouterr().out
    for stage in scale.STAGES:
        assert f"{stage} s" in table and f"{stage} MiB" in table
        assert result["slopes"][stage]["seconds"] is not None
        assert all(row[stage]["seconds"] > 0 and row[stage]["peak_rss_mib"] > 0 for row in result["rows"])
    assert "| slope |" in table
    assert [row["n"] for row in json.loads(out.read_text())["rows"]] == [16, 32]


def test_scale_ladder_measures_each_stage_in_its_own_process(tmp_path):
    run = subprocess.run([sys.executable, str(REPO / "benchmarks/scale.py"), "--sizes", "8", "16", "--stages",
                          "manifest", "--image-size", "16", "--out", str(tmp_path / "scale.json")],
                         capture_output=True, text=True, env={"PYTHONPATH": str(REPO / "src"), "PATH": ""})
    assert run.returncode == 0, run.stderr
    result = json.loads((tmp_path / "scale.json").read_text())
    assert result["stages"] == ["manifest"] and result["slopes"]["manifest"]["seconds"] is not None


@pytest.mark.parametrize("values,expected", [([1.0, 4.0], 1.0), ([2.0, 2.0], 0.0)])
def test_scale_slope_is_the_log_log_exponent(values, expected):
    assert _scale_module().slope([1000, 4000], values) == pytest.approx(expected)


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
