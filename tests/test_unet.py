import copy

import pytest
import torch
from torch import nn

from ldmflow.config.diffusion import UNET_PRESETS, UNetConfig
from ldmflow.config.loading import load_config
from ldmflow.models.layers import zero_module
from ldmflow.models.unet import UNet, build_unet, count_parameters

from .conftest import assert_checkpointing_changes_nothing


def tiny(preset: str = "demo_tiny", **kw) -> UNetConfig:
    """A preset's architecture (levels, blocks, attention placement) at a tiny width."""
    return UNetConfig(**{**UNET_PRESETS[preset], "base_channels": 8, "head_channels": 8, **kw})


def randomized(model: UNet, seed: int = 0) -> UNet:
    """Fill the zero-initialised parameters, so that every branch of a fresh UNet affects the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model.eval()


def inputs(n=2, c=4, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, size, size, generator=g), torch.tensor([3, 700][:n] + [10] * (n - 2))


@pytest.mark.parametrize("preset", list(UNET_PRESETS))
@pytest.mark.parametrize("num_classes", [None, 3])
def test_every_preset_predicts_its_input_shape(preset, num_classes):
    model = randomized(UNet(tiny(preset), in_channels=4, num_classes=num_classes))
    x, t = inputs()
    y = torch.tensor([0, 2]) if num_classes else None
    out = model(x, t, y)
    assert out.shape == x.shape and torch.isfinite(out).all()
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_a_fresh_unet_predicts_zero():
    x, t = inputs()
    assert torch.equal(UNet(tiny(), 4, 3)(x, t, torch.tensor([0, 1])), torch.zeros_like(x))


def test_class_conditioning_changes_the_output_and_none_means_the_null_label():
    model = randomized(UNet(tiny(), 4, num_classes=3))
    x, t = inputs()
    assert model.null_label == 3 and model.label_embed.num_embeddings == 4
    a, b = model(x, t, torch.tensor([0, 0])), model(x, t, torch.tensor([1, 1]))
    assert not torch.allclose(a, b)
    assert torch.equal(model(x, t), model(x, t, torch.tensor([3, 3])))


def test_unconditional_unet_rejects_labels():
    for model in (UNet(tiny(), 4), UNet(tiny(class_conditional=False), 4, num_classes=3)):
        assert model.label_embed is None and model.null_label is None
        with pytest.raises(ValueError, match="unconditional"):
            model(*inputs(), torch.tensor([0, 1]))


def test_timesteps_may_be_int_float_or_a_scalar():
    model = randomized(UNet(tiny(), 4))
    x, _ = inputs()
    out = model(x, torch.tensor([250, 250]))
    assert torch.allclose(model(x, torch.tensor([250.0, 250.0])), out)
    assert torch.allclose(model(x, torch.tensor(250)), out)
    assert not torch.allclose(model(x, torch.tensor([250.5, 250.5])), out)


def test_sizes_must_be_multiples_of_the_downsampling():
    model = UNet(tiny("capacity_unet128_d4"), 4)  # 4 levels: sides must be multiples of 8
    assert model.downsample_factor == 8
    with pytest.raises(ValueError, match="multiples of 8"):
        model(torch.zeros(1, 4, 12, 16), torch.tensor([1]))


@pytest.mark.parametrize("preset", ["demo_tiny", "capacity_unet128_d4"])
def test_skip_shapes_describe_the_encoder(preset):
    model = randomized(UNet(tiny(preset), 4, 3))
    x, t = inputs(size=16)
    skips, h, emb = model.encode(x, t)
    assert [tuple(s.shape[1:]) for s in skips] == model.skip_shapes(16, 16)
    assert [s.shape[1] for s in skips] == model.skip_channels()
    assert h.shape == (2, model.mid_channels, 16 // model.downsample_factor, 16 // model.downsample_factor)
    assert emb.shape == (2, 4 * 8)
    assert torch.allclose(model.decode(skips, h, emb), model(x, t))


def test_residual_hooks():
    model = randomized(UNet(tiny("capacity_unet64_d3"), 4, 3))
    x, t = inputs(size=16)
    y = torch.tensor([0, 1])
    base = model(x, t, y)
    zeros = [torch.zeros(2, *s) for s in model.skip_shapes(16, 16)]
    mid = torch.zeros(2, model.mid_channels, 4, 4)
    assert torch.equal(model(x, t, y, skip_residuals=zeros, mid_residual=mid), base)
    for i in (0, len(zeros) // 2, len(zeros) - 1):  # the first, a middle and the last skip all reach the output
        bumped = list(zeros)
        bumped[i] = torch.ones_like(zeros[i])
        assert not torch.allclose(model(x, t, y, skip_residuals=bumped), base)
    assert not torch.allclose(model(x, t, y, mid_residual=mid + 1), base)
    with pytest.raises(ValueError, match="skip_residuals has 2 tensors"):
        model(x, t, y, skip_residuals=zeros[:2])


def test_a_controlnet_can_be_built_on_the_hooks():
    """The ControlNet recipe: a trainable copy of the encoder, a hint after conv_in, zero convs into the hooks."""
    unet = randomized(UNet(tiny(), 4, 3))
    control = copy.deepcopy(unet)
    zero_convs = nn.ModuleList(zero_module(nn.Conv2d(c, c, 1)) for c in unet.skip_channels() + [unet.mid_channels])
    x, t = inputs()
    hint = torch.randn(2, unet.skip_channels()[0], 16, 16)
    skips, h, _ = control.encode(x, t, None, hint=hint)
    residuals = [conv(s) for conv, s in zip(zero_convs, skips + [h])]
    out = unet(x, t, skip_residuals=residuals[:-1], mid_residual=residuals[-1])
    assert torch.equal(out, unet(x, t))  # a fresh ControlNet leaves the UNet's output unchanged
    out.sum().backward()
    assert all(conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0 for conv in zero_convs)
    assert not torch.allclose(control.encode(x, t, hint=hint)[1], control.encode(x, t)[1])


def test_channels_last_gives_the_same_output():
    model = randomized(UNet(tiny("capacity_unet64_d3"), 4, 3))
    x, t = inputs()
    y = torch.tensor([2, 0])
    ref = model(x, t, y)
    model = model.to(memory_format=torch.channels_last)
    out = model(x.to(memory_format=torch.channels_last), t, y)
    assert torch.allclose(out, ref, atol=1e-5)


def test_bf16_autocast_and_bf16_weights():
    model = randomized(UNet(tiny(), 4, 3))
    x, t = inputs()
    y = torch.tensor([2, 0])
    ref = model(x, t, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t, y)
    assert out.dtype == torch.bfloat16 and torch.allclose(out.float(), ref, atol=0.05 * ref.abs().max().item())
    out = model.to(torch.bfloat16)(x.bfloat16(), t, y)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_dropout_is_active_in_training_only():
    model = randomized(UNet(tiny(dropout=0.5), 4))
    x, t = inputs()
    assert torch.equal(model(x, t), model(x, t))
    model.train()
    assert not torch.allclose(model(x, t), model(x, t))


def test_build_unet_follows_the_experiment():
    cfg = load_config({"name": "d", "model": {"preset": "demo_tiny"}}, "diffusion")
    model = build_unet(cfg, latent_channels=3, num_classes=5)
    assert model.in_channels == 3 and model.num_classes == 5 and model.conv_out.out_channels == 3
    cfg.model.class_conditional = False
    assert build_unet(cfg, 3, 5).label_embed is None


def preset_parameters(preset: str, num_classes: int | None = 10) -> int:
    with torch.device("meta"):  # no memory and no initialisation: only the shapes
        return count_parameters(UNet(UNetConfig(**UNET_PRESETS[preset]), in_channels=4, num_classes=num_classes))


def test_preset_parameter_counts():
    counts = {name: preset_parameters(name) for name in UNET_PRESETS}
    # The reference point: channels 128/256/256/512, attention at the two lowest resolutions, ~74M.
    assert 70e6 < counts["capacity_unet128_d4"] < 110e6
    capacity = ["demo_tiny", "capacity_unet32_d2", "capacity_unet64_d3", "capacity_unet128_d3",
                "capacity_unet128_d4", "capacity_unet192_d4"]
    assert [counts[n] for n in capacity] == sorted(counts[n] for n in capacity)
    attention = ["attn_none_unet128_d4", "attn_lowest_unet128_d4", "capacity_unet128_d4", "attn_all_unet128_d4"]
    assert [counts[n] for n in attention] == sorted(counts[n] for n in attention)
    # The class embedding is one row of 4 * base_channels per class, plus the null row.
    assert counts["demo_tiny"] - preset_parameters("demo_tiny", None) == 11 * 4 * 32


def test_count_trainable_parameters():
    model = UNet(tiny(), 4)
    model.conv_in.requires_grad_(False)
    frozen = sum(p.numel() for p in model.conv_in.parameters())
    assert count_parameters(model, trainable_only=True) == count_parameters(model) - frozen


@pytest.mark.parametrize("preset", list(UNET_PRESETS))
def test_checkpointing_gives_the_plain_models_loss_and_gradients(preset):
    def loss_and_grads(checkpointing: bool):
        torch.manual_seed(0)  # the same weights, and the same dropout draws in both runs
        model = randomized(UNet(tiny(preset, dropout=0.2, checkpointing=checkpointing), 4, 3)).train()
        x, t = inputs()
        loss = model(x, t, torch.tensor([0, 2])).pow(2).mean()
        loss.backward()
        return loss, [p.grad for p in model.parameters()]

    assert_checkpointing_changes_nothing(loss_and_grads)
