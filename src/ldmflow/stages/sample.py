"""``ldmflow sample``: samples of a trained diffusion checkpoint, as decoded PNGs, a grid image and
``samples.zarr`` (the output folder's rules: :mod:`ldmflow.samples`)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch

from ldmflow import __version__
from ldmflow.artifacts import file_sha256
from ldmflow.checkpoints import load_diffusion, verified_autoencoder
from ldmflow.config.diffusion import SamplingConfig
from ldmflow.config.schema import from_dict
from ldmflow.devices import get_device
from ldmflow.diffusion.generate import decode_latents, generate, sampling_steps, seeded_noise
from ldmflow.diffusion.schedules import NoiseSchedule
from ldmflow.errors import SamplingError
from ldmflow.metadata import SamplesAttrs
from ldmflow.progress import progress_bar
from ldmflow.samples import check_request, prepare_out, recorded_guidance, resolve_class, save_data_values, save_samples

log = logging.getLogger(__name__)


def cycled_labels(n: int, fixed: int | None, num_classes: int | None) -> torch.Tensor | None:
    """Class ids (N,): ``fixed`` for every sample, else the classes in turn; None for an unconditional model."""
    if not num_classes:
        return None
    return torch.full((n,), fixed, dtype=torch.long) if fixed is not None else torch.arange(n) % num_classes


def sample_checkpoint(checkpoint: str | Path, n: int, out: str | Path, *, class_id: str | int | None = None,
                      guidance: float | None = None, sampler: str | None = None, steps: int | None = None,
                      seed: int = 42, device: str | None = None, batch_size: int = 64,
                      data_values: bool = False) -> dict:
    """Generate N samples into OUT: ``sample_NNNNN.png``, ``grid.png``, ``samples.zarr``; same seed, same images.

    Without ``class_id`` a class-conditional model cycles through the classes (sample i has class i mod K).
    With ``data_values`` the samples are also written in the data's own bit depth and channels into
    ``OUT/data/`` (see :func:`ldmflow.samples.save_data_values`): e.g. 16-bit PNGs for 16-bit microscopy.
    """
    if n < 1:
        raise SamplingError(f"--n {n}: allowed: 1 or more samples")
    dev = get_device(device)
    loaded = load_diffusion(checkpoint, dev)
    cfg, meta = loaded.config, loaded.meta
    sampling = from_dict(SamplingConfig, {**vars(cfg.sampling), **{k: v for k, v in
                                          {"sampler": sampler, "steps": steps}.items() if v is not None}})
    check_request(n, batch_size, sampling, cfg.diffusion.timesteps, meta.num_classes, guidance)
    if guidance is not None:
        sampling.guidance = guidance
    decoder = verified_autoencoder(meta.latents, dev).model
    labels = cycled_labels(n, resolve_class(class_id, meta.latents.classes, meta.num_classes), meta.num_classes)
    out = prepare_out(out)
    start = time.monotonic()
    noise, gen = seeded_noise(n, meta.latents.latent_shape, seed=seed, device=dev)
    with progress_bar(sampling_steps(n, batch_size, sampling), f"sampling {n}", "step") as bar:
        z = generate(loaded.model, NoiseSchedule.from_config(cfg.diffusion).to(dev), noise, labels=labels,
                     sampling=sampling, prediction=cfg.diffusion.prediction, generator=gen, batch_size=batch_size,
                     callback=lambda _: bar.update())
    latents, pixels = decode_latents(decoder, z, meta.latents.scale_factor, batch_size=batch_size)
    attrs = SamplesAttrs(checkpoint=str(checkpoint), checkpoint_sha256=file_sha256(checkpoint),
                         autoencoder_checkpoint=meta.latents.autoencoder_checkpoint,
                         autoencoder_sha256=meta.latents.autoencoder_sha256, sampler=sampling.sampler,
                         steps=sampling.steps, eta=sampling.eta, guidance=recorded_guidance(sampling, meta.num_classes),
                         seed=seed, classes=meta.latents.classes, ldmflow_version=__version__)
    save_samples(out, pixels, latents, labels.numpy() if labels is not None else np.full(n, -1), attrs)
    if data_values:
        save_data_values(out, latents, decoder, meta.latents.intensity, batch_size)
    seconds = time.monotonic() - start
    log.info("wrote %d samples to %s in %.1f s (%s, %d steps, guidance %s)", n, out, seconds, sampling.sampler,
             sampling.steps, attrs.guidance)
    return {"n": n, "out": str(out), "seconds": seconds, **attrs.to_dict()}
