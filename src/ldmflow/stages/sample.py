"""Sampling from a trained diffusion checkpoint: decoded PNGs, a grid image and ``samples.zarr``.

The output folder holds one call's samples: the ``sample_*.png``, ``grid.png``, ``control.png`` and
``samples.zarr`` of an earlier call into the same folder are removed first (other files are left alone), so
a second call with a smaller N leaves no stale samples behind.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import zarr
from PIL import Image

from ldmflow import __version__
from ldmflow.artifacts import (
    file_sha256,
    fsync_tree,
    inference_weights,
    load_checkpoint,
    publish_dir,
    remove_stale_temporaries,
)
from ldmflow.config.diffusion import DiffusionExperiment, NoiseConfig, SamplingConfig
from ldmflow.config.schema import from_dict
from ldmflow.devices import get_device
from ldmflow.diffusion.generate import generate_decoded
from ldmflow.diffusion.schedules import NoiseSchedule
from ldmflow.errors import SamplingError
from ldmflow.models.autoencoder import load_autoencoder
from ldmflow.models.unet import build_unet
from ldmflow.viz import grid, preview, save_png

log = logging.getLogger(__name__)




def load_verified_autoencoder(path: str | Path, sha256: str, device):
    """The autoencoder a checkpoint was trained with, refusing a file whose sha256 changed."""
    path = Path(path)
    if not path.is_file():
        raise SamplingError(f"autoencoder checkpoint {path} (recorded at training time) is missing")
    if file_sha256(path) != sha256:
        raise SamplingError(f"{path} is not the autoencoder the model was trained with (sha256 differs)")
    return load_autoencoder(path, device)[0]


def load_diffusion(checkpoint: str | Path, device) -> tuple[torch.nn.Module, DiffusionExperiment, dict]:
    """Rebuild a diffusion UNet with its inference (EMA) weights from a checkpoint alone."""
    state = load_checkpoint(checkpoint, map_location=device)
    if state.get("stage") != "diffusion":
        raise SamplingError(f"{checkpoint}: a {state.get('stage')} checkpoint, not a diffusion checkpoint")
    cfg = from_dict(DiffusionExperiment, state["config"])
    extra = state["extra"]
    model = build_unet(cfg, extra["latent_channels"], extra["num_classes"])
    model.load_state_dict(inference_weights(state))
    return model.to(device).eval().requires_grad_(False), cfg, extra


def decoder_and_schedule(extra: dict, noise: NoiseConfig, device) -> tuple:
    """What turns a run's noise into images: its autoencoder (sha256-checked) and its noise schedule."""
    decoder = load_verified_autoencoder(extra["autoencoder_checkpoint"], extra["autoencoder_sha256"], device)
    return decoder, NoiseSchedule.from_config(noise).to(device)


def resolve_class(value: str | int | None, classes: list[str] | None, num_classes: int | None) -> int | None:
    if value is None:
        return None
    if not num_classes:
        raise SamplingError("--class given, but the model is unconditional")
    value = str(value)
    if classes and value in classes:
        return classes.index(value)
    if value.isascii() and value.isdigit() and int(value) < num_classes:
        return int(value)
    raise SamplingError(f"unknown class {value!r}; allowed: {', '.join(classes or [])} or 0..{num_classes - 1}")


def check_request(n: int, batch_size: int, sampling: SamplingConfig, timesteps: int, num_classes: int | None,
                  guidance: float | None) -> None:
    """Refuse a sampling request the checkpoint cannot serve as asked, naming the option and what is allowed."""
    if n < 1:
        raise SamplingError(f"--n {n}: allowed: 1 or more samples")
    if batch_size < 1:
        raise SamplingError(f"--batch-size {batch_size}: allowed: 1 or more")
    if not 1 <= sampling.steps <= timesteps:
        raise SamplingError(f"--steps {sampling.steps}: allowed: 1..{timesteps} (the model's trained timesteps)")
    if guidance is not None:
        if not (math.isfinite(guidance) and guidance >= 0):
            raise SamplingError(f"--guidance {guidance}: allowed: a finite number >= 0")
        if not num_classes:
            # the guided denoiser ignores the scale without labels: refuse it rather than record a no-op
            raise SamplingError(f"--guidance {guidance:g}: this checkpoint is unconditional; classifier-free "
                                "guidance needs a class-conditional model")


def recorded_guidance(sampling: SamplingConfig, num_classes: int | None) -> float | None:
    """The guidance scale that was applied: None for an unconditional model (none is)."""
    return sampling.guidance if num_classes else None


def prepare_out(out: str | Path) -> Path:
    """OUT as a folder without the samples of an earlier call (their PNGs, grid, control and store go)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise SamplingError(f"--out {out}: a file; give a folder")
    out.mkdir(parents=True, exist_ok=True)
    earlier = [p for pattern in ("sample_*.png", "grid.png", "control.png") for p in out.glob(pattern)]
    for path in earlier:
        path.unlink()
    if (out / "samples.zarr").exists():
        earlier.append(out / "samples.zarr")
        shutil.rmtree(out / "samples.zarr")
    if earlier:
        log.warning("%s: removed %d file(s) of an earlier sampling call", out, len(earlier))
    return out


def write_samples_store(path: Path, latents: np.ndarray, labels: np.ndarray, attrs: dict) -> None:
    """``samples.zarr``: latents (N, C, h, w) float32 in the autoencoder's (unscaled) space, labels (N,)."""
    remove_stale_temporaries(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    group = zarr.open_group(str(tmp), mode="w")
    group.create_array("latents", data=latents.astype(np.float32), chunks=(min(len(latents), 256), *latents.shape[1:]))
    group.create_array("labels", data=labels.astype(np.int64))
    group.attrs.update(attrs)
    fsync_tree(tmp)
    publish_dir(tmp, path)  # an older store is replaced only once the new one is whole


def save_samples(out: Path, pixels: np.ndarray, latents: np.ndarray, labels: np.ndarray, attrs: dict,
                 controls: np.ndarray | None = None) -> None:
    """Write ``sample_NNNNN.png``, ``grid.png`` and ``samples.zarr`` for N decoded samples.

    pixels (N, H, W, I) uint8 (I = 1: grayscale PNGs, mode L; 3: RGB; any other channel count: the
    :func:`ldmflow.viz.preview` of the first three channels, all channels stay in ``samples.zarr``'s latents);
    latents (N, C, h, w) in the autoencoder's space; labels (N,) (-1: none).
    With ``controls`` (N, H, W, 3) uint8 previews, the grid pairs each control with its sample.
    """
    n = len(pixels)
    for i, img in enumerate(pixels if pixels.shape[-1] in (1, 3) else preview(pixels)):
        save_png(img, out / f"sample_{i:05d}.png")
    pixels = preview(pixels)
    tiles = pixels if controls is None else np.stack([controls, pixels], 1).reshape(2 * n, *pixels.shape[1:])
    cols = min(len(tiles), 8)
    rows = math.ceil(len(tiles) / cols)
    padded = np.concatenate([tiles, np.full((rows * cols - len(tiles), *tiles.shape[1:]), 255, np.uint8)])
    table = padded.reshape(rows, cols, *tiles.shape[1:])
    save_png(grid([table[:, c] for c in range(cols)]), out / "grid.png", upscale=max(1, 64 // pixels.shape[1]))
    write_samples_store(out / "samples.zarr", latents, labels, attrs)


@torch.no_grad()
def save_data_values(out: Path, latents: np.ndarray, decoder, intensity: dict | None, batch_size: int = 64) -> Path:
    """Write each sample again in the data's own values into ``OUT/data/``: the latents decoded and mapped back
    through the data's intensity range (the store's ``intensity``; null: 8-bit). One channel of 8 or 16 bits:
    ``sample_NNNNN.png`` (L or I;16); 8-bit RGB: PNG; any other channel count or 32-bit data:
    ``sample_NNNNN.tif``, one page per channel."""
    from ldmflow.data.images import from_unit_range

    intensity = intensity or {}
    bits = intensity.get("source_bits") or 8
    folder = out / "data"
    folder.mkdir(parents=True, exist_ok=True)
    device = next(decoder.parameters()).device
    for lo in range(0, len(latents), batch_size):
        x, _ = decoder.decode(torch.from_numpy(latents[lo:lo + batch_size]).to(device))  # (B, C, H, W)
        value_range = intensity.get("range") or [[0.0, 255.0]] * x.shape[1]
        raw = from_unit_range(x, value_range, bits)  # (B, H, W, C) uint8 / uint16 / float32
        for i, img in enumerate(raw, start=lo):
            c = img.shape[-1]
            if bits <= 16 and (c == 1 or (c == 3 and bits == 8)):
                Image.fromarray(img[..., 0] if c == 1 else img).save(folder / f"sample_{i:05d}.png")
            else:
                pages = [Image.fromarray(np.ascontiguousarray(img[..., k])) for k in range(c)]
                pages[0].save(folder / f"sample_{i:05d}.tif", save_all=True, append_images=pages[1:])
    return folder


def sample_checkpoint(checkpoint: str | Path, n: int, out: str | Path, *, class_id: str | int | None = None,
                      guidance: float | None = None, sampler: str | None = None, steps: int | None = None,
                      seed: int = 42, device: str | None = None, batch_size: int = 64,
                      data_values: bool = False) -> dict:
    """Generate N samples into OUT: ``sample_NNNNN.png``, ``grid.png``, ``samples.zarr``; same seed, same images.

    Without ``class_id`` a class-conditional model cycles through the classes (sample i has class i mod K).
    With ``data_values`` the samples are also written in the data's own bit depth and channels into
    ``OUT/data/`` (see :func:`save_data_values`): e.g. 16-bit PNGs for 16-bit microscopy.
    """
    if n < 1:
        raise SamplingError(f"--n {n}: allowed: 1 or more samples")
    dev = get_device(device)
    model, cfg, extra = load_diffusion(checkpoint, dev)
    sampling = from_dict(SamplingConfig, {**vars(cfg.sampling), **{k: v for k, v in
                                          {"sampler": sampler, "steps": steps}.items() if v is not None}})
    check_request(n, batch_size, sampling, cfg.diffusion.timesteps, extra["num_classes"], guidance)
    if guidance is not None:
        sampling.guidance = guidance
    decoder, schedule = decoder_and_schedule(extra, cfg.diffusion, dev)
    num_classes = extra["num_classes"]
    fixed = resolve_class(class_id, extra["classes"], num_classes)
    labels = None
    if num_classes:
        labels = torch.full((n,), fixed, dtype=torch.long) if fixed is not None else torch.arange(n) % num_classes
    out = prepare_out(out)
    start = time.monotonic()
    latents, pixels = generate_decoded(lambda lo, hi: model, n, labels, extra, schedule, sampling,
                                       cfg.diffusion.prediction, decoder, seed=seed, device=dev,
                                       batch_size=batch_size)
    attrs = {"format": "ldmflow-samples-v1", "checkpoint": str(checkpoint), "checkpoint_sha256": file_sha256(checkpoint),
             "autoencoder_checkpoint": extra["autoencoder_checkpoint"],
             "autoencoder_sha256": extra["autoencoder_sha256"], "sampler": sampling.sampler, "steps": sampling.steps,
             "eta": sampling.eta, "guidance": recorded_guidance(sampling, num_classes), "seed": seed,
             "classes": extra["classes"], "ldmflow_version": __version__}
    lab = labels.numpy() if labels is not None else np.full(n, -1)
    save_samples(out, pixels, latents, lab, attrs)
    if data_values:
        save_data_values(out, latents, decoder, extra.get("intensity"), batch_size)
    seconds = time.monotonic() - start
    log.info("wrote %d samples to %s in %.1f s (%s, %d steps, guidance %s)", n, out, seconds, sampling.sampler,
             sampling.steps, attrs["guidance"])
    return {"n": n, "out": str(out), "seconds": seconds, **attrs}
