"""Samplers of the reverse diffusion process, and classifier-free guidance.

Pure functions, no models: a sampler gets ``denoise(x, t) -> model output``, a callable taking latents
(N, C, h, w) and integer timesteps (N,) and returning the network's prediction (the noise or v, as
``prediction`` says). Every sampler has the signature

    sample_x(denoise, x, schedule, steps, *, prediction="epsilon", generator=None, callback=None,
             spacing="trailing", **sampler_specific) -> x0

where ``x`` is the starting noise x_T (N, C, h, w) ~ N(0, I), ``steps`` the number of network evaluations
(one per timestep from :func:`timestep_spacing`), and ``callback`` is called after each step with a dict
``{"i", "t", "x", "x0"}`` (k-diffusion style). The result is float32. Noise comes only from ``generator``
(the global RNG when None), so a seeded generator gives the same samples on CPU.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch

from ldmflow.config.diffusion import SamplingConfig
from ldmflow.diffusion.schedules import NoiseSchedule, Prediction

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Spacing = Literal["trailing", "leading", "linspace"]


def timestep_spacing(num_train_timesteps: int, steps: int, spacing: Spacing = "trailing") -> torch.Tensor:
    """Decreasing trained timesteps (steps,) at which a sampler evaluates the network.

    ``trailing`` (the default) starts at T-1, where x_T ~ N(0, I) is closest to the truth, and steps by
    T / steps (Lin et al. 2024, "Common diffusion noise schedules and sample steps are flawed");
    ``leading`` is DDIM's 0, T/steps, ... reversed; ``linspace`` rounds steps evenly spaced points from
    T-1 down to 0. The last two end at t = 0, which makes DPM-Solver++'s last step in log-SNR far longer
    than the one before, so its second-order extrapolation overshoots the variance at few steps; keep
    ``trailing`` for it.
    """
    if not 1 <= steps <= num_train_timesteps:
        raise ValueError(f"sampling steps must be between 1 and the {num_train_timesteps} trained timesteps, "
                         f"got {steps}")
    T = num_train_timesteps
    if spacing == "trailing":
        t = torch.round(T - torch.arange(steps, dtype=torch.float64) * (T / steps)) - 1
    elif spacing == "leading":
        t = torch.arange(steps, dtype=torch.float64).flip(0) * (T // steps)
    elif spacing == "linspace":
        t = torch.linspace(T - 1, 0, steps, dtype=torch.float64).round()
    else:
        raise ValueError(f"unknown timestep spacing {spacing!r}; allowed: trailing, leading, linspace")
    return t.long()


def _steps(schedule: NoiseSchedule, steps: int, spacing: Spacing, device: torch.device):
    """Pairs (t, abar_t, abar_prev) over the spaced timesteps; after the last one, abar_prev = 1 (clean data).

    The timesteps go to the device and the coefficients to Python floats once, before the first step: a step
    then never waits on a copy between host and device."""
    ts = timestep_spacing(schedule.timesteps, steps, spacing)
    abar = schedule.alphas_cumprod.double().cpu()
    coefficients = zip(abar[ts].tolist(), abar[ts[1:]].tolist() + [1.0])
    for i, (t, (abar_t, abar_prev)) in enumerate(zip(ts.to(device), coefficients)):
        yield i, t, abar_t, abar_prev


def _model_x0_eps(denoise, x, t, schedule, prediction):
    """Evaluate the network at (x, t) -> x0 estimate and noise estimate, both float32 (N, C, h, w)."""
    tt = t.expand(x.shape[0])
    out = denoise(x, tt).float()
    return schedule.predict_x0(out, x, tt, prediction), schedule.predict_eps(out, x, tt, prediction)


def _noise(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


@torch.no_grad()
def sample_ddpm(denoise: Denoiser, x: torch.Tensor, schedule: NoiseSchedule, steps: int, *,
                prediction: Prediction = "epsilon", generator: torch.Generator | None = None,
                callback: Callable[[dict], None] | None = None, spacing: Spacing = "trailing") -> torch.Tensor:
    """Implements ancestral sampling (Algorithm 2) from Ho et al. (2020), on a respaced set of timesteps."""
    x = x.float()
    for i, t, abar, abar_prev in _steps(schedule, steps, spacing, x.device):
        x0, _ = _model_x0_eps(denoise, x, t, schedule, prediction)
        beta = 1 - abar / abar_prev  # the beta of the respaced step t -> prev
        # Posterior q(x_prev | x_t, x0) (Ho et al. eq. 6-7), with the predicted x0.
        mean = (abar_prev**0.5 * beta / (1 - abar)) * x0 + ((1 - beta) ** 0.5 * (1 - abar_prev) / (1 - abar)) * x
        var = beta * (1 - abar_prev) / (1 - abar)
        x = mean + var**0.5 * _noise(x, generator) if i < steps - 1 else mean
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "x0": x0})
    return x


@torch.no_grad()
def sample_ddim(denoise: Denoiser, x: torch.Tensor, schedule: NoiseSchedule, steps: int, *,
                prediction: Prediction = "epsilon", generator: torch.Generator | None = None,
                callback: Callable[[dict], None] | None = None, spacing: Spacing = "trailing",
                eta: float = 0.0) -> torch.Tensor:
    """Implements the generalised DDIM update (eq. 12) from Song et al. (2021); eta 0 is deterministic."""
    if not 0 <= eta <= 1:
        raise ValueError(f"DDIM eta must be in [0, 1], got {eta}")
    x = x.float()
    for i, t, abar, abar_prev in _steps(schedule, steps, spacing, x.device):
        x0, eps = _model_x0_eps(denoise, x, t, schedule, prediction)
        sigma = eta * ((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)) ** 0.5  # eq. 16
        x = abar_prev**0.5 * x0 + max(1 - abar_prev - sigma**2, 0.0) ** 0.5 * eps
        if sigma > 0:
            x = x + sigma * _noise(x, generator)
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "x0": x0})
    return x


@torch.no_grad()
def sample_dpmpp_2m(denoise: Denoiser, x: torch.Tensor, schedule: NoiseSchedule, steps: int, *,
                    prediction: Prediction = "epsilon", generator: torch.Generator | None = None,
                    callback: Callable[[dict], None] | None = None, spacing: Spacing = "trailing") -> torch.Tensor:
    """Implements DPM-Solver++(2M) (Algorithm 2) from Lu et al. (2022); deterministic, generator unused."""
    x = x.float()
    old_x0, old_h = None, None
    for i, t, abar, abar_prev in _steps(schedule, steps, spacing, x.device):
        x0, _ = _model_x0_eps(denoise, x, t, schedule, prediction)
        if abar_prev >= 1:
            # The last step lands on clean data (sigma 0, lambda infinite): first order, x = x0 (as k-diffusion).
            x = x0
        else:
            alpha_prev, sigma, sigma_prev = abar_prev**0.5, (1 - abar) ** 0.5, (1 - abar_prev) ** 0.5
            # Step size in lambda = log(alpha / sigma) = log(SNR) / 2, which grows as the noise falls.
            h = 0.5 * (math.log(abar_prev / (1 - abar_prev)) - math.log(abar / (1 - abar)))
            d = x0
            if old_x0 is not None:
                r = old_h / h
                d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * old_x0  # second-order multistep correction
            x = (sigma_prev / sigma) * x - alpha_prev * math.expm1(-h) * d
            old_x0, old_h = x0, h
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "x0": x0})
    return x


SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
    "dpmpp_2m": sample_dpmpp_2m,
}


def sample(
    denoise: Denoiser,
    x: torch.Tensor,
    schedule: NoiseSchedule,
    cfg: SamplingConfig,
    *,
    prediction: Prediction = "epsilon",
    generator: torch.Generator | None = None,
    callback: Callable[[dict], None] | None = None,
) -> torch.Tensor:
    """Run the sampler a :class:`SamplingConfig` names, with its steps (and eta, for DDIM), from noise x."""
    if cfg.sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {cfg.sampler!r}; allowed: {', '.join(SAMPLERS)}")
    extra = {"eta": cfg.eta} if cfg.sampler == "ddim" else {}
    return SAMPLERS[cfg.sampler](denoise, x, schedule, cfg.steps, prediction=prediction, generator=generator,
                                 callback=callback, **extra)


def guided(
    model: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor],
    y: torch.Tensor | None,
    guidance: float,
    null_label: int | None,
) -> Denoiser:
    """Classifier-free guidance (Ho & Salimans 2022) as a ``denoise(x, t)`` for the samplers.

    ``model(x, t, y)`` is a class-conditional network (e.g. a UNet), ``y`` (N,) the wanted classes and
    ``null_label`` the id of the unconditional label. The output is uncond + guidance * (cond - uncond),
    from one batched pass over [x; x] with labels [y; null]. Guidance 1 (or no labels) is the plain
    conditional model, one pass; guidance 0 the unconditional model, one pass.
    """
    if guidance < 0:
        raise ValueError(f"guidance must be >= 0, got {guidance}")
    if y is None or guidance == 1:
        return lambda x, t: model(x, t, y)
    if null_label is None:
        raise ValueError("classifier-free guidance needs the null label of a class-conditional model")
    null = torch.full_like(y, null_label)
    if guidance == 0:
        return lambda x, t: model(x, t, null)

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))  # (2N, C, h, w)
        cond, uncond = out.chunk(2)
        return uncond + guidance * (cond - uncond)

    return denoise
