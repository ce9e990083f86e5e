"""Sampling from a ControlNet checkpoint with one control: decoded PNGs, a grid, ``samples.zarr``.

The control is a row of the latent store the ControlNet was trained on (its index; the control is made
as in training, and the row's class is the default class) or an image file of the autoencoder's image
size: a mask PNG of class ids (signal ``mask``), an image whose Sobel edges are taken (``edges``) or
the control image itself (``image``).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch

from ldmflow import __version__
from ldmflow.artifacts import file_sha256
from ldmflow.checkpoints import Loaded, load_controlnet, verified_autoencoder
from ldmflow.config.diffusion import SamplingConfig
from ldmflow.config.schema import to_dict, validate
from ldmflow.control_inputs import load_controls
from ldmflow.data.controls import control_preview
from ldmflow.devices import get_device
from ldmflow.diffusion.generate import decode_latents, generate, sampling_steps, seeded_noise
from ldmflow.diffusion.schedules import NoiseSchedule
from ldmflow.errors import SamplingError
from ldmflow.metadata import SamplesAttrs
from ldmflow.models.controlnet import Scale
from ldmflow.progress import progress_bar
from ldmflow.samples import check_request, prepare_out, recorded_guidance, resolve_class, save_data_values, save_samples
from ldmflow.viz import save_png

log = logging.getLogger(__name__)


def _sampling(loaded: Loaded, n: int, batch_size: int, sampler: str | None, steps: int | None,
              guidance: float | None) -> SamplingConfig:
    """The experiment's sampling settings with the command line's sampler, steps and guidance, checked."""
    sampling = loaded.config.sampling.base()
    for key, value in {"sampler": sampler, "steps": steps}.items():
        if value is not None:
            setattr(sampling, key, value)
    check_request(n, batch_size, sampling, loaded.base_config.diffusion.timesteps, loaded.meta.num_classes, guidance)
    if guidance is not None:
        sampling.guidance = guidance
    validate(to_dict(sampling), SamplingConfig, "--sampler/--steps/--guidance")
    return sampling


def _labels(n: int, fixed: int | None, row_labels: list[int | None], num_classes: int | None) -> torch.Tensor | None:
    """Class ids (N,): ``fixed``, else each control row's class, else the classes in turn."""
    if not num_classes:
        return None
    return torch.tensor([fixed if fixed is not None else (lab if lab is not None else i % num_classes)
                         for i, lab in enumerate(row_labels)], dtype=torch.long)


def sample_controlnet(checkpoint: str | Path, control: str | int, n: int, out: str | Path, *,
                      scale: Scale | None = None, class_id: str | int | None = None, guidance: float | None = None,
                      sampler: str | None = None, steps: int | None = None, seed: int = 42, device: str | None = None,
                      batch_size: int = 64, data_values: bool = False) -> dict:
    """Generate N samples into OUT: ``sample_NNNNN.png``, ``grid.png`` (each control beside its sample),
    ``samples.zarr``; same seed, same images.

    ``control``: one control for all samples (a store row index or an image file), or a split name (each
    sample takes the next row of that split). The class is ``class_id``, else each control row's class,
    else the classes in turn (class-conditional models only). ``scale`` (one number or one per UNet level)
    defaults to the experiment's sampling.scale. ``data_values``: also write the samples in the data's own
    bit depth and channels into ``OUT/data/`` (:func:`ldmflow.samples.save_data_values`).
    """
    if n < 1:
        raise SamplingError(f"--n {n}: allowed: 1 or more samples")
    dev = get_device(device)
    loaded = load_controlnet(checkpoint, dev)
    cfg, meta, base_cfg = loaded.config, loaded.meta, loaded.base_config
    sampling = _sampling(loaded, n, batch_size, sampler, steps, guidance)
    scale = cfg.sampling.scale if scale is None else scale
    controls, row_labels, described = load_controls(control, n, cfg, meta)
    try:
        loaded.model.level_scales(scale)
    except ValueError as exc:
        raise SamplingError(f"--scale: {exc}") from None
    decoder = verified_autoencoder(meta.latents, dev).model
    labels = _labels(n, resolve_class(class_id, meta.latents.classes, meta.num_classes), row_labels, meta.num_classes)
    out = prepare_out(out)
    start = time.monotonic()
    noise, gen = seeded_noise(n, meta.latents.latent_shape, seed=seed, device=dev)
    with progress_bar(sampling_steps(n, batch_size, sampling), f"sampling {n}", "step") as bar:
        z = generate(loaded.model, NoiseSchedule.from_config(base_cfg.diffusion).to(dev), noise, labels=labels,
                     controls=controls, control_scale=scale, sampling=sampling,
                     prediction=base_cfg.diffusion.prediction, generator=gen, batch_size=batch_size,
                     callback=lambda _: bar.update())
    latents, pixels = decode_latents(decoder, z, meta.latents.scale_factor, batch_size=batch_size)
    previews = control_preview(cfg.control.signal, controls.cpu())  # (N, H, W, 3)
    save_png(previews[0], out / "control.png")
    attrs = SamplesAttrs(checkpoint=str(checkpoint), checkpoint_sha256=file_sha256(checkpoint),
                         autoencoder_checkpoint=meta.latents.autoencoder_checkpoint,
                         autoencoder_sha256=meta.latents.autoencoder_sha256, sampler=sampling.sampler,
                         steps=sampling.steps, eta=sampling.eta, guidance=recorded_guidance(sampling, meta.num_classes),
                         seed=seed, classes=meta.latents.classes, ldmflow_version=__version__,
                         controlnet={"fusion": cfg.model.fusion, "signal": cfg.control.signal, "control": described,
                                     "scale": scale})
    save_samples(out, pixels, latents, labels.numpy() if labels is not None else np.full(n, -1), attrs,
                 controls=previews)
    if data_values:
        save_data_values(out, latents, decoder, meta.latents.intensity, batch_size)
    seconds = time.monotonic() - start
    log.info("wrote %d samples under control %s to %s in %.1f s (%s, %d steps, guidance %s, scale %s)", n, described,
             out, seconds, sampling.sampler, sampling.steps, attrs.guidance, scale)
    return {"n": n, "out": str(out), "seconds": seconds, **attrs.to_dict()}
