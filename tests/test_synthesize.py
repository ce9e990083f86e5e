"""Synthetic labelled sets (diffusion and ControlNet), their release through the memorization audit, and the
seeded, class-stratified draws of real rows that the evaluation uses."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from ldmflow.config.synthetic import SyntheticConfig, synthetic_config
from ldmflow.data.draws import allocate, stratified_rows
from ldmflow.errors import ConfigError, SamplingError
from ldmflow.stages.memorization import evaluate_memorization
from ldmflow.stages.release import ReleaseError, release
from ldmflow.stages.synthesize import class_counts, synthesize
from ldmflow.stages.train_autoencoder import train_autoencoder
from ldmflow.stages.train_controlnet import train_controlnet
from ldmflow.stages.train_diffusion import train_diffusion

from .conftest import TINY_AE
from .test_train_controlnet import experiment
from .test_train_diffusion import TINY_DIFFUSION


@pytest.fixture(scope="module")
def runs(tmp_path_factory, demo_manifest) -> dict:
    """A tiny autoencoder, its latent store, a class-conditional diffusion model and a mask ControlNet on it."""
    from ldmflow.stages.embed import embed_latents

    root = tmp_path_factory.mktemp("synthesize")
    train_autoencoder({**TINY_AE, "train": {"epochs": 1}}, demo_manifest, root / "ae")
    ae = root / "ae/checkpoints/tiny_checkpoint_best.pt"
    store = embed_latents(ae, demo_manifest, root / "latents.zarr")
    train_diffusion({**TINY_DIFFUSION, "train": {**TINY_DIFFUSION["train"], "epochs": 1}}, store, root / "base")
    base = root / "base/checkpoints/tinyd_checkpoint_best.pt"
    train_controlnet(experiment(train={"epochs": 1}), store, base, root / "controlnet")
    return {"root": root, "ae": ae, "store": store, "diffusion": base,
            "controlnet": root / "controlnet/checkpoints/tinyc_checkpoint_best.pt"}


# --------------------------------------------------------------------------------------------------
# Stratified draws
# --------------------------------------------------------------------------------------------------


def test_stratified_draws_cover_every_class_of_a_class_sorted_set():
    """Four class folders, sorted: the first 48 rows hold one class; the draw holds all four in proportion."""
    labels = np.repeat([0, 1, 2, 3], [60, 50, 30, 14])
    first = labels[:48]
    assert set(first) == {0}
    drawn = labels[stratified_rows(labels, 48, seed=0)]
    assert set(drawn) == {0, 1, 2, 3}
    assert np.bincount(drawn).tolist() == allocate(48, [60, 50, 30, 14]).tolist() == [19, 16, 9, 4]
    assert stratified_rows(labels, 48, seed=0).tolist() == stratified_rows(labels, 48, seed=0).tolist()
    assert stratified_rows(labels, 48, seed=1).tolist() != stratified_rows(labels, 48, seed=0).tolist()
    assert len(set(stratified_rows(labels, 48, seed=0))) == 48  # no row twice while rows last


def test_a_draw_larger_than_the_rows_goes_through_them_again_and_keeps_rare_classes():
    labels = np.array([0] * 9 + [1])
    drawn = stratified_rows(labels, 25, seed=0)
    assert len(drawn) == 25 and set(np.bincount(drawn, minlength=10)) <= {2, 3}
    assert allocate(3, [100, 1, 1]).tolist() == [1, 1, 1]  # the rare classes are not rounded away


def test_the_controlnet_evaluation_draws_its_val_controls_stratified_from_a_class_sorted_folder(runs, tmp_path,
                                                                                               demo_manifest):
    """Images in class folders (masks beside them), sorted: the val rows drawn for controls cover every class."""
    from ldmflow.data.latent_store import LatentStore
    from ldmflow.stages.embed import embed_latents
    from ldmflow.stages.evaluate import drawn_rows

    frame = pd.read_csv(demo_manifest)
    for kind in ("image", "mask"):
        for rel, label in zip(frame[kind], frame["label"]):
            dst = tmp_path / "folder" / f"{kind}s" / label / Path(rel).name
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(demo_manifest.parent / rel, dst)
    store = LatentStore(embed_latents(runs["ae"], tmp_path / "folder", tmp_path / "sorted.zarr"))
    val = store.indices("val")
    classes = set(store.labels[val].tolist())
    assert len(classes) >= 3 and len(set(store.labels[val[:3]])) < len(classes)  # sorted: first rows, few classes
    picks = drawn_rows(store, "val", len(classes), seed=0)
    assert set(store.labels[picks].tolist()) == classes


# --------------------------------------------------------------------------------------------------
# Synthesize
# --------------------------------------------------------------------------------------------------


def test_class_mixes_give_balanced_train_frequency_and_table_counts():
    classes = ["a", "b", "c"]
    train = np.array([0] * 6 + [1] * 3 + [2] * 1)
    assert class_counts(SyntheticConfig("diffusion/x", n=9), classes, train).tolist() == [3, 3, 3]
    assert class_counts(SyntheticConfig("diffusion/x", n=10, classes="train"), classes, train).tolist() == [6, 3, 1]
    table = SyntheticConfig("diffusion/x", n=10, classes={"c": 0.5, "a": 0.5})
    assert class_counts(table, classes, train).tolist() == [5, 0, 5]
    with pytest.raises(ConfigError, match="names \\['d'\\]"):
        class_counts(SyntheticConfig("diffusion/x", classes={"d": 1.0}), classes, train)


@pytest.mark.parametrize("entry, message", [
    ({"model": "sample/x"}, "allowed: 'diffusion/NAME'"), ({"model": "diffusion/x", "n": 0}, "'n'"),
    ({"model": "diffusion/x", "classes": "rare"}, "'classes'"), ({"model": "controlnet/x", "augment": ["vflip"]},
                                                                 "'augment'"),
    ({"model": "diffusion/x", "colour": 1}, "unknown key"),
])
def test_a_bad_synthetic_entry_stops_naming_the_key(entry, message):
    with pytest.raises(ConfigError, match=message):
        synthetic_config(entry)


def test_a_diffusion_set_is_written_in_the_inputs_format_and_trains_an_autoencoder(runs, tmp_path):
    out = tmp_path / "synthetic/tinyd"
    record = synthesize(runs["diffusion"], out, {"model": "diffusion/tinyd", "n": 12, "seed": 5, "batch_size": 5})
    frame = pd.read_csv(out / "manifest.csv", dtype=str)
    assert list(frame.columns) == ["image", "label", "split"] and len(frame) == 12
    assert set(record["counts"].values()) == {12 // len(record["classes"])}  # balanced
    assert frame["label"].value_counts().to_dict() == record["counts"]
    assert (frame["split"] == "val").sum() >= 1 and (frame["split"] == "train").sum() >= 10
    first = Image.open(out / frame["image"][0])
    assert first.mode == "RGB" and first.size == (16, 16)
    assert frame["image"][0].startswith(f"images/{frame['label'][0]}/")
    assert record["checkpoint_sha256"] and record["sampler"] == "ddim" and record["steps"] == 5
    assert json.loads((out / "dataset.json").read_text())["synthesis"]["seed"] == 5 and (out / "grid.png").is_file()
    again = synthesize(runs["diffusion"], tmp_path / "again", {"model": "diffusion/tinyd", "n": 12, "seed": 5})
    assert again["counts"] == record["counts"]
    assert (tmp_path / "again" / frame["image"][3]).read_bytes() == (out / frame["image"][3]).read_bytes()
    # the real round-trip: the folder's manifest trains the workflow's first stage
    train_autoencoder({**TINY_AE, "train": {"epochs": 1}}, out / "manifest.csv", tmp_path / "ae")
    assert (tmp_path / "ae/checkpoints/tiny_checkpoint_best.pt").is_file()


def test_a_set_of_sixteen_bit_data_is_written_as_sixteen_bit_pngs_and_reads_back(tmp_path):
    """Unconditional diffusion on 12-bit camera data in 16-bit files: the set is 16-bit PNGs in the data's range,
    without labels, and the data reader reads it back as 16-bit."""
    from ldmflow.config.common import DataConfig
    from ldmflow.data.dataset import prepare_data
    from ldmflow.stages.embed import embed_latents

    from .test_image_formats import write

    data = write(tmp_path / "png16", "png16")
    train_autoencoder({**TINY_AE, "data": {"image_size": 16, "batch_size": 4, "val_fraction": 0.25},
                       "train": {"epochs": 1}}, data, tmp_path / "ae", progress=False)
    store = embed_latents(tmp_path / "ae/checkpoints/tiny_checkpoint_best.pt", data, tmp_path / "l.zarr", threads=1)
    train_diffusion({**TINY_DIFFUSION, "data": {"batch_size": 4}, "train": {**TINY_DIFFUSION["train"], "epochs": 1}},
                    store, tmp_path / "d")
    record = synthesize(tmp_path / "d/checkpoints/tinyd_checkpoint_best.pt", tmp_path / "set",
                        {"model": "diffusion/tinyd", "n": 4})
    frame = pd.read_csv(tmp_path / "set/manifest.csv", dtype=str)
    assert list(frame.columns) == ["image", "split"] and record["counts"] == {"(none)": 4}
    img = Image.open(tmp_path / "set" / frame["image"][0])
    assert img.mode == "I;16" and 900 <= np.asarray(img).min() and np.asarray(img).max() <= 4200
    assert prepare_data(tmp_path / "set/manifest.csv", DataConfig(image_size=16)).source_bits == 16


def test_a_controlnet_set_writes_the_control_masks_it_was_given(runs, tmp_path):
    out = tmp_path / "tinyc"
    record = synthesize(runs["controlnet"], out, {"model": "controlnet/tinyc", "n": 8, "classes": "train",
                                                  "augment": ["hflip", "rot90"], "seed": 2})
    frame = pd.read_csv(out / "manifest.csv", dtype=str)
    assert list(frame.columns) == ["image", "mask", "label", "split"]
    from ldmflow.data.latent_store import LatentStore

    store = LatentStore(runs["store"])
    controls = record["controls"]
    for i, row in enumerate(controls["rows"][:4]):
        expected = np.asarray(store.masks[row])
        expected = np.rot90(expected[:, ::-1] if controls["hflip"][i] else expected, controls["rot90"][i])
        assert np.array_equal(np.asarray(Image.open(out / frame["mask"][i])), expected)
        assert store.split[row] == "train" and store.classes[store.labels[row]] == frame["label"][i]
    assert any(controls["hflip"]) or any(controls["rot90"])


def test_a_checkpoint_of_another_kind_than_the_entry_names_is_refused(runs, tmp_path):
    with pytest.raises(SamplingError, match="diffusion checkpoint"):
        synthesize(runs["diffusion"], tmp_path / "x", {"model": "controlnet/tinyd", "n": 2})


# --------------------------------------------------------------------------------------------------
# Release through the audit
# --------------------------------------------------------------------------------------------------


def _plant_copies(folder: Path, store_path: Path, count: int) -> list[str]:
    """Overwrite the first COUNT images of a synthetic set with exact copies of training images."""
    from ldmflow.data.latent_store import LatentStore

    store = LatentStore(store_path)
    train = store.indices("train")
    frame = pd.read_csv(folder / "manifest.csv", dtype=str)
    for i in range(count):
        Image.open(store.paths[int(train[i])]).convert("RGB").save(folder / frame["image"][i])
    return list(frame["image"][:count])


def test_the_release_withholds_a_planted_exact_copy_of_a_training_image(runs, tmp_path):
    synthetic = tmp_path / "synthetic/tinyd"
    synthesize(runs["diffusion"], synthetic, {"model": "diffusion/tinyd", "n": 16, "seed": 1})
    planted = _plant_copies(synthetic, runs["store"], 1)
    utility = {"counts": {"real_train": 20, "real_held_out": 4, "synthetic": 16}, "seeds": [0, 1, 2],
               "interval": "bootstrap", "metrics": ["accuracy"], "skipped": [],
               "synthetic_only_over_real_only": [{"ratio": 0.5, "accuracy": {"value": 0.9, "ci95": [0.8, 1.0]}}],
               "real_plus_synthetic_gain": [{"ratio": 0.5, "accuracy": {"value": 0.01, "ci95": [-0.02, 0.04],
                                                                        "reads": "no measurable gain"}}]}
    (synthetic / "utility.json").write_text(json.dumps(utility))
    evaluate_memorization(runs["store"], synthetic / "manifest.csv", synthetic / "audit")
    card = release(synthetic, synthetic / "audit", tmp_path / "release/tinyd", utility=synthetic / "utility.json")
    out = tmp_path / "release/tinyd"
    withheld = pd.read_csv(out / "withheld.csv", dtype=str)
    assert planted[0] in set(withheld["image"]) and card["audit"]["passed"]
    kept = pd.read_csv(out / "manifest.csv", dtype=str)
    assert planted[0] not in set(kept["image"]) and not (out / planted[0]).exists()
    assert len(kept) + len(withheld) == 16 and all((out / p).is_file() for p in kept["image"])
    assert card["counts"]["withheld"] == len(withheld) and card["utility"] == utility
    assert card["models"]["checkpoint_sha256"] and card["source_data"]["fingerprint"]
    text = (out / "DATASET_CARD.md").read_text()
    assert "Memorization audit" in text and "passed" in text
    assert "synthetic only / real only, synthetic : real 0.5: accuracy 0.900 [0.800, 1.000]" in text
    assert "accuracy 0.010 [-0.020, 0.040] (no measurable gain)" in text


def test_a_set_of_copies_stops_the_release_publishing_nothing(runs, tmp_path):
    synthetic = tmp_path / "synthetic/tinyd"
    synthesize(runs["diffusion"], synthetic, {"model": "diffusion/tinyd", "n": 8, "seed": 1})
    _plant_copies(synthetic, runs["store"], 8)
    evaluate_memorization(runs["store"], synthetic / "manifest.csv", synthetic / "audit")
    with pytest.raises(ReleaseError, match="nothing published"):
        release(synthetic, synthetic / "audit", tmp_path / "release/tinyd")
    assert not (tmp_path / "release").exists()


def test_an_audit_of_other_images_is_refused(runs, tmp_path):
    synthetic = tmp_path / "a"
    synthesize(runs["diffusion"], synthetic, {"model": "diffusion/tinyd", "n": 4, "seed": 1})
    synthesize(runs["diffusion"], tmp_path / "b", {"model": "diffusion/tinyd", "n": 4, "seed": 2})
    evaluate_memorization(runs["store"], tmp_path / "b" / "manifest.csv", tmp_path / "b" / "audit")
    with pytest.raises(ReleaseError, match="audit exactly the images"):
        release(synthetic, tmp_path / "b" / "audit", tmp_path / "release")


def test_the_workflow_plans_the_synthetic_sets_of_its_own_experiments_only(capsys):
    from ldmflow.workflow import synthetic_sets

    workflow = {"diffusion": {"d": "d.yaml"}, "controlnet": {}}
    sets = synthetic_sets([{"model": "diffusion/d", "n": 8}, {"model": "controlnet/gone"}], workflow)
    assert list(sets) == ["d"] and sets["d"]["n"] == 8 and sets["d"]["classes"] == "balanced"
    assert "left out the synthetic set gone" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="two sets named 'd'"):
        synthetic_sets([{"model": "diffusion/d"}, {"model": "diffusion/d", "seed": 1}], workflow)


def test_the_cli_synthesizes_a_controlnet_set_and_releases_it_through_the_audit(runs, tmp_path, capsys):
    from ldmflow.cli import main

    out, published = tmp_path / "set", tmp_path / "release"
    code = main(["synthesize", "--checkpoint", str(runs["controlnet"]), "--out", str(out), "--n", "12",
                 "--classes", "train", "--augment", "hflip", "--release", str(published), "--device", "cpu",
                 "--set", "quality=false"])
    printed = capsys.readouterr().out
    assert code == 0 and "wrote 12 synthetic images of controlnet/tinyc" in printed and "released" in printed
    card = json.loads((published / "card.json").read_text())
    assert card["audit"]["audited"] == 12 and card["controls"]["augment"] == ["hflip"]
    kept = pd.read_csv(published / "manifest.csv", dtype=str)
    assert all((published / p).is_file() for p in [*kept["image"], *kept["mask"]])
    assert main(["synthesize", "--checkpoint", str(runs["controlnet"]), "--out", str(out), "--classes", "a=x"]) == 2


# --------------------------------------------------------------------------------------------------
# The real rules
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_snakemake_release_publishes_a_set_only_through_its_audit_and_the_set_trains_the_workflow(tmp_path):
    """Each set is synthesized and audited; it is published with its card when the audit passes, and otherwise
    the release stops with the error that names it, publishing nothing (the tiny 2-epoch models' blurred
    samples sit closer to the 20 training images than the 4 held-out ones: either outcome is possible)."""
    import yaml

    from .test_workflow import planned_jobs, smk, tiny_workflow

    root = tiny_workflow(tmp_path / "project")
    config = yaml.safe_load((root / "config/config.yaml").read_text())
    config["diffusion"] = config["diffusion"][:1]
    config["controlnets"] = [p for p in config["controlnets"] if "concat" in p]
    config["synthetic"] = [{**entry, "n": 8} for entry in config["synthetic"]]
    config["utility"] = {"epochs": 1, "ratios": [1.0], "bootstrap": 100}
    (root / "config/config.yaml").write_text(yaml.safe_dump(config))
    plan = planned_jobs(smk(root, "-n", "release"))
    assert plan["synthesize"] == 2 and plan["audit_synthetic"] == 2 and plan["release_synthetic"] == 2
    assert plan["utility"] == 2  # the card reports the set's use: models trained on it, tested on real images
    run = smk(root, "release", "--keep-going", check=False)
    for name, columns in (("demo_unet_tiny", ["image", "label", "split"]),
                          ("demo_controlnet_concat", ["image", "mask", "label", "split"])):
        synthetic = pd.read_csv(root / f"results/synthetic/{name}/manifest.csv", dtype=str)
        assert list(synthetic.columns) == columns and len(synthetic) == 8
        audit = json.loads((root / f"results/synthetic/{name}/audit/summary.json").read_text())
        assert audit["counts"]["generated"] == 8 and audit["memorized"]["calibrated"]
        card = root / f"results/release/{name}/card.json"
        if card.is_file():
            assert json.loads(card.read_text())["audit"]["passed"]
            assert "synthetic_only_over_real_only" in json.loads(card.read_text())["utility"]
            assert (root / f"results/release/{name}/DATASET_CARD.md").is_file()
        else:
            assert f"release of {name} stopped, nothing published" in run.stdout + run.stderr
            assert not any((root / f"results/release/{name}").glob("**/*.png"))
    # the synthetic folder is the workflow's data: it plans (the mask ControlNet's set is left out, no masks)
    config["data"]["manifest"] = "results/synthetic/demo_unet_tiny/manifest.csv"
    (root / "config/config.yaml").write_text(yaml.safe_dump(config))
    assert planned_jobs(smk(root, "-n", "results/autoencoder/selected.json"))["train_autoencoder"] == 2
