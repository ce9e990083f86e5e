"""The Python API as a notebook user types it: every stage from its file, and the docstring examples."""

import copy
import doctest
import importlib

import pytest
import torch
import yaml

from ldmflow import (
    build_dataset,
    build_loss,
    build_model,
    build_optimizer,
    check_memorization,
    compute_sample_similarity,
    load_config,
)
from ldmflow.config.controlnet import ControlNetExperiment
from ldmflow.config.diffusion import DiffusionExperiment
from ldmflow.errors import ConfigError

from .conftest import REPO, TINY_AE
from .test_train_diffusion import TINY_DIFFUSION

DOCUMENTED = ["ldmflow.api", "ldmflow.config.loading", "ldmflow.stages.memorization"]


@pytest.mark.parametrize("module", DOCUMENTED)
def test_docstring_examples_run(module, monkeypatch):
    monkeypatch.chdir(REPO)  # the examples load the repository's demo configs
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 3 and result.failed == 0


@pytest.fixture(scope="module")
def trained(tmp_path_factory, demo_manifest) -> dict:
    """Experiment files of the three stages (no stage key), a latent store and a diffusion checkpoint."""
    from ldmflow.stages.embed import embed_latents
    from ldmflow.stages.train_autoencoder import train_autoencoder
    from ldmflow.stages.train_diffusion import train_diffusion

    root = tmp_path_factory.mktemp("api")
    files = {"autoencoder": TINY_AE, "diffusion": {**TINY_DIFFUSION, "train": {"epochs": 1, "sample_every": 1}},
             "controlnet": {"name": "tinyc", "base": "tinyd", "control": {"signal": "mask"}}}
    for stage, body in files.items():
        (root / f"{stage}.yaml").write_text(yaml.safe_dump(body))
    train_autoencoder({**TINY_AE, "train": {"epochs": 1}}, demo_manifest, root / "ae", progress=False)
    store = embed_latents(root / "ae/checkpoints/tiny_checkpoint_best.pt", demo_manifest, root / "latents.zarr")
    train_diffusion(root / "diffusion.yaml", store, root / "diffusion", progress=False)
    return {"root": root, "store": store, "manifest": demo_manifest,
            "diffusion": root / "diffusion/checkpoints/tinyd_checkpoint_best.pt"}


def test_every_stage_from_its_file(trained):
    root, store = trained["root"], trained["store"]
    ae = load_config(root / "autoencoder.yaml")
    model = build_model(ae, trained["manifest"])  # fills data.classes from the manifest
    assert ae.data.classes == ["circle", "square", "triangle"] and model.classifier is not None
    batch = build_dataset(ae, trained["manifest"]).__getitems__([0, 1, 2])
    total, parts = build_loss(ae)(model(batch["image"]), batch)
    assert set(parts) == {"rgb", "seg", "cls", "kl"} and total.item() > 0

    diffusion = load_config(root / "diffusion.yaml")
    assert isinstance(diffusion, DiffusionExperiment)
    unet = build_model(diffusion, store)
    latents = build_dataset(diffusion, store).__getitems__([0, 1])
    assert build_loss(diffusion)(unet, latents["latent"], latents["label"]).item() > 0
    build_optimizer(unet, diffusion).step()

    controlnet = load_config(root / "controlnet.yaml")
    assert isinstance(controlnet, ControlNetExperiment)
    net = build_model(controlnet, store, base=trained["diffusion"])
    rows = build_dataset(controlnet, store, split="val").__getitems__([0, 1])
    loss_fn = build_loss(controlnet, base=trained["diffusion"])
    loss = loss_fn(net, rows["latent"], rows["label"], control=rows["control"])
    assert loss.item() > 0
    assert len(build_optimizer(net, controlnet).param_groups[0]["params"]) < len(list(net.parameters()))  # base frozen


def test_sizes_the_config_leaves_open_are_never_guessed():
    with pytest.raises(ConfigError, match="key 'data.mask_classes' is null, so the segmentation head has no size"):
        build_model(load_config(copy.deepcopy(TINY_AE) | {"data": {"image_size": 16}}))
    no_heads = load_config({"name": "ae", "loss": {"segmentation": {"enabled": False},
                                                   "classification": {"enabled": False}}})
    assert build_model(no_heads).segmenter is None
    with pytest.raises(ConfigError, match="pass it .*build_model\\(cfg, 'latents.zarr'\\).* or latent_channels="):
        build_model(load_config(TINY_DIFFUSION))
    with pytest.raises(ConfigError, match="key 'model.class_conditional' is true but the class count is unknown"):
        build_model(load_config(TINY_DIFFUSION), latent_channels=4)
    with pytest.raises(ConfigError, match="pass base=CHECKPOINT"):
        build_model(load_config({"name": "c", "control": {"signal": "edges"}}))


def test_the_stage_key_and_the_inferred_stage():
    assert isinstance(load_config({"stage": "diffusion", "name": "x"}), DiffusionExperiment)
    assert isinstance(load_config({"name": "x", "model": {"fusion": "film"}}), ControlNetExperiment)
    with pytest.raises(ConfigError, match="key 'stage' has value 'difusion'; allowed: autoencoder, diffusion"):
        load_config({"stage": "difusion", "name": "x"})
    with pytest.raises(ConfigError, match="key 'stage' has value 'diffusion', but a controlnet experiment"):
        load_config({"stage": "diffusion", "name": "x"}, "controlnet")


def test_check_memorization_takes_a_trained_checkpoint_and_a_manifest(trained):
    summary = check_memorization(trained["diffusion"], trained["manifest"], num_generate=6, num_training=20, n=5,
                                 image_size=16)
    assert summary["counts"]["generated"] == 6 and summary["counts"]["training"] == 20
    assert summary["inputs"]["samples"] == str(trained["diffusion"])
    images = torch.rand(6, 3, 16, 16) * 2 - 1
    index, similarity = compute_sample_similarity(images[[4, 1]], images)
    assert index.tolist() == [4, 1] and similarity.min() > 0.999
