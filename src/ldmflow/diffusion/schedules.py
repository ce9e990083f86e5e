"""Noise schedules, the forward process, prediction-target conversions and the diffusion loss.

Pure tensor code, no models. Notation (Ho et al. 2020; Kingma et al. 2021; Salimans & Ho 2022): timesteps
t = 0 .. T-1 index ``alphas_cumprod`` abar_t = prod_{i<=t} (1 - beta_i); alpha_t = sqrt(abar_t), sigma_t =
sqrt(1 - abar_t), so alpha_t^2 + sigma_t^2 = 1 and

    x_t = alpha_t x0 + sigma_t eps,     v = alpha_t eps - sigma_t x0,     SNR(t) = alpha_t^2 / sigma_t^2.

A network predicts either eps (``prediction="epsilon"``) or v (``prediction="v"``); every conversion below
takes that choice as an argument, so a training loop and the samplers need no other branch on it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import torch
import torch.nn.functional as F

from ldmflow.config.diffusion import DEFAULT_BETAS, NoiseConfig

Schedule = Literal["linear", "scaled_linear", "cosine"]
Prediction = Literal["epsilon", "v"]

COSINE_OFFSET = 0.008  # s in Nichol & Dhariwal (2021), eq. 17: keeps beta_0 from being vanishingly small
MAX_BETA = 0.999  # Nichol & Dhariwal clip betas here, so the last step does not divide by alpha_T ~ 0


def make_betas(
    schedule: Schedule, timesteps: int, beta_start: float | None = None, beta_end: float | None = None,
) -> torch.Tensor:
    """The betas (T,) of a noise schedule, computed in float64.

    ``linear``: evenly spaced from beta_start to beta_end (DDPM: 1e-4 .. 0.02). ``scaled_linear``: evenly
    spaced in sqrt(beta) (latent diffusion: 0.00085 .. 0.012). ``cosine``: abar_t = f(t + 1) / f(0) with
    f(u) = cos^2((u / T + s) / (1 + s) * pi / 2), betas clipped at 0.999 (Nichol & Dhariwal 2021); it takes
    no beta_start / beta_end.
    """
    if timesteps < 2:
        raise ValueError(f"timesteps must be >= 2, got {timesteps}")
    if schedule == "cosine":
        if beta_start is not None or beta_end is not None:
            raise ValueError("beta_start and beta_end apply to the linear and scaled_linear schedules only, "
                             "not to cosine; leave them null")
        u = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
        f = torch.cos((u + COSINE_OFFSET) / (1 + COSINE_OFFSET) * math.pi / 2) ** 2  # (T + 1,)
        return (1 - f[1:] / f[:-1]).clamp(max=MAX_BETA)
    if schedule not in DEFAULT_BETAS:
        raise ValueError(f"unknown noise schedule {schedule!r}; allowed: linear, scaled_linear, cosine")
    start = DEFAULT_BETAS[schedule][0] if beta_start is None else beta_start
    end = DEFAULT_BETAS[schedule][1] if beta_end is None else beta_end
    if not 0 < start <= end < 1:
        raise ValueError(f"betas must satisfy 0 < beta_start <= beta_end < 1, got {start} and {end}")
    if schedule == "linear":
        return torch.linspace(start, end, timesteps, dtype=torch.float64)
    return torch.linspace(start**0.5, end**0.5, timesteps, dtype=torch.float64) ** 2


def _bcast(values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """values[t], shaped (N, 1, ..., 1) to broadcast against ``like`` (N, ...)."""
    out = values.to(t.device)[t.long()]
    return out.reshape(out.shape + (1,) * (like.ndim - out.ndim))


@dataclasses.dataclass(frozen=True)
class NoiseSchedule:
    """A discrete variance-preserving noise schedule: abar_t for t = 0 .. T-1 and what follows from it.

    The tensors are float32 (computed in float64) on one device; call :meth:`to` once so that indexing
    with timesteps on the training device copies nothing. Timesteps ``t`` are integer tensors (N,).
    """

    betas: torch.Tensor  # (T,)
    alphas_cumprod: torch.Tensor  # (T,) abar_t
    alphas: torch.Tensor  # (T,) alpha_t = sqrt(abar_t), the signal scale
    sigmas: torch.Tensor  # (T,) sigma_t = sqrt(1 - abar_t), the noise scale

    @classmethod
    def from_betas(cls, betas: torch.Tensor) -> NoiseSchedule:
        betas = betas.double()
        abar = torch.cumprod(1 - betas, dim=0)
        return cls(betas.float(), abar.float(), abar.sqrt().float(), (1 - abar).sqrt().float())

    @classmethod
    def from_config(cls, cfg: NoiseConfig) -> NoiseSchedule:
        return cls.from_betas(make_betas(cfg.schedule, cfg.timesteps, cfg.beta_start, cfg.beta_end))

    @property
    def timesteps(self) -> int:
        """T, the number of trained timesteps."""
        return self.betas.shape[0]

    def to(self, device: torch.device | str) -> NoiseSchedule:
        return NoiseSchedule(*(getattr(self, f.name).to(device) for f in dataclasses.fields(self)))

    # ---------------------------------------------------------------------------------------------
    # Forward process and conversions; x (N, ...), t (N,) integer timesteps
    # ---------------------------------------------------------------------------------------------

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """Signal-to-noise ratio abar_t / (1 - abar_t), (N,)."""
        abar = self.alphas_cumprod.to(t.device)[t.long()]
        return abar / (1 - abar)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = alpha_t x0 + sigma_t eps, sampled from q(x_t | x0) (Ho et al. 2020, eq. 4)."""
        return _bcast(self.alphas, t, x0) * x0 + _bcast(self.sigmas, t, x0) * noise

    def v_target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """v = alpha_t eps - sigma_t x0 (Salimans & Ho 2022)."""
        return _bcast(self.alphas, t, x0) * noise - _bcast(self.sigmas, t, x0) * x0

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, prediction: Prediction) -> torch.Tensor:
        """What the network should output: the noise itself, or v."""
        _check_prediction(prediction)
        return noise if prediction == "epsilon" else self.v_target(x0, noise, t)

    def predict_x0(
        self, model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, prediction: Prediction,
    ) -> torch.Tensor:
        """The clean sample implied by a model output: (x_t - sigma eps) / alpha, or alpha x_t - sigma v."""
        _check_prediction(prediction)
        a, s = _bcast(self.alphas, t, x_t), _bcast(self.sigmas, t, x_t)
        if prediction == "epsilon":
            return (x_t - s * model_output) / a
        return a * x_t - s * model_output

    def predict_eps(
        self, model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, prediction: Prediction,
    ) -> torch.Tensor:
        """The noise implied by a model output: itself, or alpha v + sigma x_t."""
        _check_prediction(prediction)
        return model_output if prediction == "epsilon" else self.v_to_eps(model_output, x_t, t)

    def eps_to_v(self, eps: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """v from the noise and x_t: (eps - sigma x_t) / alpha."""
        return (eps - _bcast(self.sigmas, t, x_t) * x_t) / _bcast(self.alphas, t, x_t)

    def v_to_eps(self, v: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The noise from v and x_t: alpha v + sigma x_t."""
        return _bcast(self.alphas, t, x_t) * v + _bcast(self.sigmas, t, x_t) * x_t


def _check_prediction(prediction: str) -> None:
    if prediction not in ("epsilon", "v"):
        raise ValueError(f"unknown prediction {prediction!r}; allowed: epsilon, v")


def min_snr_weights(snr: torch.Tensor, gamma: float, prediction: Prediction) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023), (N,) -> (N,).

    They make the weighted loss equal min(SNR, gamma) * ||x0_hat - x0||^2 whatever the network predicts:
    an eps error is sqrt(SNR) times the x0 error and a v error sqrt(SNR + 1) times, so the weights are
    min(SNR, gamma) / SNR for epsilon and min(SNR, gamma) / (SNR + 1) for v.
    """
    _check_prediction(prediction)
    if gamma <= 0:
        raise ValueError(f"min_snr_gamma must be > 0, got {gamma}")
    clipped = snr.clamp(max=gamma)
    return clipped / snr if prediction == "epsilon" else clipped / (snr + 1)


def diffusion_loss(
    model_output: torch.Tensor,
    x0: torch.Tensor,
    noise: torch.Tensor,
    t: torch.Tensor,
    schedule: NoiseSchedule,
    prediction: Prediction,
    min_snr_gamma: float | None = None,
) -> torch.Tensor:
    """Per-sample diffusion loss (N,): the mean squared error to the target, optionally min-SNR weighted.

    ``model_output`` is the network's output on ``schedule.add_noise(x0, noise, t)``; the loss is computed
    in float32 whatever the autocast dtype. Average it (or weight it further) in the training loop.
    """
    target = schedule.target(x0.float(), noise.float(), t, prediction)
    loss = F.mse_loss(model_output.float(), target, reduction="none").flatten(1).mean(1)  # (N,)
    if min_snr_gamma is not None:
        loss = loss * min_snr_weights(schedule.snr(t), min_snr_gamma, prediction)
    return loss


class DiffusionLoss:
    """The training loss of a denoiser as one call: draw t and the noise, noise x0, predict, average
    :func:`diffusion_loss` (what ``ldmflow.build_loss`` returns for a UNet or a ControlNet)."""

    def __init__(self, noise: NoiseConfig, min_snr_gamma: float | None = None):
        self.schedule = NoiseSchedule.from_config(noise)
        self.prediction = noise.prediction
        self.min_snr_gamma = min_snr_gamma

    def __call__(self, model, x0: torch.Tensor, labels: torch.Tensor | None = None, *,
                 generator: torch.Generator | None = None, **model_kwargs) -> torch.Tensor:
        """Mean loss of ``model(x_t, t, labels, **model_kwargs)`` on latents x0 (N, C, h, w)."""
        schedule = self.schedule.to(x0.device)
        t = torch.randint(0, schedule.timesteps, (x0.shape[0],), generator=generator, device=x0.device)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device)
        out = model(schedule.add_noise(x0, noise, t), t, labels, **model_kwargs)
        return diffusion_loss(out, x0, noise, t, schedule, self.prediction, self.min_snr_gamma).mean()
