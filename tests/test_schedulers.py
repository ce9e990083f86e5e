import math
import typing

import pytest
import torch

from ldmflow.config.diffusion import NoiseConfig
from ldmflow.config.loading import load_config
from ldmflow.diffusion.schedules import NoiseSchedule, Prediction, diffusion_loss, make_betas, min_snr_weights
from ldmflow.errors import ConfigError

SCHEDULES = typing.get_args(typing.get_type_hints(NoiseConfig)["schedule"])
PREDICTIONS = typing.get_args(typing.get_type_hints(NoiseConfig)["prediction"])
assert set(PREDICTIONS) == set(typing.get_args(Prediction))


def schedule(name="scaled_linear", T=1000, **kw) -> NoiseSchedule:
    return NoiseSchedule.from_config(NoiseConfig(timesteps=T, schedule=name, **kw))


@pytest.mark.parametrize("name", SCHEDULES)
def test_every_schedule_is_a_valid_variance_preserving_schedule(name):
    s = schedule(name)
    assert s.timesteps == 1000 and s.betas.shape == (1000,)
    assert torch.all(s.betas > 0) and torch.all(s.betas <= 0.999)
    assert torch.all(s.alphas_cumprod[1:] < s.alphas_cumprod[:-1])  # noise only grows
    assert torch.allclose(s.alphas**2 + s.sigmas**2, torch.ones(1000))
    assert s.alphas_cumprod[0] > 0.999 and s.alphas_cumprod[-1] < 0.005  # clean at t=0, ~noise at T-1


def test_linear_closed_form():
    s = schedule("linear")
    betas = [1e-4 + (0.02 - 1e-4) * i / 999 for i in range(1000)]
    for t in (0, 1, 250, 999):
        assert s.alphas_cumprod[t].item() == pytest.approx(math.prod(1 - b for b in betas[: t + 1]), rel=1e-5)
    assert s.alphas_cumprod[-1].item() == pytest.approx(4.036e-5, rel=1e-3)  # DDPM's sqrt(abar_T) ~ 0.0064


def test_scaled_linear_closed_form():
    s = schedule("scaled_linear")
    root = s.betas.double().sqrt()
    assert root[0].item() ** 2 == pytest.approx(0.00085) and root[-1].item() ** 2 == pytest.approx(0.012)
    assert torch.allclose(root.diff(), root.diff().mean().expand(999), rtol=1e-4)  # evenly spaced in sqrt(beta)
    betas = [(0.00085**0.5 + (0.012**0.5 - 0.00085**0.5) * i / 999) ** 2 for i in range(1000)]
    for t in (0, 500, 999):
        assert s.alphas_cumprod[t].item() == pytest.approx(math.prod(1 - b for b in betas[: t + 1]), rel=1e-5)
    assert s.alphas_cumprod[-1].item() == pytest.approx(0.00466, rel=1e-3)  # Stable Diffusion's final abar


def test_cosine_closed_form():
    s = schedule("cosine")
    f = lambda u: math.cos((u / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    clipped = s.betas >= 0.999 - 1e-6
    assert clipped[-1] and clipped.sum() <= 2  # only the last step(s) hit the clip
    for t in (0, 100, 500, 900, 990):
        assert s.alphas_cumprod[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-4)


def test_beta_range_and_errors():
    assert make_betas("linear", 10, 0.001, 0.002)[[0, -1]].tolist() == pytest.approx([0.001, 0.002])
    with pytest.raises(ValueError, match="cosine"):
        make_betas("cosine", 10, beta_start=0.001)
    with pytest.raises(ValueError, match="beta_start <= beta_end"):
        make_betas("linear", 10, 0.1, 0.01)
    with pytest.raises(ValueError, match="allowed"):
        make_betas("quadratic", 10)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="diffusion.beta_start"):
        load_config({"name": "d", "diffusion": {"schedule": "cosine", "beta_start": 0.001}}, "diffusion")
    with pytest.raises(ConfigError, match="diffusion.beta_start"):
        load_config({"name": "d", "diffusion": {"schedule": "linear", "beta_start": 0.5}}, "diffusion")


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("name", SCHEDULES)
def test_add_noise_then_predict_x0_recovers_x0(name, prediction):
    s, g = schedule(name), torch.Generator().manual_seed(0)
    x0, noise = torch.randn(6, 3, 4, 4, generator=g), torch.randn(6, 3, 4, 4, generator=g)
    t = torch.tensor([0, 1, 100, 500, 900, 990])  # not T-1: alpha ~ 0 there makes x0 unrecoverable
    x_t = s.add_noise(x0, noise, t)
    target = s.target(x0, noise, t, prediction)
    assert torch.allclose(s.predict_x0(target, x_t, t, prediction), x0, atol=1e-3)
    assert torch.allclose(s.predict_eps(target, x_t, t, prediction), noise, atol=1e-4)


def test_epsilon_v_round_trip():
    s, g = schedule(), torch.Generator().manual_seed(1)
    x0, noise = torch.randn(5, 2, 3, 3, generator=g), torch.randn(5, 2, 3, 3, generator=g)
    t = torch.tensor([0, 10, 400, 800, 999])
    x_t = s.add_noise(x0, noise, t)
    v = s.v_target(x0, noise, t)
    assert torch.allclose(s.eps_to_v(noise, x_t, t), v, atol=1e-4)
    assert torch.allclose(s.v_to_eps(v, x_t, t), noise, atol=1e-5)
    assert torch.allclose(s.v_to_eps(s.eps_to_v(noise, x_t, t), x_t, t), noise, atol=1e-5)


def test_snr():
    s = schedule("linear")
    t = torch.arange(1000)
    assert torch.allclose(s.snr(t), s.alphas_cumprod / (1 - s.alphas_cumprod))
    assert torch.all(s.snr(t).diff() < 0)


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_min_snr_weighted_loss_is_clipped_snr_times_x0_error(prediction):
    s, g, gamma = schedule(), torch.Generator().manual_seed(2), 5.0
    x0, noise = torch.randn(4, 2, 4, 4, generator=g), torch.randn(4, 2, 4, 4, generator=g)
    t = torch.tensor([1, 50, 300, 900])  # SNR from ~1e3 down to ~0.01: both sides of gamma
    assert (s.snr(t) > gamma).any() and (s.snr(t) < gamma).any()
    x_t = s.add_noise(x0, noise, t)
    output = torch.randn(4, 2, 4, 4, generator=g)
    x0_err = (s.predict_x0(output, x_t, t, prediction) - x0).pow(2).flatten(1).mean(1)
    loss = diffusion_loss(output, x0, noise, t, s, prediction, min_snr_gamma=gamma)
    assert torch.allclose(loss, s.snr(t).clamp(max=gamma) * x0_err, rtol=1e-3)
    plain = diffusion_loss(output, x0, noise, t, s, prediction)
    assert torch.allclose(plain, (output - s.target(x0, noise, t, prediction)).pow(2).flatten(1).mean(1))
    expected = {"epsilon": 1 / s.snr(t), "v": 1 / (s.snr(t) + 1)}[prediction] * s.snr(t).clamp(max=gamma)
    assert torch.allclose(min_snr_weights(s.snr(t), gamma, prediction), expected)


def test_diffusion_loss_is_per_sample_float32_and_zero_at_the_target():
    s = schedule()
    x0, noise, t = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2), torch.tensor([5, 500, 995])
    loss = diffusion_loss(s.target(x0, noise, t, "v").bfloat16(), x0, noise, t, s, "v", min_snr_gamma=5.0)
    assert loss.shape == (3,) and loss.dtype == torch.float32 and torch.all(loss < 1e-3)
    with pytest.raises(ValueError, match="allowed: epsilon, v"):
        diffusion_loss(noise, x0, noise, t, s, "x0")  # type: ignore[arg-type]


def test_schedule_moves_to_a_device():
    s = schedule().to("cpu")
    assert s.alphas.device.type == "cpu" and s.alphas.dtype == torch.float32
