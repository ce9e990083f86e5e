"""Decoding image files so that the data survive: bit depths, channels, alpha, palettes, multi-page TIFF stacks,
resizing, and the intensity rule that maps deep data to [-1, 1] and back."""

from __future__ import annotations

import logging
import re
import struct
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ldmflow.config.common import DataConfig
from ldmflow.errors import ConfigError, DataError

log = logging.getLogger(__name__)

ONE_CHANNEL_MODES = {"1", "L", "LA", "La", "I", "F", "I;16", "I;16B", "I;16L", "I;16N"}


MASK_MODES = ("L", "P", "I", "I;16", "I;16B", "I;16L", "I;16N", "1")


LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R BT.601


PERCENTILE_PIXELS = 4096  # pixels per train image (per channel) that the percentile rule looks at ...


PERCENTILE_TOTAL = 2**24  # ... and in all (fewer per image on large datasets: memory stays bounded)


# Pillow's own decompression-bomb limit: a file whose header promises more pixels is refused before decoding.
MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 2**28


# Pillow's decoders raise any of these for a corrupt, truncated or hostile file (not only OSError).
DECODER_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, KeyError, ZeroDivisionError,
                  MemoryError, struct.error, Image.DecompressionBombError)


LOSSY_FORMATS = {"JPEG": "JPEG", "MPO": "JPEG", "JPEG2000": "JPEG 2000"}


@dataclass(frozen=True)
class MaskRule:
    """How mask pixels become class ids: raw values (data.mask_values) or RGB colours (data.mask_palette)."""

    values: dict[int, int] | None = None  # raw value -> class id
    palette: dict[int, int] | None = None  # 0xRRGGBB -> class id
    classes: int | None = None  # class count of the mapping: its largest id + 1


def resize_center_crop(img: Image.Image, size: int, resample: int) -> Image.Image:
    """Resize the short side to ``size`` and centre-crop to a ``size`` x ``size`` square."""
    w, h = img.size
    if w == h == size:
        return img
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), resample=resample)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))


def _open(path: str, what: str, source: str, row: int) -> Image.Image:
    if not path:
        raise DataError(f"{source}: row {row}: empty {what} path")

    def too_large(pixels: int) -> DataError:
        return DataError(f"{source}: row {row}: {what} {path} is too large to decode safely ({pixels} pixels, the "
                         f"limit is {MAX_PIXELS}); downscale or tile it, or set data.skip_bad_rows")

    try:
        img = Image.open(path)
        if img.size[0] * img.size[1] > MAX_PIXELS:
            raise too_large(img.size[0] * img.size[1])
        img.load()
        return img
    except DataError:
        raise
    except Image.DecompressionBombError as exc:  # Pillow refuses twice its limit in Image.open itself
        pixels = re.search(r"\((\d+) pixels\)", str(exc))
        raise too_large(int(pixels[1]) if pixels else MAX_PIXELS * 2) from None
    except FileNotFoundError:
        raise DataError(f"{source}: row {row}: {what} file not found: {path}") from None
    except DECODER_ERRORS as exc:
        raise DataError(f"{source}: row {row}: cannot read {what} {path}: {type(exc).__name__}: {exc}") from None


def source_bits(img: Image.Image) -> int:
    """Bit depth of an opened image's pixel values: 8, 16 (I;16 modes) or 32 (I, F)."""
    if img.mode.startswith("I;16"):
        return 16
    return 32 if img.mode in ("I", "F") else 8


def probe_image(path: str) -> tuple[int, int, int] | None:
    """(channels, bits, short side) from a file's header alone, without decoding; None when it cannot be
    opened (decoding reports why, with the row)."""
    try:
        with Image.open(path) as img:
            pages = getattr(img, "n_frames", 1)
            channels = pages if pages > 1 else (1 if img.mode in ONE_CHANNEL_MODES else 3)
            return channels, source_bits(img), min(img.size)
    except DECODER_ERRORS:
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
    if arr.shape[:2] == (size, size):
        return arr  # what resizing and cropping would give back, without the copies through PIL
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


def _colour(text, key: str) -> int:
    """'#rrggbb' or [r, g, b] -> 0xRRGGBB."""
    if isinstance(text, str) and len(text) == 7 and text.startswith("#"):
        try:
            return int(text[1:], 16)
        except ValueError:
            pass
    elif isinstance(text, list) and len(text) == 3 and all(isinstance(c, int) and 0 <= c <= 255 for c in text):
        return text[0] << 16 | text[1] << 8 | text[2]
    raise ConfigError(f"key '{key}' has the colour {text!r}; allowed: '#rrggbb' or [r, g, b] with 0..255")


def _class_map(spec, key: str, parse) -> dict[int, int]:
    """A mapping {raw: id} or a list of raws in class order -> {parsed raw: class id}, checked."""
    pairs = spec.items() if isinstance(spec, dict) else ((raw, i) for i, raw in enumerate(spec))
    out: dict[int, int] = {}
    for raw, cid in pairs:
        if not isinstance(cid, int) or isinstance(cid, bool) or cid < 0:
            raise ConfigError(f"key '{key}' maps {raw!r} to {cid!r}; allowed: class ids 0, 1, 2, ...")
        out[parse(raw)] = cid
    if not out:
        raise ConfigError(f"key '{key}' is empty; give at least the background's value")
    return out


def _raw_value(raw) -> int:
    try:
        value = int(str(raw).strip())
    except ValueError:
        value = -1
    if value < 0:
        raise ConfigError(f"key 'data.mask_values' has the raw value {raw!r}; allowed: integers 0, 1, 2, ...")
    return value


def mask_rule(cfg: DataConfig) -> MaskRule | None:
    """The checked data.mask_values / data.mask_palette; None when neither is set."""
    if cfg.mask_values is not None and cfg.mask_palette is not None:
        raise ConfigError("keys 'data.mask_values' and 'data.mask_palette' are both set; set one (values for "
                          "single-channel masks, a palette for colour-coded RGB masks)")
    if cfg.mask_values is not None:
        values = _class_map(cfg.mask_values, "data.mask_values", _raw_value)
        return MaskRule(values=values, classes=max(values.values()) + 1)
    if cfg.mask_palette is not None:
        palette = _class_map(cfg.mask_palette, "data.mask_palette", lambda c: _colour(c, "data.mask_palette"))
        return MaskRule(palette=palette, classes=max(palette.values()) + 1)
    return None


def lossy_format(img: Image.Image, path: str) -> str | None:
    """The name of a lossy format the file is stored in (JPEG, lossy WebP), else None."""
    if img.format in LOSSY_FORMATS:
        return LOSSY_FORMATS[img.format]
    if img.format == "WEBP":
        with open(path, "rb") as fh:
            head = fh.read(4096)
        # RIFF header, then the first chunk: 'VP8 ' is lossy, 'VP8L' lossless, 'VP8X' (extended) holds one
        if head[12:16] == b"VP8 " or (head[12:16] == b"VP8X" and b"VP8L" not in head):
            return "lossy WebP"
    return None


def _lookup(arr: np.ndarray, table: dict[int, int], what: str, key: str, where: str, fmt=str) -> np.ndarray:
    """Map every value of ``arr`` through ``table``; a value it lacks is an error naming a few."""
    found, inverse = np.unique(arr, return_inverse=True)
    unknown = [int(v) for v in found if int(v) not in table]
    if unknown:
        shown = ", ".join(fmt(v) for v in unknown[:8]) + (f" and {len(unknown) - 8} more" if len(unknown) > 8 else "")
        raise DataError(f"{where} has {what} {shown}, which {key} does not map to a class")
    return np.array([table[int(v)] for v in found], dtype=np.int64)[inverse].reshape(arr.shape)


def _mask_ids(m: Image.Image, rule: MaskRule | None, mask_classes: int | None, where: str) -> np.ndarray:
    """A mask image's class ids (H, W): through the rule, or as stored (0/k read as 0/1 when 2 classes)."""
    if m.mode in ("RGB", "RGBA", "P") and rule is not None and rule.palette is not None:
        rgb = np.asarray(m.convert("RGB")).astype(np.int64)  # (H, W, 3)
        return _lookup(rgb[..., 0] << 16 | rgb[..., 1] << 8 | rgb[..., 2], rule.palette, "the colour(s)",
                       "data.mask_palette", where, fmt=lambda v: f"#{v:06x}")
    if m.mode in ("RGB", "RGBA"):
        rgb = np.asarray(m)
        if not (np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])):
            raise DataError(f"{where} is a colour-coded {m.mode} mask; give each colour's class id in "
                            "data.mask_palette (e.g. {'#000000': 0, '#ff0000': 1}), or save single-channel masks")
        m = Image.fromarray(rgb[..., 0], "L")  # gray saved as RGB
    if m.mode not in MASK_MODES:
        raise DataError(f"{where} has mode {m.mode}; a mask must be single-channel (or RGB with data.mask_palette)")
    arr = np.asarray(m).astype(np.int64)
    if rule is not None and rule.values is not None:
        return _lookup(arr, rule.values, "the value(s)", "data.mask_values", where)
    top = int(arr.max()) if arr.size else 0
    if mask_classes == 2 and top > 1 and set(np.unique(arr).tolist()) <= {0, top}:
        return (arr > 0).astype(np.int64)  # a binary mask saved as 0/k
    if top > 255 or (mask_classes is not None and top >= mask_classes):
        limit = mask_classes if mask_classes is not None else 256
        raise DataError(f"{where} has class id {top}; allowed ids 0..{limit - 1} (data.mask_classes; "
                        "data.mask_values maps other encodings)")
    return arr


def load_mask(path: str, image: tuple[str, tuple[int, int]], size: int, mask_classes: int | None, rule: MaskRule | None,
              source: str, row: int) -> np.ndarray:
    """Decode and check one mask of ``image`` (its path and size): its class ids, resized (nearest) like the
    image, (size, size) uint8."""
    image_path, image_size = image
    m = _open(path, "mask", source, row)
    where = f"{source}: row {row}: mask {path}"
    lossy = lossy_format(m, path)
    if lossy:
        raise DataError(f"{where} is a {lossy} file: lossy compression adds noise at every class boundary, which "
                        "reads as class ids nobody drew; save masks losslessly (PNG, TIFF)")
    if m.size != image_size:
        raise DataError(f"{where} is {m.size[0]}x{m.size[1]} but its image {image_path} is "
                        f"{image_size[0]}x{image_size[1]}")
    ids = _mask_ids(m, rule, mask_classes, where)
    if ids.size and int(ids.max()) > 255:
        raise DataError(f"{where} has class id {int(ids.max())}; at most 256 classes (ids 0..255)")
    if ids.shape == (size, size):
        return ids.astype(np.uint8)
    return np.asarray(resize_center_crop(Image.fromarray(ids.astype(np.uint8), mode="L"), size,
                                         Image.Resampling.NEAREST))


@dataclass(frozen=True)
class DecodedRow:
    """One manifest row decoded and checked, with what its file's header said."""

    image: np.ndarray  # (H, W, C) uint8 for 8-bit files, float32 raw values for deeper ones
    mask: np.ndarray | None  # (H, W) uint8 class ids
    bits: int  # the file's bit depth (:func:`source_bits`)
    short_side: int  # the file's shorter side in pixels, before resizing


def decode_row(
    image_path: str, mask_path: str | None, size: int, mask_classes: int | None, source: str, row: int,
    channels: int | None = 3, mask_rule: MaskRule | None = None,
) -> DecodedRow:
    """Decode, check and preprocess one manifest row (see :func:`decode_image` and :func:`load_mask`)."""
    img = _open(image_path, "image", source, row)
    bits, short_side = source_bits(img), min(img.size)  # of page 1, as probe_image reads them
    try:
        image = resize_planes(decode_image(img, channels, image_path, "image", source, row), size)
    except DataError:
        raise
    except DECODER_ERRORS as exc:  # a multi-page file decodes its later pages only now
        raise DataError(f"{source}: row {row}: cannot read image {image_path}: {type(exc).__name__}: {exc}") from None
    mask = None
    if mask_path is not None:
        mask = load_mask(mask_path, (image_path, img.size), size, mask_classes, mask_rule, source, row)
    return DecodedRow(image, mask, bits, short_side)


def load_row(
    image_path: str, mask_path: str | None, size: int, mask_classes: int | None, source: str, row: int,
    channels: int | None = 3, mask_rule: MaskRule | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Decode, check and preprocess one manifest row: (H, W, C) image (uint8 for 8-bit files, float32 raw
    values for deeper ones; see :func:`decode_image`), (H, W) uint8 mask of class ids (see :func:`load_mask`)."""
    decoded = decode_row(image_path, mask_path, size, mask_classes, source, row, channels, mask_rule)
    return decoded.image, decoded.mask


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
