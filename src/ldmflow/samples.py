"""What the sampling commands share: checking a request, the output folder, and writing the samples.

``OUT`` holds one call's samples: the ``sample_*.png``, ``grid.png``, ``control.png`` and ``samples.zarr``
of an earlier call into the same folder are removed first (other files are left alone), so a second call
with a smaller N leaves no stale samples behind.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
from pathlib import Path

import numpy as np
import torch
import zarr
from PIL import Image

from ldmflow.artifacts import fsync_tree, publish_dir, remove_stale_temporaries
from ldmflow.config.diffusion import SamplingConfig
from ldmflow.errors import SamplingError
from ldmflow.metadata import SamplesAttrs
from ldmflow.viz import grid, preview, save_png

log = logging.getLogger(__name__)


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


def write_samples_store(path: Path, latents: np.ndarray, labels: np.ndarray, attrs: SamplesAttrs) -> None:
    """``samples.zarr``: latents (N, C, h, w) float32 in the autoencoder's (unscaled) space, labels (N,)."""
    remove_stale_temporaries(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    group = zarr.open_group(str(tmp), mode="w")
    group.create_array("latents", data=latents.astype(np.float32), chunks=(min(len(latents), 256), *latents.shape[1:]))
    group.create_array("labels", data=labels.astype(np.int64))
    group.attrs.update(attrs.to_dict())
    fsync_tree(tmp)
    publish_dir(tmp, path)  # an older store is replaced only once the new one is whole


def save_samples(out: Path, pixels: np.ndarray, latents: np.ndarray, labels: np.ndarray, attrs: SamplesAttrs,
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
