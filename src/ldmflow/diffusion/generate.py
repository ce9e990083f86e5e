"""Generation: sample latents with a denoiser, then decode them with the autoencoder."""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable

import numpy as np
import torch

from ldmflow.config.diffusion import DiffusionExperiment, SamplingConfig
from ldmflow.diffusion.samplers import guided, sample
from ldmflow.diffusion.schedules import NoiseSchedule
from ldmflow.errors import SamplingError
from ldmflow.progress import progress_bar
from ldmflow.viz import to_pixels

log = logging.getLogger(__name__)


@torch.no_grad()
def generate_latents(model, cfg: DiffusionExperiment, schedule: NoiseSchedule, latent_shape, n: int,
                     labels: torch.Tensor | None, *, seed: int, device, guidance: float | None = None,
                     sampling=None) -> torch.Tensor:
    """Sample n latents (N, C, h, w) in the scaled latent space with the configured sampler."""
    sampling = sampling or cfg.sampling
    if guidance is not None:
        sampling = dataclasses.replace(sampling, guidance=guidance)
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn((n, *latent_shape), generator=gen, device=device)
    return denoise_batch(model, x, labels, schedule, sampling, cfg.diffusion.prediction, gen)


def denoise_batch(model, x: torch.Tensor, labels: torch.Tensor | None, schedule: NoiseSchedule,
                  sampling: SamplingConfig, prediction: str, generator: torch.Generator,
                  callback: Callable[[dict], None] | None = None) -> torch.Tensor:
    """Noise x (N, C, h, w) to latents in the scaled latent space: classifier-free guidance, then the sampler."""
    denoise = guided(model, labels, sampling.guidance, model.null_label if labels is not None else None)
    return sample(denoise, x, schedule, sampling, prediction=prediction, generator=generator, callback=callback)


@torch.no_grad()
def generate(model, cfg, schedule, decoder, scale_factor, latent_shape, num_classes, *, seed, device) -> torch.Tensor:
    """The epoch grid: ``per_class`` samples for each class (or one row unconditional), decoded (N, I, H, W)."""
    per_row = cfg.sampling.per_class
    labels = None
    n = per_row
    if num_classes:
        labels = torch.arange(num_classes, device=device).repeat_interleave(per_row)
        n = len(labels)
    z = generate_latents(model, cfg, schedule, latent_shape, n, labels, seed=seed, device=device)
    rgb, _ = decoder.decode(z / scale_factor)
    return rgb


@torch.no_grad()
def generate_decoded(model_for, n: int, labels: torch.Tensor | None, extra: dict, schedule: NoiseSchedule,
                     sampling: SamplingConfig, prediction: str, decoder, *, seed: int, device,
                     batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Sample N latents batch by batch from one seeded generator and decode them.

    ``model_for(lo, hi)`` is the conditional model for samples lo..hi (a UNet, or a ControlNet bound to
    those samples' controls). Returns latents (N, C, h, w) in the autoencoder's (unscaled) space and
    images (N, H, W, I) uint8 with the autoencoder's image channels I.
    """
    shape = (extra["latent_channels"], extra["latent_size"], extra["latent_size"])
    gen = torch.Generator(device=device).manual_seed(seed)
    latents, images = [], []
    batches = math.ceil(n / batch_size)
    bar = progress_bar(batches * sampling.steps, f"sampling {n}", "step")
    for b in range(batches):
        lo, hi = b * batch_size, min(n, (b + 1) * batch_size)
        model = model_for(lo, hi)
        y = labels[lo:hi].to(device) if labels is not None else None
        x = torch.randn((hi - lo, *shape), generator=gen, device=device)
        z = denoise_batch(model, x, y, schedule, sampling, prediction, gen,
                          callback=lambda _: bar.update()) / extra["scale_factor"]
        if not torch.isfinite(z).all():  # NaN or inf would decode to black images that look like results
            raise SamplingError(f"sampling produced non-finite latents (guidance {sampling.guidance:g}, "
                                f"{sampling.sampler}, {sampling.steps} steps); try a smaller --guidance")
        rgb, _ = decoder.decode(z)
        latents.append(z.float().cpu().numpy())
        images.append(to_pixels(rgb))
    bar.close()
    return np.concatenate(latents), np.concatenate(images)
