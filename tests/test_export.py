"""``ldmflow export``: diffusers loads the UNet and computes what ours does; every folder loads back with
``load_pretrained`` and samples what ``ldmflow sample`` samples."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from ldmflow.api import load_pretrained
from ldmflow.artifacts import CHECKPOINT_FORMAT, save_checkpoint
from ldmflow.checkpoints import load_autoencoder, load_controlnet, load_diffusion
from ldmflow.config.diffusion import NoiseConfig, UNetConfig
from ldmflow.config.loading import load_config
from ldmflow.config.schema import to_dict
from ldmflow.diffusion.generate import decode_latents, generate, seeded_noise
from ldmflow.diffusion.schedules import NoiseSchedule
from ldmflow.exporting.diffusers_unet import diffusers_mismatch, scheduler_config
from ldmflow.metadata import DiffusionMeta, LatentsInfo
from ldmflow.models.unet import UNet, build_unet
from ldmflow.stages.export import export_checkpoint
from ldmflow.stages.sample import cycled_labels, sample_checkpoint

from .conftest import TINY_AE, run_cli

diffusers = pytest.importorskip("diffusers")

LEGACY = Path(__file__).parent / "data" / "legacy_v0"
# the smallest UNet with an exact UNet2DModel twin: widths >= 128 in multiples of 32 (one GroupNorm group count)
EXACT_MODEL = {"base_channels": 128, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_levels": [1],
               "head_channels": 64}


def diffusion_checkpoint(path: Path, model: dict, num_classes: int | None, noise: dict | None = None) -> Path:
    """A diffusion checkpoint of a UNet with random (not zero-initialised) weights, as training writes it."""
    cfg = load_config({"name": "exp", "model": {**model, "class_conditional": num_classes is not None},
                       "diffusion": noise or {"timesteps": 100}}, "diffusion")
    torch.manual_seed(0)
    unet = build_unet(cfg, 4, num_classes)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    latents = LatentsInfo(latents="l.zarr", latent_channels=4, latent_size=8, classes=None, scale_factor=0.7,
                          autoencoder_checkpoint=str(path.parent / "missing_ae.pt"), autoencoder_sha256="0" * 64)
    meta = DiffusionMeta(latents=latents, num_classes=num_classes)
    save_checkpoint({"format": CHECKPOINT_FORMAT, "stage": "diffusion", "name": "exp", "config": to_dict(cfg),
                     "model": unet.state_dict(), "ema": None, "extra": meta.to_dict()}, path)
    return path


@pytest.mark.parametrize("num_classes", [None, 3], ids=["unconditional", "class_conditional"])
def test_diffusers_loads_the_exported_unet_and_predicts_what_ours_predicts(tmp_path, num_classes):
    ckpt = diffusion_checkpoint(tmp_path / "d.pt", EXACT_MODEL, num_classes)
    export_checkpoint(ckpt, tmp_path / "out")
    theirs = diffusers.UNet2DModel.from_pretrained(tmp_path / "out").eval()
    ours = load_pretrained(tmp_path / "out").model
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn((4, 4, 8, 8), generator=g), torch.tensor([0, 17, 50, 99])
    # every real class and the null label of classifier-free guidance (id num_classes)
    y = torch.tensor([0, 1, 2, 3]) if num_classes else None
    with torch.no_grad():
        a, b = ours(x, t, y), theirs(x, t, class_labels=y).sample
    assert a.abs().max() > 0.1  # a model whose output is ~0 would hide a wrong mapping
    assert (a - b).abs().max() < 1e-4
    info = json.loads((tmp_path / "out/ldmflow.json").read_text())
    assert info["weight_names"] == "diffusers" and info["scale_factor"] == 0.7
    assert (tmp_path / "out/README.md").read_text().count("UNet2DModel.from_pretrained") == 1


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "cosine"])
@pytest.mark.parametrize("prediction", ["epsilon", "v"])
def test_the_exported_ddim_scheduler_carries_our_noise_schedule(schedule, prediction):
    noise = NoiseConfig(timesteps=200, schedule=schedule, prediction=prediction)
    theirs = diffusers.DDIMScheduler.from_config(scheduler_config(noise))
    ours = NoiseSchedule.from_config(noise)
    assert torch.allclose(theirs.alphas_cumprod, ours.alphas_cumprod, atol=1e-6)
    assert theirs.config.prediction_type == {"epsilon": "epsilon", "v": "v_prediction"}[prediction]


@pytest.mark.parametrize("change, option", [({"base_channels": 16}, "model.base_channels"),
                                            ({"channel_mult": [2, 2]}, r"model.channel_mult\[0\]"),
                                            ({"head_channels": 96}, "model.head_channels")])
def test_a_unet_without_an_exact_diffusers_twin_is_refused_by_name(change, option):
    assert re.search(option, diffusers_mismatch(UNet(UNetConfig(**{**EXACT_MODEL, **change}), 4, 3)))


def test_a_refused_unet_still_exports_safetensors_that_load_back(tmp_path):
    ckpt = diffusion_checkpoint(tmp_path / "d.pt", {**EXACT_MODEL, "base_channels": 16, "head_channels": 16}, 3)
    export_checkpoint(ckpt, tmp_path / "out")
    info = json.loads((tmp_path / "out/ldmflow.json").read_text())
    assert info["diffusers"] is None and "model.base_channels" in info["diffusers_refused"]
    assert not (tmp_path / "out/diffusion_pytorch_model.safetensors").exists()
    assert json.loads((tmp_path / "out/config.json").read_text())["stage"] == "diffusion"
    ours = torch.load(ckpt, weights_only=True)["model"]
    loaded = load_pretrained(tmp_path / "out")
    assert not loaded.model.training and isinstance(loaded.meta, DiffusionMeta)
    assert all(torch.equal(v, ours[k]) for k, v in loaded.model.state_dict().items())


def test_autoencoder_and_controlnet_exports_load_back_with_the_checkpoints_weights(tmp_path):
    for stage in ("autoencoder", "controlnet"):
        out = tmp_path / stage
        export_checkpoint(LEGACY / f"{stage}.pt", out, autoencoder=LEGACY / "autoencoder.pt")
        expected = (load_autoencoder if stage == "autoencoder" else load_controlnet)(LEGACY / f"{stage}.pt").model
        loaded = load_pretrained(out)
        assert type(loaded.model) is type(expected) and not loaded.model.training
        assert all(torch.equal(v, expected.state_dict()[k]) for k, v in loaded.model.state_dict().items())
        assert json.loads((out / "config.json").read_text())["stage"] == stage
    # a ControlNet export holds the autoencoder that decodes its latents
    bundled = load_pretrained(tmp_path / "controlnet/autoencoder").model
    x = torch.rand((1, 3, 16, 16)) * 2 - 1
    assert torch.equal(bundled.encode(x)[0], load_autoencoder(LEGACY / "autoencoder.pt").model.encode(x)[0])


def test_the_model_card_holds_the_memorization_figures(tmp_path):
    summary = tmp_path / "summary.json"
    summary.write_text(json.dumps({"memorized": 2, "counts": {"generated": 64}, "search": {"ignored": 1}}))
    ckpt = diffusion_checkpoint(tmp_path / "d.pt", EXACT_MODEL, 3)
    export_checkpoint(ckpt, tmp_path / "out", memorization=summary)
    info = json.loads((tmp_path / "out/ldmflow.json").read_text())
    assert info["memorization"]["memorized"] == 2 and "search" not in info["memorization"]
    card = (tmp_path / "out/README.md").read_text()
    assert '"memorized": 2' in card and info["checkpoint_sha256"] in card and "class_labels=labels" in card


@pytest.fixture(scope="module")
def trained(tmp_path_factory, demo_manifest):
    from ldmflow.stages.embed import embed_latents
    from ldmflow.stages.train_autoencoder import train_autoencoder
    from ldmflow.stages.train_diffusion import train_diffusion

    root = tmp_path_factory.mktemp("export")
    train_autoencoder({**TINY_AE, "train": {"epochs": 1}}, demo_manifest, root / "ae")
    store = embed_latents(root / "ae/checkpoints/tiny_checkpoint_best.pt", demo_manifest, root / "latents.zarr")
    cfg = {"name": "exact", "model": EXACT_MODEL, "diffusion": {"timesteps": 100}, "data": {"batch_size": 8},
           "sampling": {"sampler": "ddim", "steps": 5}, "optim": {"lr": 4e-3, "warmup_steps": 0},
           "train": {"epochs": 3, "sample_every": 3, "ema": {"decay": 0.5, "warmup": 0}}}  # EMA far from the zero init
    train_diffusion(cfg, store, root / "run")
    return root / "run/checkpoints/exact_checkpoint_best.pt"


def test_export_then_load_pretrained_samples_what_ldmflow_sample_samples(tmp_path, trained):
    sample_checkpoint(trained, 6, tmp_path / "sampled", seed=7, device="cpu", batch_size=4)
    expected = np.asarray(zarr.open_group(tmp_path / "sampled/samples.zarr", mode="r")["latents"][:])
    run_cli("export", "--checkpoint", str(trained), "--out", str(tmp_path / "exported"))
    unet = load_pretrained(tmp_path / "exported")
    decoder = load_pretrained(tmp_path / "exported/autoencoder").model
    assert json.loads((tmp_path / "exported/ldmflow.json").read_text())["weight_names"] == "diffusers"
    trained_weights = load_diffusion(trained).model.state_dict()  # the EMA weights, read back from diffusers' names
    assert all(torch.equal(v, trained_weights[k]) for k, v in unet.model.state_dict().items())
    noise, gen = seeded_noise(6, unet.meta.latents.latent_shape, seed=7, device="cpu")
    z = generate(unet.model, NoiseSchedule.from_config(unet.config.diffusion), noise,
                 labels=cycled_labels(6, None, unet.meta.num_classes), sampling=unet.config.sampling,
                 prediction=unet.config.diffusion.prediction, generator=gen, batch_size=4)
    latents, pixels = decode_latents(decoder, z, unet.meta.latents.scale_factor)
    assert np.abs(latents - expected).max() < 1e-3
    from PIL import Image

    first = np.asarray(Image.open(tmp_path / "sampled/sample_00000.png"))
    assert np.abs(pixels[0].astype(int) - first.reshape(pixels[0].shape).astype(int)).max() <= 1


def test_diffusers_ddim_on_the_exported_folder_samples_what_ldmflow_sample_samples(tmp_path, trained):
    sample_checkpoint(trained, 4, tmp_path / "sampled", seed=3, device="cpu")
    expected = np.asarray(zarr.open_group(tmp_path / "sampled/samples.zarr", mode="r")["latents"][:])
    export_checkpoint(trained, tmp_path / "exported")
    unet = diffusers.UNet2DModel.from_pretrained(tmp_path / "exported").eval()
    scheduler = diffusers.DDIMScheduler.from_pretrained(tmp_path / "exported", subfolder="scheduler")
    info = load_pretrained(tmp_path / "exported")
    x, _ = seeded_noise(4, info.meta.latents.latent_shape, seed=3, device="cpu")
    labels = cycled_labels(4, None, info.meta.num_classes)
    with torch.no_grad():
        assert unet(x, 50, class_labels=labels).sample.abs().max() > 0.05  # trained away from the zero init
        scheduler.set_timesteps(info.config.sampling.steps)
        for t in scheduler.timesteps:
            x = scheduler.step(unet(x, t, class_labels=labels).sample, t, x).prev_sample
    assert np.abs(x.numpy() / info.meta.latents.scale_factor - expected).max() < 1e-3


def test_the_workflow_rule_exports_the_best_checkpoint_with_its_audit(tmp_path):
    import importlib.util
    from types import SimpleNamespace

    from .conftest import REPO

    spec = importlib.util.spec_from_file_location("export_shim", REPO / "workflow_scripts/export.py")
    shim = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(shim)
    summary = tmp_path / "summary.json"
    summary.write_text(json.dumps({"memorized": 0}))
    out = tmp_path / "results/export/diffusion/exp"
    checkpoint = diffusion_checkpoint(tmp_path / "d.pt", EXACT_MODEL, 3)
    shim.main(SimpleNamespace(log=[str(tmp_path / "export.log")], input=SimpleNamespace(memorization=str(summary)),
                              params=SimpleNamespace(checkpoint=checkpoint), output=SimpleNamespace(folder=str(out))))
    assert json.loads((out / "ldmflow.json").read_text())["memorization"]["memorized"] == 0
    assert (out / "diffusion_pytorch_model.safetensors").is_file()
    assert (out / "scheduler/scheduler_config.json").is_file()


def test_export_refuses_to_replace_a_folder_that_is_not_an_earlier_export(tmp_path):
    from ldmflow.errors import SamplingError

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine/notes.txt").write_text("keep me")
    ckpt = diffusion_checkpoint(tmp_path / "d.pt", EXACT_MODEL, None)
    with pytest.raises(SamplingError, match="a folder with other files in it"):
        export_checkpoint(ckpt, tmp_path / "mine")
    assert (tmp_path / "mine/notes.txt").read_text() == "keep me"
    export_checkpoint(ckpt, tmp_path / "out")
    export_checkpoint(ckpt, tmp_path / "out")  # an earlier export is replaced
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporaries left
