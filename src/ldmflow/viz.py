"""Image grids for sample and reconstruction PNGs (written with Pillow: fast, no plotting stack)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ldmflow.artifacts import atomic_write_bytes

# A fixed palette: the same class gets the same colour in every grid.
PALETTE = np.array(
    [[0, 0, 0], [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48], [145, 30, 180],
     [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212], [0, 128, 128], [220, 190, 255],
     [170, 110, 40], [255, 250, 200], [128, 0, 0], [170, 255, 195], [128, 128, 0], [255, 215, 180], [0, 0, 128]],
    dtype=np.uint8,
)


def to_pixels(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8, every channel kept."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def preview(pixels: np.ndarray) -> np.ndarray:
    """(N, H, W, C) uint8 -> (N, H, W, 3) for grids: grayscale shown gray, RGB as it is, any other channel
    count as its first three channels in red, green, blue (missing ones black)."""
    c = pixels.shape[-1]
    if c == 3:
        return pixels
    if c == 1:
        return np.repeat(pixels, 3, axis=-1)
    out = np.zeros((*pixels.shape[:-1], 3), dtype=np.uint8)
    out[..., :min(c, 3)] = pixels[..., :3]
    return out


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (N, H, W, 3) uint8 for grids (see :func:`preview` for C other than 3)."""
    return preview(to_pixels(images))


def colorize(masks: torch.Tensor | np.ndarray) -> np.ndarray:
    """(N, H, W) integer class ids -> (N, H, W, 3) uint8 with the fixed palette."""
    m = masks.cpu().numpy() if torch.is_tensor(masks) else np.asarray(masks)
    return PALETTE[m.astype(np.int64) % len(PALETTE)]


def grid(columns: list[np.ndarray], pad: int = 2) -> np.ndarray:
    """Lay out columns of equal-length (N, H, W, 3) uint8 stacks side by side: one row per item."""
    n, h, w, _ = columns[0].shape
    out = np.full((n * (h + pad) + pad, len(columns) * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for c, col in enumerate(columns):
        for r in range(n):
            y, x = pad + r * (h + pad), pad + c * (w + pad)
            out[y:y + h, x:x + w] = col[r]
    return out


def save_png(image: np.ndarray, path: str | Path, upscale: int = 1) -> None:
    """Write an (H, W, 3), (H, W, 1) or (H, W) uint8 array (RGB, L) or an (H, W) uint16 array (I;16) as PNG
    atomically; nearest-neighbour upscale for tiny images."""
    img = Image.fromarray(image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image)
    if upscale > 1:
        img = img.resize((img.width * upscale, img.height * upscale), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
