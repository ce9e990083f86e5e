"""Decoding image files so that the data survive: bit depths, channels, alpha, palettes, multi-page TIFF stacks,
resizing, and the intensity rule that maps deep data to [-1, 1] and back."""

from __future__ import annotations

import logging

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ldmflow.config.common import DataConfig
from ldmflow.errors import DataError

log = logging.getLogger(__name__)

ONE_CHANNEL_MODES = {"1", "L", "LA", "La", "I", "F", "I;16", "I;16B", "I;16L", "I;16N"}


MASK_MODES = ("L", "P", "I", "I;16", "I;16B", "I;16L", "I;16N", "1")


LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R BT.601


PERCENTILE_PIXELS = 4096  # pixels per train image (per channel) that the percentile rule looks at ...


PERCENTILE_TOTAL = 2**24  # ... and in all (fewer per image on large datasets: memory stays bounded)


def resize_center_crop(img: Image.Image, size: int, resample: int) -> Image.Image:
    """Resize the short side to ``size`` and centre-crop to a ``size`` x ``size`` square."""
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), resample=resample)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))


def _open(path: str, what: str, source: str, row: int) -> Image.Image:
    if not path:
        raise DataError(f"{source}: row {row}: empty {what} path")
    try:
        img = Image.open(path)
        img.load()
        return img
    except FileNotFoundError:
        raise DataError(f"{source}: row {row}: {what} file not found: {path}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{source}: row {row}: cannot read {what} {path}: {exc}") from None


def source_bits(img: Image.Image) -> int:
    """Bit depth of an opened image's pixel values: 8, 16 (I;16 modes) or 32 (I, F)."""
    if img.mode.startswith("I;16"):
        return 16
    return 32 if img.mode in ("I", "F") else 8


def probe_image(path: str) -> tuple[int, int] | None:
    """(channels, bits) from a file's header alone, without decoding; None when it cannot be opened
    (decoding reports why, with the row)."""
    try:
        with Image.open(path) as img:
            pages = getattr(img, "n_frames", 1)
            channels = pages if pages > 1 else (1 if img.mode in ONE_CHANNEL_MODES else 3)
            return channels, source_bits(img)
    except (OSError, SyntaxError, ValueError):
        return None


def _frame_planes(img: Image.Image) -> np.ndarray:
    """One frame (H, W, c): uint8 for 8-bit modes, float32 raw values for 16- and 32-bit modes."""
    mode = img.mode
    if source_bits(img) > 8:
        return np.asarray(img).astype(np.float32)[..., None]
    if mode in ("1", "L"):
        return np.asarray(img.convert("L"))[..., None]
    if mode in ("P", "PA"):
        img = img.convert("RGBA" if ("transparency" in img.info or mode == "PA") else "RGB")
        mode = img.mode
    if mode in ("LA", "La", "RGBA", "RGBa"):
        arr = np.asarray(img.convert("LA" if mode.startswith("L") else "RGBA")).astype(np.float32)
        # composited on black: a transparent pixel is background (0), not the colour hidden under alpha 0
        return np.round(arr[..., :-1] * arr[..., -1:] / 255.0).astype(np.uint8)
    return np.asarray(img.convert("RGB"))


def decode_image(img: Image.Image, channels: int | None, path: str, what: str, source: str, row: int) -> np.ndarray:
    """An opened image as (H, W, C) with C = ``channels`` (None: the file's own): uint8 for 8-bit files,
    float32 raw values for deeper ones. Grayscale is repeated only when 3 channels are asked for, RGB
    becomes luma only when 1 is; a multi-page file is N channels only when ``channels`` is N (or None)."""
    pages = getattr(img, "n_frames", 1)
    if pages > 1:
        if channels is not None and channels != pages:
            raise DataError(f"{source}: row {row}: {what} {path} is a multi-page file ({pages} pages); set "
                            f"data.channels: {pages} if each page is one channel of the image, else store one "
                            "image per file")
        planes = []
        for k in range(pages):
            img.seek(k)
            plane = _frame_planes(img)
            if plane.shape[-1] != 1 or (planes and plane.shape != planes[0].shape):
                raise DataError(f"{source}: row {row}: {what} {path} page {k + 1} is {img.mode} "
                                f"{img.size[0]}x{img.size[1]}; every page of a channel stack must be "
                                "single-channel and the size of page 1")
            planes.append(plane.astype(np.float32) if source_bits(img) > 8 else plane)
        if len({p.dtype for p in planes}) > 1:
            planes = [p.astype(np.float32) for p in planes]
        return np.concatenate(planes, axis=-1)
    arr = _frame_planes(img)
    have = arr.shape[-1]
    if channels is None or have == channels:
        return arr
    if have == 1 and channels == 3:
        return np.repeat(arr, 3, axis=-1)
    if have == 3 and channels == 1:
        luma = arr.astype(np.float32) @ LUMA
        return (np.round(luma).astype(np.uint8) if arr.dtype == np.uint8 else luma)[..., None]
    raise DataError(f"{source}: row {row}: {what} {path} has {have} channel(s) (mode {img.mode}) but "
                    f"data.channels is {channels}; allowed for this file: 1 or 3")


def resize_planes(arr: np.ndarray, size: int) -> np.ndarray:
    """(H, W, C) -> (size, size, C) by :func:`resize_center_crop` (bicubic), keeping the dtype; planes that
    are not 8-bit gray or RGB are resized one by one as 32-bit float images, clipped to the file's own
    per-channel min..max."""
    c = arr.shape[-1]
    if arr.dtype == np.uint8 and c in (1, 3):
        img = Image.fromarray(arr[..., 0] if c == 1 else arr, "L" if c == 1 else "RGB")
        out = np.asarray(resize_center_crop(img, size, Image.Resampling.BICUBIC))
        return out[..., None] if out.ndim == 2 else out
    planes = [np.asarray(resize_center_crop(Image.fromarray(np.ascontiguousarray(arr[..., k], np.float32), "F"),
                                            size, Image.Resampling.BICUBIC)) for k in range(c)]
    out = np.stack(planes, axis=-1)
    if arr.dtype == np.uint8:
        return np.clip(np.round(out), 0, 255).astype(np.uint8)
    # bicubic rings past sharp edges; keep each channel within the values the file has (as uint8 clamps)
    return np.clip(out, arr.min(axis=(0, 1)), arr.max(axis=(0, 1)))


def load_row(
    image_path: str, mask_path: str | None, size: int, mask_classes: int | None, source: str, row: int,
    channels: int | None = 3,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Decode, check and preprocess one manifest row: (H, W, C) image (uint8 for 8-bit files, float32 raw
    values for deeper ones; see :func:`decode_image`), (H, W) uint8 mask."""
    img = _open(image_path, "image", source, row)
    raw_size = img.size
    image = resize_planes(decode_image(img, channels, image_path, "image", source, row), size)
    mask = None
    if mask_path is not None:
        m = _open(mask_path, "mask", source, row)
        if m.mode not in MASK_MODES:
            raise DataError(f"{source}: row {row}: mask {mask_path} has mode {m.mode}; a mask must be single-channel")
        if m.size != raw_size:
            raise DataError(
                f"{source}: row {row}: mask {mask_path} is {m.size[0]}x{m.size[1]} but its image "
                f"{image_path} is {raw_size[0]}x{raw_size[1]}"
            )
        arr = np.asarray(m)
        top = int(arr.max()) if arr.size else 0
        if top > 255 or (mask_classes is not None and top >= mask_classes):
            limit = mask_classes if mask_classes is not None else 256
            raise DataError(
                f"{source}: row {row}: mask {mask_path} has class id {top}; allowed ids 0..{limit - 1} "
                "(data.mask_classes)"
            )
        m = Image.fromarray(arr.astype(np.uint8), mode="L")
        mask = np.asarray(resize_center_crop(m, size, Image.Resampling.NEAREST))
    return image, mask


def to_unit_range(images: np.ndarray, value_range: list[list[float]] | None = None) -> torch.Tensor:
    """Decoded images (N, H, W, C) -> (N, C, H, W) float in [-1, 1]: per channel, raw ``low`` -> -1 and
    ``high`` -> 1, clipped; uint8 with no range: 0..255 (bit for bit the 8-bit rule)."""
    x = torch.from_numpy(np.require(images, requirements=["C", "W"])).permute(0, 3, 1, 2).float()
    if value_range is None:
        if images.dtype != np.uint8:
            raise ValueError("images deeper than 8 bits need their value range (data.intensity.range)")
        return x.div_(127.5).sub_(1.0)
    low, high = torch.tensor(value_range, dtype=torch.float32).T[:, :, None, None]  # (C, 1, 1) each
    return ((x - low) / (high - low)).clamp_(0.0, 1.0).mul_(2.0).sub_(1.0)


def from_unit_range(images: torch.Tensor, value_range: list[list[float]], bits: int) -> np.ndarray:
    """The inverse of :func:`to_unit_range`: (N, C, H, W) in [-1, 1] -> (N, H, W, C) raw values in the data's
    own type (uint8 for 8 bits, uint16 for 16, float32 for 32), e.g. to write samples back as 16-bit files."""
    low, high = torch.tensor(value_range, dtype=torch.float32).T[:, :, None, None]
    x = (images.detach().float().cpu().clamp(-1, 1) + 1) / 2 * (high - low) + low
    x = x.permute(0, 2, 3, 1).numpy()
    if bits <= 8:
        return np.clip(np.round(x), 0, 255).astype(np.uint8)
    if bits <= 16:
        return np.clip(np.round(x), 0, 65535).astype(np.uint16)
    return x.astype(np.float32)


def infer_channels(probes: list[tuple[int, int] | None]) -> int:
    """data.channels null: 1 when every readable image is single-channel, else 3 (a colour file anywhere
    makes the dataset RGB; multi-page stacks need data.channels set)."""
    counts = {p[0] for p in probes if p is not None}
    return 1 if counts <= {1} else 3


def resolve_value_range(cfg: DataConfig, bits: int, channels: int, train_pixels: list[np.ndarray],
                        source: str) -> list[list[float]] | None:
    """The per-channel [low, high] of data.intensity for data of ``bits`` bits; None for 8-bit data."""
    icfg = cfg.intensity
    if bits <= 8:
        return None
    if icfg.range is not None:
        if len(icfg.range) != channels or any(len(r) != 2 or r[1] <= r[0] for r in icfg.range):
            raise DataError(f"{source}: key 'data.intensity.range' has {icfg.range}; allowed: {channels} "
                            "[low, high] pair(s) with high > low, one per channel")
        return [[float(lo), float(hi)] for lo, hi in icfg.range]
    if icfg.mode == "bit_depth":
        return [[0.0, float(2**icfg.bit_depth - 1)]] * channels
    if icfg.high <= icfg.low:
        raise DataError(f"{source}: key 'data.intensity.high' ({icfg.high}) must exceed 'low' ({icfg.low})")
    pixels = np.concatenate(train_pixels).astype(np.float64)  # (P, C)
    low, high = np.percentile(pixels, [icfg.low, icfg.high], axis=0)
    out = []
    for c in range(channels):
        lo, hi = float(low[c]), float(high[c])
        if hi <= lo:
            log.warning("%s: channel %d is constant (%g) over the train split; its range is [%g, %g]", source, c,
                        lo, lo, lo + 1)
            hi = lo + 1.0
        out.append([lo, hi])
    log.info("%d-bit data: percentiles %g..%g of the train split per channel: %s", bits, icfg.low, icfg.high, out)
    return out
