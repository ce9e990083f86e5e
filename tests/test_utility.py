"""Utility by training on it: downstream models of the judge's recipe trained on real, synthetic and real + synthetic
images rank a real-trained classifier above one trained on shuffled-label "synthetic" images, report ratios, gains and
intervals, skip the ratios a set is too small for, and draw them."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image

from ldmflow.config.judge import utility_config, utility_options
from ldmflow.errors import ConfigError
from ldmflow.evaluation.utility import reads, score
from ldmflow.stages.utility import utility_stage

SIDES = (3, 6, 10)
JUDGE = {"width": 8, "levels": 2, "batch_size": 16}  # the judge's recipe, on tiny shapes
OPTIONS = {"seeds": [0, 1, 2], "ratios": [1.0, 3.0], "epochs": 30, "bootstrap": 200}


def write_squares(out, n: int = 180, size: int = 16, seed: int = 0):
    """Squares of three sizes (the class), anywhere on a dark noisy background; the mask marks the square. A
    model of the judge's kind learns both heads in seconds, so a drop is the training set's doing."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lines = ["image,mask,label,split"]
    for i in range(n):
        side = SIDES[i % len(SIDES)]
        y, x = rng.integers(0, size - side, 2)
        mask = np.zeros((size, size), np.uint8)
        mask[y:y + side, x:x + side] = 1
        image = rng.integers(0, 60, (size, size, 3)).astype(np.uint8)
        image[mask == 1] = rng.integers(150, 256, 3)
        Image.fromarray(image).save(out / f"image_{i}.png")
        Image.fromarray(mask).save(out / f"mask_{i}.png")
        lines.append(f"image_{i}.png,mask_{i}.png,side{side},{'val' if i % 5 == 4 else 'train'}")
    (out / "manifest.csv").write_text("\n".join(lines) + "\n")
    return out / "manifest.csv"


def synthetic_manifest(real, out, shuffle: bool):
    """A "synthetic" set made of the real train images and their masks, their labels kept or shuffled so that
    each class's images carry every label equally often (no label says anything of its image)."""
    rows = [r for r in csv.DictReader(real.open()) if r["split"] == "train"]
    labels = [r["label"] for r in rows]
    if shuffle:
        names, seen = sorted(set(labels)), {}
        for i, label in enumerate(labels):
            seen[label] = seen.get(label, -1) + 1
            labels[i] = names[(names.index(label) + seen[label]) % len(names)]
    lines = ["image,mask,label,split"] + [f"{real.parent / r['image']},{real.parent / r['mask']},{label},train"
                                          for r, label in zip(rows, labels)]
    out.write_text("\n".join(lines) + "\n")
    return out


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    return write_squares(tmp_path_factory.mktemp("utility") / "real")


@pytest.fixture(scope="module")
def shuffled(real, tmp_path_factory):
    out = tmp_path_factory.mktemp("shuffled")
    report = utility_stage(real, synthetic_manifest(real, out / "manifest.csv", True), out, OPTIONS, JUDGE,
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
    assert real["accuracy"]["mean"] > 0.9 and real["accuracy"]["mean"] > synthetic["accuracy"]["mean"] + 0.3
    assert ratio["accuracy"]["value"] < 0.7 and ratio["accuracy"]["ci95"][1] < 0.9  # clearly below
    assert ratio["miou"]["value"] > 0.8  # the masks were kept: the shapes are still learnt from them
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


def test_the_cli_measures_utility_and_names_a_class_the_real_data_lacks(real, tmp_path, capsys):
    from ldmflow.cli import main

    synthetic = synthetic_manifest(real, tmp_path / "manifest.csv", False)
    tiny = ["--set", "ratios=[1, 10]", "--set", "epochs=1", "--set", "bootstrap=100", "--set",
            "judge={width: 4, levels: 2}", "--threads", "1"]
    assert main(["utility", "--real", str(real), "--synthetic", str(synthetic), "--out", str(tmp_path / "u"),
                 *tiny]) == 0
    printed = capsys.readouterr().out
    assert "synthetic only / real only at 1:1: accuracy" in printed and "ratio 10:1 skipped" in printed
    assert (tmp_path / "u/utility.png").is_file()
    synthetic.write_text(synthetic.read_text().replace("side3", "hexagon"))
    assert main(["utility", "--real", str(real), "--synthetic", str(synthetic), "--out", str(tmp_path / "v"),
                 *tiny]) == 2
    assert "hexagon" in capsys.readouterr().err and not (tmp_path / "v/utility.json").exists()
