"""Generation: one function from noise to latents for every model (UNet or ControlNet), and the decoding helper.

:func:`generate` is the samplers' k-diffusion shape one floor up: ``generate(model, schedule, noise, *,
labels, controls, ...)``. A ControlNet takes its controls through the model call, ``model(x, t, y,
control=...)``; ``generate`` slices them per batch and binds them (``model.bind``), so callers never wrap a
model. Decoding is the autoencoder's business: :func:`decode_latents` runs after sampling.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ldmflow.config.diffusion import SamplingConfig
from ldmflow.diffusion.samplers import guided, sample
from ldmflow.diffusion.schedules import NoiseSchedule
from ldmflow.errors import SamplingError
from ldmflow.viz import to_pixels


def seeded_noise(n: int, shape: tuple[int, ...], *, seed: int, device) -> tuple[torch.Tensor, torch.Generator]:
    """N draws of standard noise (N, *shape) and the generator that drew them (the sampler goes on with it):
    same seed, same images."""
    gen = torch.Generator(device=device).manual_seed(seed)
    return torch.randn((n, *shape), generator=gen, device=device), gen


@torch.no_grad()
def generate(model: Any, schedule: NoiseSchedule, noise: torch.Tensor, *, labels: torch.Tensor | None = None,
             controls: torch.Tensor | None = None, control_scale: Any = 1.0, sampling: SamplingConfig,
             prediction: str = "epsilon", generator: torch.Generator | None = None, batch_size: int | None = None,
             callback: Callable[[dict], None] | None = None) -> torch.Tensor:
    """Latents (N, C, h, w) in the scaled latent space from noise (N, C, h, w), batch by batch.

    ``model(x, t, y)`` is a UNet, or a ControlNet with ``controls`` (N, K, H, W) (and its conditioning
    ``control_scale``); ``labels`` (N,) class ids for a class-conditional model, guided as ``sampling.guidance``
    says (Ho & Salimans 2022); ``sampling`` names the sampler and its steps. ``generator`` drives the
    stochastic samplers; ``batch_size`` (default: all N at once) bounds memory.
    """
    n = len(noise)
    batch_size = batch_size or n
    out = []
    for lo in range(0, n, batch_size):
        hi = min(n, lo + batch_size)
        net = model if controls is None else model.bind(controls[lo:hi].to(noise.device), control_scale)
        y = labels[lo:hi].to(noise.device) if labels is not None else None
        denoise = guided(net, y, sampling.guidance, net.null_label if y is not None else None)
        out.append(sample(denoise, noise[lo:hi], schedule, sampling, prediction=prediction, generator=generator,
                          callback=callback))
    return torch.cat(out)


# Images per autoencoder call when decoding: a 256 px decoder holds a few hundred MB of activations per image,
# so a grid of 64-80 images in one call would take GBs of memory for no speed-up.
DECODE_CHUNK = 16


def decode_autocast(device: torch.device):
    """Autocast for decoding on CUDA (bf16 from compute capability 8.0, fp16 below); fp32 elsewhere."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    bf16 = torch.cuda.get_device_capability(device)[0] >= 8
    return torch.autocast("cuda", dtype=torch.bfloat16 if bf16 else torch.float16)


@torch.no_grad()
def decode_chunked(decoder, z: torch.Tensor, *, with_seg: bool = False, chunk: int = DECODE_CHUNK,
                   autocast: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Unscaled latents (N, C, h, w) -> images (N, I, H, W) float32 and segmentation logits (N, K, H, W) float32
    (None without a head or ``with_seg``), ``chunk`` images per decoder call; under autocast on CUDA when
    ``autocast`` (epoch grids and fidelity scores, not the images a run delivers)."""
    images, segs = [], []
    with decode_autocast(z.device) if autocast else contextlib.nullcontext():
        for lo in range(0, len(z), chunk):
            rgb, seg = decoder.decode(z[lo:lo + chunk], with_seg=with_seg)
            images.append(rgb.float())
            segs.append(None if seg is None else seg.float())
    return torch.cat(images), (None if segs[0] is None else torch.cat(segs))


@torch.no_grad()
def decode_latents(decoder, latents: torch.Tensor, scale_factor: float, *,
                   batch_size: int = DECODE_CHUNK) -> tuple[np.ndarray, np.ndarray]:
    """Scaled latents (N, C, h, w) -> latents in the autoencoder's (unscaled) space (N, C, h, w) float32 and
    images (N, H, W, I) uint8 with the autoencoder's image channels I; at most ``batch_size`` and
    :data:`DECODE_CHUNK` images per decoder call, without autocast (the images a run delivers: samples, synthetic
    sets, evaluation)."""
    z = latents / scale_factor
    if not torch.isfinite(z).all():  # NaN or inf would decode to black images that look like results
        raise SamplingError("sampling produced non-finite latents; try a smaller --guidance, another sampler or "
                            "more steps")
    images, _ = decode_chunked(decoder, z, chunk=min(batch_size, DECODE_CHUNK), autocast=False)
    return z.float().cpu().numpy(), to_pixels(images)


def sampling_steps(n: int, batch_size: int, sampling: SamplingConfig) -> int:
    """The sampler steps :func:`generate` takes for N samples (a progress bar's total)."""
    return math.ceil(n / batch_size) * sampling.steps
