import subprocess
import sys
import typing

import pytest
import torch

from ldmflow.config.diffusion import NoiseConfig, SamplingConfig
from ldmflow.diffusion import samplers
from ldmflow.diffusion.samplers import SAMPLERS, Spacing, guided, sample, sample_ddim, sample_ddpm, timestep_spacing
from ldmflow.diffusion.schedules import NoiseSchedule

from .host_syncs import HostSyncs, count_host_syncs

SAMPLER_NAMES = typing.get_args(typing.get_type_hints(SamplingConfig)["sampler"])
SCHEDULES = typing.get_args(typing.get_type_hints(NoiseConfig)["schedule"])
PREDICTIONS = typing.get_args(typing.get_type_hints(NoiseConfig)["prediction"])
SPACINGS = typing.get_args(Spacing)


def schedule(name="scaled_linear", T=1000) -> NoiseSchedule:
    return NoiseSchedule.from_config(NoiseConfig(timesteps=T, schedule=name))


# Data x0 ~ N(MU, S^2), independently per element, with a mean and std per channel. Then
# x_t = alpha x0 + sigma eps is Gaussian too and the optimal (posterior-mean) predictors are exact:
#   E[eps | x_t] = sigma (x_t - alpha MU) / V,   E[x0 | x_t] = MU + alpha S^2 (x_t - alpha MU) / V,
# with V = alpha^2 S^2 + sigma^2 the variance of x_t.
MU = torch.tensor([1.5, -1.0]).view(1, 2, 1, 1)
S = torch.tensor([0.5, 1.2]).view(1, 2, 1, 1)


def gaussian_oracle(s: NoiseSchedule, prediction: str):
    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a, sig = s.alphas[t].view(-1, 1, 1, 1), s.sigmas[t].view(-1, 1, 1, 1)
        var = a**2 * S**2 + sig**2
        eps = sig * (x - a * MU) / var
        x0 = MU + a * S**2 * (x - a * MU) / var
        return eps if prediction == "epsilon" else a * eps - sig * x0

    return denoise


def random_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A deterministic stand-in network with some dependence on x and t."""
    return torch.tanh(x * 0.5 + t.view(-1, 1, 1, 1) / 1000)


# Each sampler's steps for the Gaussian test: ancestral sampling needs the most, DPM-Solver++ the fewest.
GAUSSIAN_STEPS = {"ddpm": 250, "ddim": 100, "dpmpp_2m": 50}


def test_samplers_cover_the_config_options():
    assert set(SAMPLERS) == set(SAMPLER_NAMES) == set(GAUSSIAN_STEPS)


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("schedule_name", SCHEDULES)
@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_samplers_reproduce_a_known_gaussian(name, schedule_name, prediction):
    s = schedule(schedule_name)
    gen = torch.Generator().manual_seed(0)
    x_T = torch.randn(1024, 2, 4, 4, generator=gen)  # 16384 values per channel
    x0 = SAMPLERS[name](gaussian_oracle(s, prediction), x_T, s, GAUSSIAN_STEPS[name], prediction=prediction,
                        generator=gen)
    mean, std = x0.mean((0, 2, 3)), x0.std((0, 2, 3))
    # Starting from N(0, I) rather than the true x_T marginal biases the mean by at most
    # S * alpha_T * MU / sqrt(V_T) (exactly that for deterministic samplers): ~0.05 for scaled_linear's
    # final alpha of 0.068, negligible for linear and cosine.
    a_T = s.alphas[-1]
    bias = (S * a_T * MU.abs() / (a_T**2 * S**2 + s.sigmas[-1] ** 2).sqrt()).flatten()
    assert torch.all((mean - MU.flatten()).abs() < 0.03 + bias), (mean, bias)
    assert torch.allclose(std, S.flatten(), rtol=0.05), std


@pytest.mark.parametrize("schedule_name", ["linear", "cosine"])
def test_dpmpp_2m_is_more_accurate_than_ddim_at_few_steps(schedule_name):
    """The second-order multistep update must pay off. (On scaled_linear the last jump to clean data, the
    same first-order step for both, dominates the error at 20 steps.)"""
    s, x_T = schedule(schedule_name), torch.randn(1024, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    oracle = gaussian_oracle(s, "epsilon")
    err = {name: (SAMPLERS[name](oracle, x_T, s, 20).std((0, 2, 3)) / S.flatten() - 1).abs().max()
           for name in ("ddim", "dpmpp_2m")}
    assert err["dpmpp_2m"] < 0.35 * err["ddim"] and err["dpmpp_2m"] < 0.05, err


@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_same_seed_same_samples_and_the_callback_sees_every_step(name):
    s = schedule()
    x_T = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(3))
    seen = []
    a = SAMPLERS[name](random_model, x_T, s, 8, generator=torch.Generator().manual_seed(1), callback=seen.append)
    b = SAMPLERS[name](random_model, x_T, s, 8, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.shape == x_T.shape and a.dtype == torch.float32
    assert [d["i"] for d in seen] == list(range(8))
    assert [int(d["t"]) for d in seen] == timestep_spacing(1000, 8).tolist()
    assert torch.equal(seen[-1]["x"], a) and set(seen[0]) == {"i", "t", "x", "x0"}


@pytest.fixture
def host_syncs(monkeypatch) -> HostSyncs:
    return count_host_syncs(monkeypatch)


@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_a_sampler_step_never_waits_for_the_device(name, host_syncs):
    s, x_T = schedule(), torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(3))
    counts = []
    for steps in (2, 10):
        host_syncs.count = 0
        with host_syncs.counting():
            SAMPLERS[name](random_model, x_T, s, steps, generator=torch.Generator().manual_seed(1))
        counts.append(host_syncs.count)
    assert counts[0] == counts[1], host_syncs.where  # the reads are per call (the timesteps), none per step


def steps_one_copy_per_step(schedule, steps, spacing, device):
    """The samplers' timesteps as they were built before: a tensor from the host at every step."""
    ts = timestep_spacing(schedule.timesteps, steps, spacing)
    abar = schedule.alphas_cumprod.double().cpu()
    prev = torch.cat([abar[ts[1:]], torch.ones(1, dtype=torch.float64)])
    for i, t in enumerate(ts.tolist()):
        yield i, torch.tensor(t, device=device), float(abar[t]), float(prev[i])


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_timesteps_put_on_the_device_once_give_the_same_samples_bit_for_bit(name, spacing, monkeypatch):
    s, x_T = schedule(), torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(3))
    now = SAMPLERS[name](random_model, x_T, s, 7, generator=torch.Generator().manual_seed(1), spacing=spacing)
    monkeypatch.setattr(samplers, "_steps", steps_one_copy_per_step)
    before = SAMPLERS[name](random_model, x_T, s, 7, generator=torch.Generator().manual_seed(1), spacing=spacing)
    assert torch.equal(now, before)


def test_ddpm_samples_depend_on_the_seed():
    s, x_T = schedule(), torch.randn(2, 2, 4, 4)
    a = sample_ddpm(random_model, x_T, s, 8, generator=torch.Generator().manual_seed(1))
    b = sample_ddpm(random_model, x_T, s, 8, generator=torch.Generator().manual_seed(2))
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("name", ["ddim", "dpmpp_2m"])
def test_deterministic_samplers_ignore_the_generator(name):
    s, x_T = schedule(), torch.randn(2, 2, 4, 4)
    gen = torch.Generator().manual_seed(1)
    state = gen.get_state()
    a = SAMPLERS[name](random_model, x_T, s, 8, generator=gen)  # DDIM's default eta is 0
    assert torch.equal(gen.get_state(), state)  # no noise drawn
    assert torch.equal(a, SAMPLERS[name](random_model, x_T, s, 8, generator=torch.Generator().manual_seed(9)))


def test_ddim_with_eta_one_is_ddpm():
    s, x_T = schedule("linear"), torch.randn(3, 2, 4, 4)
    ddpm = sample_ddpm(random_model, x_T, s, 10, generator=torch.Generator().manual_seed(5))
    ddim = sample_ddim(random_model, x_T, s, 10, eta=1.0, generator=torch.Generator().manual_seed(5))
    assert torch.allclose(ddpm, ddim, atol=1e-5)
    half = sample_ddim(random_model, x_T, s, 10, eta=0.5, generator=torch.Generator().manual_seed(5))
    assert not torch.allclose(half, ddim) and not torch.allclose(half, sample_ddim(random_model, x_T, s, 10))
    with pytest.raises(ValueError, match="eta"):
        sample_ddim(random_model, x_T, s, 10, eta=2.0)


@pytest.mark.parametrize("spacing", SPACINGS)
def test_every_timestep_spacing(spacing):
    for steps in (1, 7, 50, 1000):
        t = timestep_spacing(1000, steps, spacing)
        assert t.shape == (steps,) and t.dtype == torch.long
        assert torch.all(t.diff() < 0) and 0 <= t.min() and t.max() <= 999
    assert timestep_spacing(1000, 1000, spacing).tolist() == list(range(999, -1, -1))
    out = sample_ddim(random_model, torch.zeros(1, 2, 2, 2), schedule(), 5, spacing=spacing)
    assert torch.isfinite(out).all()


def test_spacing_details_and_errors():
    assert timestep_spacing(1000, 4, "trailing").tolist() == [999, 749, 499, 249]
    assert timestep_spacing(1000, 4, "leading").tolist() == [750, 500, 250, 0]
    assert timestep_spacing(1000, 4, "linspace").tolist() == [999, 666, 333, 0]
    for steps in (0, 1001):
        with pytest.raises(ValueError, match="between 1 and the 1000"):
            timestep_spacing(1000, steps)
    with pytest.raises(ValueError, match="allowed: trailing"):
        timestep_spacing(1000, 4, "uniform")  # type: ignore[arg-type]


@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_sample_runs_the_configured_sampler(name):
    s, x_T = schedule(), torch.randn(2, 2, 4, 4)
    cfg = SamplingConfig(sampler=name, steps=6, eta=0.3)
    out = sample(random_model, x_T, s, cfg, prediction="v", generator=torch.Generator().manual_seed(4))
    extra = {"eta": 0.3} if name == "ddim" else {}
    ref = SAMPLERS[name](random_model, x_T, s, 6, prediction="v", generator=torch.Generator().manual_seed(4), **extra)
    assert torch.equal(out, ref)


class CountingModel:
    """A class-conditional stand-in network that records the batch of every call."""

    def __init__(self):
        self.calls: list[torch.Tensor] = []

    def __call__(self, x, t, y):
        self.calls.append(y.clone() if y is not None else None)
        label = (y if y is not None else torch.full((x.shape[0],), 9)).float().view(-1, 1, 1, 1)
        return x * 0.1 + label


def test_classifier_free_guidance():
    x, t, y = torch.randn(2, 2, 4, 4), torch.tensor([500, 500]), torch.tensor([1, 2])
    model = CountingModel()
    out = guided(model, y, 3.0, null_label=5)(x, t)
    assert len(model.calls) == 1 and model.calls[0].tolist() == [1, 2, 5, 5]  # one batched pass
    cond, uncond = model(x, t, y), model(x, t, torch.tensor([5, 5]))
    assert torch.allclose(out, uncond + 3.0 * (cond - uncond))

    model = CountingModel()
    assert torch.equal(guided(model, y, 1.0, null_label=5)(x, t), model(x, t, y))
    assert [c.tolist() for c in model.calls] == [[1, 2]] * 2  # guidance 1: no extra pass
    model = CountingModel()
    assert torch.equal(guided(model, y, 0.0, null_label=5)(x, t), model(x, t, torch.tensor([5, 5])))
    assert len(model.calls) == 2 and model.calls[0].tolist() == [5, 5]  # guidance 0: the unconditional pass only
    model = CountingModel()
    guided(model, None, 3.0, null_label=None)(x, t)
    assert model.calls == [None]  # no labels: the plain model
    with pytest.raises(ValueError, match="null label"):
        guided(model, y, 3.0, null_label=None)


def test_guided_unet_drives_a_sampler():
    from ldmflow.config.diffusion import UNET_PRESETS, UNetConfig
    from ldmflow.models.unet import UNet

    unet = UNet(UNetConfig(**{**UNET_PRESETS["demo_tiny"], "base_channels": 8, "head_channels": 8}), 4, 3).eval()
    denoise = guided(unet, torch.tensor([0, 2]), 2.0, unet.null_label)
    out = sample_ddim(denoise, torch.randn(2, 4, 8, 8), schedule(), 3)
    assert out.shape == (2, 4, 8, 8) and torch.isfinite(out).all()


def test_schedulers_and_samplers_never_import_models():
    models = ("ldmflow.models.unet", "ldmflow.models.autoencoder", "ldmflow.models.controlnet")
    code = ("import sys, ldmflow.diffusion.samplers, ldmflow.diffusion.schedules; "
            f"print(sorted(set(sys.modules) & set({models})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
