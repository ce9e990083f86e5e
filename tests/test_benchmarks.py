"""The scale ladder (benchmarks/scale.py) runs at tiny sizes and reports every stage with a slope."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import scale  # noqa: E402  (a script beside the package, not part of it)


def test_scale_ladder_reports_seconds_memory_and_a_slope_for_every_stage(tmp_path, capsys):
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
def test_slope_is_the_log_log_exponent(values, expected):
    assert scale.slope([1000, 4000], values) == pytest.approx(expected)
