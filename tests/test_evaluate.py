"""The evaluation stage on tiny trained runs: the judge trained on a latent store, a diffusion model's samples and a
ControlNet (with its uncontrolled base under the same noise) scored in pixel space, the summary table, the CLI."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest
import torch
from PIL import Image

from ldmflow.stages.evaluate import evaluate_controlnet, evaluate_samples, evaluation_summary, train_judge_stage
from ldmflow.stages.sample import sample_checkpoint
from ldmflow.stages.train_autoencoder import train_autoencoder
from ldmflow.stages.train_controlnet import train_controlnet
from ldmflow.stages.train_diffusion import train_diffusion

from .conftest import TINY_AE, run_cli
from .test_train_controlnet import experiment
from .test_train_diffusion import TINY_DIFFUSION

JUDGE = {"epochs": 2, "width": 4, "eval_every": 1, "folds": 2}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, demo_manifest) -> dict:
    """A tiny autoencoder, its latent store, a judge, a base diffusion model with samples and a ControlNet."""
    from ldmflow.stages.embed import embed_latents

    root = tmp_path_factory.mktemp("evaluate")
    train_autoencoder({**TINY_AE, "train": {"epochs": 1}}, demo_manifest, root / "ae")
    store = embed_latents(root / "ae/checkpoints/tiny_checkpoint_best.pt", demo_manifest, root / "latents.zarr")
    record = train_judge_stage(store, root / "judge", JUDGE, threads=1)
    train_diffusion({**TINY_DIFFUSION, "train": {**TINY_DIFFUSION["train"], "epochs": 1}}, store, root / "base")
    base = root / "base/checkpoints/tinyd_checkpoint_best.pt"
    sample_checkpoint(base, 6, root / "samples", seed=1)
    train_controlnet(experiment(train={"epochs": 1}), store, base, root / "controlnet")
    return {"root": root, "store": store, "judge": root / "judge/judge.pt", "record": record,
            "samples": root / "samples", "controlnet": root / "controlnet/checkpoints/tinyc_checkpoint_best.pt"}


def test_the_judge_stage_writes_its_checkpoint_record_and_val_grid(runs):
    record = json.loads((runs["root"] / "judge/judge.json").read_text())
    assert record["real_val"] == runs["record"]["real_val"] and len(record["curve"]) == JUDGE["epochs"]
    assert [m["seed"] for m in record["members"]] == [42, 43, 44] and record["ensemble"]["miou"]["n"] == 3
    assert {"accuracy", "miou", "per_class_accuracy", "per_class_iou"} <= record["real_val"].keys()
    assert record["heads"] == {"class": True, "segmentation": True} and record["held_out_split"] == "val"
    width, height = Image.open(runs["root"] / "judge/judge_val.png").size
    assert width > 2 * height / record["real_val"]["n"]  # image | mask | judge per row


def test_diffusion_samples_are_scored_next_to_the_judges_own_figures(runs, tmp_path):
    scores = evaluate_samples(runs["judge"], runs["samples"], tmp_path, options=JUDGE)
    assert json.loads((tmp_path / "scores.json").read_text()) == json.loads(json.dumps(scores))
    assert scores["judge"]["real_val_accuracy"] == runs["record"]["real_val"]["accuracy"]
    cf = scores["class_fidelity"]
    assert cf["available"] and cf["n"] == 6 and 0 <= cf["accuracy"] <= 1  # the classes cycle: 2 of each
    assert sum(map(sum, cf["confusion"]["counts"])) == 6
    judges = cf["judges"]  # every judge of the ensemble: the median and the range beside the sample interval
    assert judges["n"] == 3 and judges["min"] <= judges["median"] <= judges["max"]
    assert cf["accuracy"] in judges["members"]  # the first judge's reading, whose sample interval is reported
    assert scores["judge"]["members"]["accuracy"]["n"] == 3
    assert scores["features"]["generated"]["fd"] >= 0 and "precision" in scores["features"]["generated"]
    assert scores["two_sample"]["n_generated"] == 6 and (tmp_path / "grid.png").is_file()
    ceiling = scores["decoder_reference"]  # the judge on the autoencoder's reconstructions of real val images
    assert ceiling["n"] == scores["judge"]["real_val_images"] and 0 <= ceiling["miou"] <= 1
    # the PNGs alone (no samples.zarr) are read as files: no labels, the same images up to 8-bit rounding
    pngs = tmp_path / "pngs"
    pngs.mkdir()
    for p in runs["samples"].glob("sample_*.png"):
        shutil.copy(p, pngs)
    files = evaluate_samples(runs["judge"], pngs, options=JUDGE)
    assert "no generated labels" in files["class_fidelity"]["reason"] and not files["decoder_reference"]["available"]
    assert files["features"]["generated"]["fd"] == pytest.approx(scores["features"]["generated"]["fd"], rel=0.1,
                                                                 abs=1e-3)


def test_a_controlnet_and_its_base_are_scored_under_the_same_noise(runs, tmp_path):
    scores = evaluate_controlnet(runs["controlnet"], runs["judge"], tmp_path, n=4, seed=3, options=JUDGE)
    ctl = scores["control_fidelity"]
    assert ctl["available"] and ctl["real_val_miou"] == runs["record"]["real_val"]["miou"]
    for side in ("controlled", "uncontrolled_base"):
        assert 0 <= ctl[side]["miou"] <= 1 and len(ctl[side]["per_class_iou"]) == 4
    assert ctl["gain"] == pytest.approx(ctl["controlled"]["miou"] - ctl["uncontrolled_base"]["miou"])
    for side in ("controlled", "uncontrolled_base", "gain"):
        judges = ctl["judges"][side]
        assert judges["n"] == 3 and judges["min"] <= judges["median"] <= judges["max"]
    assert ctl["judges"]["controlled"]["members"][0] == pytest.approx(ctl["controlled"]["miou"])
    assert scores["n"] == 4 and scores["class_fidelity"]["available"]
    # rows: controlled | mask | judge | base | judge: 4 rows of 16 px tiles with 2 px padding, upscaled 4x
    width, height = Image.open(tmp_path / "grid.png").size
    assert (width, height) == ((5 * 18 + 2) * 4, (4 * 18 + 2) * 4)
    again = evaluate_controlnet(runs["controlnet"], runs["judge"], None, n=4, seed=3, options=JUDGE)
    assert again["control_fidelity"]["uncontrolled_base"] == ctl["uncontrolled_base"]  # same seed, same samples

    evaluation_summary([tmp_path / "scores.json"], ["controlnet/tinyc"], tmp_path / "s.csv", tmp_path / "s.png")
    table = pd.read_csv(tmp_path / "s.csv")
    assert list(table["experiment"]) == ["controlnet/tinyc"] and (tmp_path / "s.png").is_file()
    row = table.iloc[0]
    assert row["control_miou"] == pytest.approx(ctl["controlled"]["miou"], abs=1e-4)
    assert row["base_miou"] == pytest.approx(ctl["uncontrolled_base"]["miou"], abs=1e-4)
    assert row["judge_val_miou"] == pytest.approx(ctl["real_val_miou"], abs=1e-4)
    assert row["control_miou_judges_min"] == pytest.approx(ctl["judges"]["controlled"]["min"], abs=1e-4)
    assert row["control_miou_judges"].count("..") == 1  # 'median (min..max)'


def test_the_cli_trains_a_judge_and_evaluates_samples(runs, tmp_path):
    out = run_cli("judge", "train", "--data", str(runs["store"]), "--out", str(tmp_path / "j"), "--set", "epochs=1",
                  "--set", "width=4", "--threads", "1").stdout
    assert "judge: real-val accuracy" in out and (tmp_path / "j/judge.pt").is_file()
    out = run_cli("evaluate", "--judge", str(tmp_path / "j/judge.pt"), "--samples", str(runs["samples"]),
                  "--out", str(tmp_path / "e"), "--set", "folds=2").stdout
    assert "class fidelity" in out and "two-sample accuracy" in out and (tmp_path / "e/scores.json").is_file()
    assert torch.load(tmp_path / "j/judge.pt", weights_only=True)["stage"] == "judge"
