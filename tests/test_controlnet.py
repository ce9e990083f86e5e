import copy
import typing

import pytest
import torch

from ldmflow.config.controlnet import ControlNetModelConfig
from ldmflow.models.controlnet import FUSIONS, AddControlNet, ConcatControl, FiLMControl, Fusion, build_controlnet
from ldmflow.models.unet import UNet

from .conftest import assert_checkpointing_changes_nothing
from .test_unet import randomized, tiny

K, F = 3, 4  # control channels, image / latent downsampling


def base_unet(preset: str = "demo_tiny", seed: int = 0) -> UNet:
    """A tiny class-conditional UNet with every branch non-zero, like a trained base."""
    return randomized(UNet(tiny(preset), 4, num_classes=3), seed)


def controlled(fusion: str, base: UNet | None = None, **kw):
    base = base if base is not None else base_unet()
    cfg = ControlNetModelConfig(fusion=fusion, hint_channels=8, **kw)
    return build_controlnet(cfg, copy.deepcopy(base), K, F).eval(), base


def inputs(n: int = 2, size: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, size, size, generator=g)
    control = torch.rand(n, K, size * F, size * F, generator=g)
    return x, torch.tensor([3, 700][:n]), torch.tensor([0, 2][:n]), control


def test_fusions_match_the_config_type():
    assert set(FUSIONS) == set(typing.get_args(Fusion)) == \
        set(typing.get_args(typing.get_type_hints(ControlNetModelConfig)["fusion"]))


@pytest.mark.parametrize("preset", ["demo_tiny", "capacity_unet64_d3"])
@pytest.mark.parametrize("fusion", FUSIONS)
def test_a_fresh_controlled_model_gives_the_base_output_exactly(fusion, preset):
    model, base = controlled(fusion, base_unet(preset))
    x, t, y, control = inputs()
    with torch.no_grad():
        assert torch.equal(model(x, t, y, control=control), base(x, t, y))
        assert torch.equal(model(x, t, None, control=control), base(x, t))


def perturbed(model):
    """Fill the zero-initialised control parameters, as training would."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.startswith("base.") and not p.any():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
            elif name == "base.conv_in.weight":  # concat: the new input channels
                p[:, 4:] = torch.randn(p[:, 4:].shape, generator=gen) * 0.1
    return model


@pytest.mark.parametrize("fusion", FUSIONS)
def test_the_control_steers_a_trained_model_and_scale_zero_is_the_base(fusion):
    model, base = controlled(fusion)
    model = perturbed(model)
    x, t, y, control = inputs()
    with torch.no_grad():
        out = model(x, t, y, control=control)
        assert not torch.allclose(out, base(x, t, y))
        assert not torch.allclose(out, model(x, t, y, control=control.flip(-1)))
        assert not torch.allclose(out, model(x, t, y, control=control, scale=0.5))
        if fusion != "concat":  # concat fine-tunes the UNet itself: scale 0 is that UNet, not the base
            assert torch.equal(model(x, t, y, control=control, scale=0.0), base(x, t, y))


@pytest.mark.parametrize("fusion", ["add", "film"])
def test_per_level_scales(fusion):
    model, _ = controlled(fusion)
    model = perturbed(model)
    x, t, y, control = inputs()
    with torch.no_grad():
        out = model(x, t, y, control=control)
        assert torch.equal(model(x, t, y, control=control, scale=[1.0, 1.0]), out)
        assert not torch.allclose(model(x, t, y, control=control, scale=[1.0, 0.0]), out)
    with pytest.raises(ValueError, match="has 3 values; this UNet has 2 levels"):
        model(x, t, y, control=control, scale=[1.0, 1.0, 1.0])


def test_concat_takes_one_scale():
    model, _ = controlled("concat")
    x, t, y, control = inputs()
    with pytest.raises(ValueError, match="concat takes one scale"):
        model(x, t, y, control=control, scale=[1.0, 0.5])


@pytest.mark.parametrize("fusion", FUSIONS)
def test_a_control_of_the_wrong_shape_is_refused(fusion):
    model, _ = controlled(fusion)
    x, t, y, control = inputs()
    with pytest.raises(ValueError, match=r"expected \(N, 3, 32, 32\).*image resolution"):
        model(x, t, y, control=control[..., :16, :16])
    with pytest.raises(ValueError, match="3 channel"):
        model(x, t, y, control=control[:, :2])
    with pytest.raises(ValueError, match="N = 2 or 1"):
        model(x, t, y, control=torch.cat([control, control]))
    # one control for the whole batch is broadcast
    one = model(x, t, y, control=control[:1])
    assert torch.allclose(one[:1], model(x[:1], t[:1], y[:1], control=control[:1]), atol=1e-5)


@pytest.mark.parametrize("fusion,decoder", [("add", False), ("add", True), ("film", False), ("film", True),
                                            ("concat", False)])
def test_what_trains(fusion, decoder):
    model, _ = controlled(fusion, train_base_decoder=decoder)
    trains = {n for n, p in model.named_parameters() if p.requires_grad}
    base = {n for n in trains if n.startswith("base.")}
    if fusion == "concat":
        assert base == {n for n, _ in model.named_parameters()}  # the whole UNet is fine-tuned
        return
    assert trains - base  # the control branch
    decoder_params = {n for n in base if n.split(".")[1] in ("up", "norm_out", "conv_out")}
    assert base == decoder_params
    assert bool(base) == decoder
    x, t, y, control = inputs()
    model.train()
    model(x, t, y, control=control).square().mean().backward()
    zero_convs = model.zero_convs if fusion == "add" else model.film
    assert all(c.weight.grad is not None and c.weight.grad.abs().sum() > 0 for c in zero_convs)


def test_add_copies_the_encoder_only():
    model, base = controlled("add")
    assert isinstance(model, AddControlNet) and not hasattr(model.control, "up")
    copied = model.control.state_dict()
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in copied.items())
    assert isinstance(controlled("film")[0], FiLMControl) and isinstance(controlled("concat")[0], ConcatControl)


def test_bind_repeats_the_control_for_guidance_batches():
    from ldmflow.diffusion.samplers import guided

    model, _ = controlled("add")
    model = perturbed(model)
    x, t, y, control = inputs()
    bound = model.bind(control)
    assert bound.null_label == 3
    with torch.no_grad():
        denoise = guided(bound, y, 2.0, bound.null_label)
        cond, uncond = model(x, t, y, control=control), model(x, t, torch.full_like(y, 3), control=control)
        assert torch.allclose(denoise(x, t), uncond + 2.0 * (cond - uncond), atol=1e-5)


@pytest.mark.parametrize("fusion", FUSIONS)
def test_checkpointing_gives_the_plain_models_loss_and_gradients(fusion):
    def loss_and_grads(checkpointing: bool):
        torch.manual_seed(0)  # the same control weights and dropout draws in both runs
        model, _ = controlled(fusion, checkpointing=checkpointing)
        model = perturbed(model).train()
        x, t, y, control = inputs()
        loss = model(x, t, y, control=control).pow(2).mean()
        loss.backward()
        return loss, [p.grad for p in model.parameters() if p.requires_grad]

    assert_checkpointing_changes_nothing(loss_and_grads)
