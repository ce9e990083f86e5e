import typing

import pytest
import torch

from ldmflow.config.autoencoder import AutoencoderModelConfig, ReconstructionLossConfig
from ldmflow.config.loading import load_config
from ldmflow.evaluation.metrics import (
    background_pixels,
    border_mask,
    confusion,
    miou,
    psnr,
    psnr_of_mse,
    region_squared_errors,
)
from ldmflow.models.autoencoder import AutoencoderLoss, build_autoencoder, dice_loss

from .conftest import assert_checkpointing_changes_nothing


def make(variant="kl", downsample=4, **loss):
    cfg = load_config({"name": "t", "data": {"mask_classes": 4, "classes": ["a", "b", "c"]},
                       "model": {"variant": variant, "downsample": downsample, "latent_channels": 3,
                                 "base_channels": 8},
                       "loss": loss})
    return cfg, build_autoencoder(cfg)


@pytest.mark.parametrize("variant", typing.get_args(typing.get_type_hints(AutoencoderModelConfig)["variant"]))
@pytest.mark.parametrize("downsample", [4, 8])
def test_shapes_for_every_variant(variant, downsample):
    cfg, model = make(variant, downsample)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    out = model(x)
    assert out["mean"].shape == (2, 3, 32 // downsample, 32 // downsample)
    assert (out["logvar"] is None) == (variant == "plain")
    assert out["recon"].shape == x.shape and out["seg"].shape == (2, 4, 32, 32) and out["logits"].shape == (2, 3)
    rgb, seg = model.decode(out["mean"], with_seg=True)
    assert rgb.shape == x.shape and seg.shape == (2, 4, 32, 32)


@pytest.mark.parametrize("kind", typing.get_args(typing.get_type_hints(ReconstructionLossConfig)["kind"]))
def test_loss_has_a_part_per_enabled_head(kind):
    cfg, model = make(reconstruction={"kind": kind}, segmentation={"dice": 0.5})
    batch = {"image": torch.rand(2, 3, 16, 16) * 2 - 1, "mask": torch.randint(0, 4, (2, 16, 16)),
             "label": torch.tensor([0, 2])}
    total, parts = AutoencoderLoss(cfg.loss)(model(batch["image"]), batch)
    assert set(parts) == {"rgb", "seg", "cls", "kl"}
    assert torch.isclose(total, sum(parts.values()))
    total.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_disabled_heads_are_not_built():
    cfg, model = make("plain", segmentation={"enabled": False}, classification={"enabled": False})
    out = model(torch.zeros(1, 3, 16, 16))
    assert out["seg"] is None and out["logits"] is None
    _, parts = AutoencoderLoss(cfg.loss)(out, {"image": torch.zeros(1, 3, 16, 16)})
    assert set(parts) == {"rgb"}


def test_metrics():
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    assert torch.all(psnr(x, x) > 90)
    assert torch.allclose(psnr(torch.zeros(1, 3, 4, 4), torch.ones(1, 3, 4, 4)), torch.tensor([6.0206]), atol=1e-3)
    t = torch.tensor([[0, 1], [1, 2]])
    assert miou(confusion(t, t, 3)) == 1.0
    assert miou(confusion(torch.zeros_like(t), t, 3)) == pytest.approx(0.25 / 3)  # class 0: IoU 1/4
    logits = torch.nn.functional.one_hot(t, 3).permute(2, 0, 1)[None].float() * 50
    assert dice_loss(logits, t[None]) < 1e-3


def test_border_and_interior_psnr_show_a_frame():
    target = torch.zeros(2, 3, 8, 8)
    framed = target.clone()
    framed[..., border_mask(8, 8)] = 0.2  # a frame on the outer 2 pixels, exact inside
    sums, counts = region_squared_errors(framed, target)
    assert counts.tolist() == [2 * 3 * 48, 2 * 3 * 16]  # 64 - 16 ring pixels per channel
    border, interior = (psnr_of_mse(float(s / c)) for s, c in zip(sums, counts))
    assert border == pytest.approx(20.0) and interior == 100.0


def test_background_pixels_tell_a_frame_from_object_edges():
    target, mask = torch.zeros(1, 3, 16, 16), torch.zeros(1, 16, 16, dtype=torch.long)
    mask[0, 6:9, 6:9] = 2  # one object in the middle
    keep = background_pixels(mask)
    assert not keep[0, 4:11, 4:11].any() and keep[0, 3].all() and keep[0, :, 11:].all()  # 2 px around it dropped
    blurred = target.clone()
    blurred[..., 5:10, 5:10] = 0.4  # error only on and around the object: no frame
    scores = lambda recon, keep=None: [psnr_of_mse(float(s / c))  # noqa: E731
                                       for s, c in zip(*region_squared_errors(recon, target, keep=keep))]
    ring, interior = scores(blurred)
    assert ring == 100.0 and interior < 40  # all pixels: the ring looks better than the interior
    assert scores(blurred, keep) == [100.0, 100.0]  # background: ring and interior alike
    framed = blurred.clone()
    framed[..., border_mask(16, 16)] = 0.2
    ring, interior = scores(framed, keep)
    assert ring == pytest.approx(20.0) and interior == 100.0  # a frame shows as ring < interior


def test_norm_keeps_several_channels_per_group():
    from ldmflow.models.layers import norm

    # narrow demo widths get groups of 4 channels, not instance norm; LDM's 32 groups stay at 128+ channels
    assert [norm(c).num_groups for c in (3, 16, 32, 64, 128, 144, 192)] == [1, 4, 8, 16, 32, 16, 32]


def test_model_norm_none_builds_the_same_autoencoder_without_group_norm():
    from ldmflow.config.autoencoder import AutoencoderExperiment
    from ldmflow.config.schema import from_dict, validate
    from ldmflow.models.autoencoder import build_autoencoder

    def build(norm):
        exp = {"name": "x", "data": {"mask_classes": 4, "classes": ["a", "b"]},
               "model": {"norm": norm, "base_channels": 16}}
        validate(exp, AutoencoderExperiment, "x.yaml")
        return build_autoencoder(from_dict(AutoencoderExperiment, exp))

    grouped, plain = build("group"), build("none")
    count = lambda m: sum(isinstance(x, torch.nn.GroupNorm) for x in m.modules())  # noqa: E731
    assert count(grouped) > 0 and count(plain) == 0
    out = plain(torch.randn(2, 3, 32, 32))
    assert out["recon"].shape == (2, 3, 32, 32) and out["seg"].shape == (2, 4, 32, 32) and out["logits"].shape == (2, 2)
    with pytest.raises(Exception, match=r"x\.yaml.*model\.norm.*'batch'.*group.*none"):
        build("batch")


def test_heads_warmup_ramps_the_head_weights_and_leaves_reconstruction_and_validation_whole():
    cfg, model = make(segmentation={"weight": 0.5, "dice": 0.5}, classification={"weight": 0.1},
                      heads_warmup_steps=100)
    batch = {"image": torch.rand(2, 3, 16, 16) * 2 - 1, "mask": torch.randint(0, 4, (2, 16, 16)),
             "label": torch.tensor([0, 2])}
    out = model(batch["image"])
    loss = AutoencoderLoss(cfg.loss)
    _, whole = loss(out, batch)  # validation: no step
    for step, factor in [(0, 0.0), (25, 0.25), (100, 1.0), (5000, 1.0)]:
        total, parts = loss(out, batch, step)
        assert torch.isclose(parts["rgb"], whole["rgb"]) and torch.isclose(parts["kl"], whole["kl"])
        assert torch.isclose(parts["seg"], whole["seg"] * factor) and torch.isclose(parts["cls"], whole["cls"] * factor)
        assert torch.isclose(total, sum(parts.values()))
    plain = AutoencoderLoss(make(segmentation={"weight": 0.5, "dice": 0.5}, classification={"weight": 0.1})[0].loss)
    _, first = plain(out, batch, 0)  # no warm-up (the default): full weights from step 0
    assert torch.isclose(first["seg"], whole["seg"]) and torch.isclose(first["cls"], whole["cls"]) and first["seg"] > 0


@pytest.mark.parametrize("downsample", [4, 8])
def test_checkpointing_gives_the_plain_models_loss_and_gradients(downsample):
    def loss_and_grads(checkpointing: bool):
        torch.manual_seed(0)  # the same weights, KL sample and dropout draws in both runs
        cfg = load_config({"name": "t", "data": {"mask_classes": 4, "classes": ["a", "b", "c"]},
                           "model": {"downsample": downsample, "latent_channels": 3, "base_channels": 8,
                                     "dropout": 0.2, "checkpointing": checkpointing}})
        model = build_autoencoder(cfg).train()
        image = torch.rand(2, 3, 32, 32) * 2 - 1
        batch = {"image": image, "mask": torch.randint(0, 4, (2, 32, 32)), "label": torch.tensor([0, 2])}
        loss, _ = AutoencoderLoss(cfg.loss)(model(image), batch)
        loss.backward()
        return loss, [p.grad for p in model.parameters()]

    assert_checkpointing_changes_nothing(loss_and_grads)
