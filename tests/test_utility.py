"""Utility by training on it: downstream models of the judge's recipe trained on real, synthetic and real + synthetic
images rank a real-trained model above one trained on shuffled-label "synthetic" images, report ratios, gains and
intervals, skip the ratios a set is too small for, and draw them."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from ldmflow.config.judge import utility_config, utility_options
from ldmflow.errors import ConfigError
from ldmflow.evaluation.judge import real_images
from ldmflow.evaluation.utility import reads, score
from ldmflow.stages.utility import utility_stage

JUDGE = {"width": 4, "levels": 2, "batch_size": 32}  # the judge's recipe, on tiny shapes
OPTIONS = {"seeds": [0, 1, 2], "ratios": [1.0, 3.0], "epochs": 8, "bootstrap": 200}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from ldmflow.data.demo import write_demo_data

    return write_demo_data(tmp_path_factory.mktemp("utility") / "data", n=192, size=16, seed=3)


def synthetic_manifest(real, out, shuffle: bool):
    """A "synthetic" set made of the real train images: their labels and masks shuffled across rows, or kept."""
    split = real_images(real, 1, 16).split  # the split the training stages give the manifest's rows
    rows = [r for r, s in zip(csv.DictReader(real.open()), split) if s == "train"]
    order = np.random.default_rng(0).permutation(len(rows)) if shuffle else np.arange(len(rows))
    lines = ["image,mask,label,split"] + [
        f"{real.parent / r['image']},{real.parent / rows[j]['mask']},{rows[j]['label']},train"
        for r, j in zip(rows, order)]
    out.write_text("\n".join(lines) + "\n")
    return out


@pytest.fixture(scope="module")
def shuffled(demo, tmp_path_factory):
    out = tmp_path_factory.mktemp("shuffled")
    report = utility_stage(demo, synthetic_manifest(demo, out / "manifest.csv", True), out, OPTIONS, JUDGE,
                           threads=1)
    return report, out


def test_real_trained_models_rank_clearly_above_shuffled_label_synthetic_ones(shuffled):
    report, _ = shuffled
    real = report["conditions"][0]
    synthetic = next(c for c in report["conditions"] if c["train_on"] == "synthetic")
    ratio = report["synthetic_only_over_real_only"][0]
    print(f"real only: accuracy {real['accuracy']['mean']:.2f} {real['accuracy']['ci95']}, mIoU "
          f"{real['miou']['mean']:.2f}; shuffled synthetic: accuracy {synthetic['accuracy']['mean']:.2f}, mIoU "
          f"{synthetic['miou']['mean']:.2f}; ratio {ratio['accuracy']['value']:.2f} {ratio['accuracy']['ci95']}")
    assert real["accuracy"]["mean"] > synthetic["accuracy"]["mean"] + 0.2
    assert real["miou"]["mean"] > synthetic["miou"]["mean"] + 0.1
    assert ratio["accuracy"]["ci95"][1] < 0.9 and ratio["miou"]["ci95"][1] < 0.9
    assert real["train_on"] == "real" and len(real["accuracy"]["per_seed"]) == 3


def test_a_ratio_the_synthetic_set_cannot_reach_is_reported_as_skipped(shuffled):
    report, _ = shuffled
    assert [s["ratio"] for s in report["skipped"]] == [3.0] and "skipped" in report["skipped"][0]["reason"]
    assert {c["ratio"] for c in report["conditions"]} == {0.0, 1.0}
    assert len(report["runs"]) == 3 * 3  # real, synthetic, real + synthetic; three seeds each


def test_the_report_gives_gains_with_intervals_and_what_they_read(shuffled):
    report, out = shuffled
    gain = report["real_plus_synthetic_gain"][0]
    for m in ("accuracy", "miou"):
        lo, hi = gain[m]["ci95"]
        assert lo <= gain[m]["value"] <= hi and gain[m]["reads"] == reads([lo, hi])
    assert json.loads((out / "utility.json").read_text())["interval"] == report["interval"]
    rows = list(csv.DictReader((out / "utility.csv").open()))
    assert len(rows) == 3 * 2 and {r["train_on"] for r in rows} == {"real", "synthetic", "real+synthetic"}
    assert (out / "utility.png").stat().st_size > 10_000


def test_a_gain_whose_interval_holds_zero_reads_no_measurable_gain():
    assert reads([-0.01, 0.02]) == "no measurable gain"
    assert reads([0.01, 0.02]) == "gain" and reads([-0.03, -0.01]) == "loss"


def test_miou_pools_pixels_over_images_and_skips_absent_classes():
    run = {"inter": np.array([[2.0, 0.0], [1.0, 0.0]]), "union": np.array([[4.0, 0.0], [2.0, 0.0]])}
    assert score([run], "miou") == pytest.approx(0.5)
    assert score([run], "accuracy") is None


def test_bad_utility_options_name_the_key():
    for bad, key in (({"seeds": [0, 1]}, "seeds"), ({"ratios": [0.0]}, "ratios"), ({"epochs": 0}, "epochs")):
        with pytest.raises(ConfigError, match=key):
            utility_config(bad)
    with pytest.raises(ConfigError, match="utility"):
        utility_options({"utility": {"seed": [1, 2, 3]}})
    assert utility_config().seeds == [0, 1, 2]
