import json

import pandas as pd

from ldmflow.stages.summaries import gather_memorization, plot_training_curves


def test_gather_memorization_writes_one_row_per_experiment(tmp_path):
    paths = []
    for i, _name in enumerate(("diffusion/a", "controlnet/b")):
        summary = {"feature": "pixel", "counts": {"generated": 10, "training": 50},
                   "memorized": {"count": i, "fraction": i / 10, "ci_low": 0.0, "ci_high": 0.3 + i / 10,
                                 "criterion": ["calibrated", "tiled_l2"][i], "calibrated": i == 0,
                                 "reference_false_flag_rate": {"fraction": 0.01, "ci_high": 0.04} if i == 0 else None},
                   "tests": {"tiled_l2": {"fraction": i / 10}, "nn_ratio": {"fraction": 0.0}},
                   "similarity_percentiles": {"generated": {"p50": 0.5, "p95": 0.8 + i / 10},
                                              "reference": {"p50": 0.4, "p95": 0.85}},
                   "quality": {"generated": {"frechet_distance": 3.0 - i, "precision": 0.7, "recall": 0.6}}}
        path = tmp_path / f"{i}.json"
        path.write_text(json.dumps(summary))
        paths.append(path)
    table = gather_memorization(paths, ["diffusion/a", "controlnet/b"], tmp_path / "s.csv", tmp_path / "s.png")
    on_disk = pd.read_csv(tmp_path / "s.csv")
    assert list(on_disk["experiment"]) == ["diffusion/a", "controlnet/b"]
    assert list(on_disk["memorized"]) == [0, 1] and on_disk["frechet_distance"].tolist() == [3.0, 2.0]
    assert (on_disk["similarity_p95"].tolist() == [0.8, 0.9]
            and on_disk["reference_similarity_p95"].tolist() == [0.85] * 2)
    # the headline verdict: calibrated or not, its interval and its false flag rate on held-out images
    assert (on_disk["calibrated"].tolist() == [True, False]
            and on_disk["criterion"].tolist() == ["calibrated", "tiled_l2"])
    assert on_disk["memorized_ci_high"].tolist() == [0.3, 0.4]
    assert on_disk["reference_false_flag_rate"][0] == 0.01 and pd.isna(on_disk["reference_false_flag_rate"][1])
    assert (tmp_path / "s.png").stat().st_size > 1000 and len(table) == 2


def test_training_curves_plot(tmp_path):
    csv = tmp_path / "run_metrics.csv"
    csv.write_text("epoch,train_loss,val_loss,val_psnr,val_miou\n1,1.0,1.1,12,0.3\n2,0.8,0.9,14,0.4\n")
    plot_training_curves(csv, tmp_path / "c.png")
    assert (tmp_path / "c.png").stat().st_size > 1000
