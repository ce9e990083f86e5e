"""The data layer: manifests, validation of every row, preprocessing, splits and the image dataset.

A manifest is a CSV with the columns ``image`` (required), ``mask`` (optional: single-channel PNG of
integer class ids 0..K-1, the image's size), ``label`` (optional: integer or class name) and ``split``
(optional: train/val/test). Paths are relative to the manifest's folder. A plain folder of images is
accepted too. Every row is decoded and checked once, up front, so a bad file stops the run before
training starts with an error naming the manifest row and the file (or, with ``skip_bad_rows``, is
skipped and counted).
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image, UnidentifiedImageError

from ldmflow.artifacts import atomic_write_json
from ldmflow.config.common import DataConfig
from ldmflow.errors import DataError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}
SPLITS = ("train", "val", "test")




# --------------------------------------------------------------------------------------------------
# Manifests
# --------------------------------------------------------------------------------------------------


def read_manifest(path: str | Path) -> pd.DataFrame:
    """Read a manifest CSV (or list a folder of images) into a frame with absolute paths.

    The frame keeps the manifest's own row numbers in the column ``row`` (1-based, the header is row 0)
    so that every later error can name the row a user sees in a spreadsheet.
    """
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DataError(f"{path}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in this folder")
        frame = pd.DataFrame({"image": [str(p) for p in files]})
    elif path.is_file():
        try:
            frame = pd.read_csv(path, dtype=str, keep_default_na=False)
        except (pd.errors.ParserError, UnicodeDecodeError) as exc:
            raise DataError(f"{path}: not a readable CSV manifest: {exc}") from None
        if "image" not in frame.columns:
            raise DataError(f"{path}: manifest needs an 'image' column; found columns: {', '.join(frame.columns)}")
        unknown = set(frame.columns) - {"image", "mask", "label", "split", "control"}
        if unknown:
            raise DataError(
                f"{path}: unknown manifest column(s) {', '.join(sorted(unknown))}; "
                "allowed: image, mask, label, split, control"
            )
        root = path.parent
        for col in ("image", "mask", "control"):
            if col in frame.columns:
                frame[col] = [str((root / p).resolve()) if p else "" for p in frame[col]]
    else:
        raise DataError(f"{path}: manifest not found (give a CSV file or a folder of images)")
    frame.insert(0, "row", np.arange(1, len(frame) + 1))
    frame.attrs["source"] = str(path)
    return frame


def assign_split(n: int, val_fraction: float, seed: int) -> np.ndarray:
    """A deterministic train/val split of n rows by seed: at least one validation row when n > 1."""
    n_val = min(max(int(round(n * val_fraction)), 1 if n > 1 and val_fraction > 0 else 0), n - 1 if n > 1 else 0)
    order = np.random.default_rng(seed).permutation(n)
    split = np.full(n, "train", dtype=object)
    split[order[:n_val]] = "val"
    return split


def _is_int(value: str) -> bool:
    return value.strip().isdigit()


def resolve_labels(labels: list[str], classes: list[str] | None, source: str, rows) -> tuple[np.ndarray, list[str]]:
    """Map manifest labels (names or integer ids) to integer ids; an unknown label names its row.

    With no class list given, integer labels 0..max become classes "0".."max" and names become the
    sorted unique names.
    """
    if classes is None:
        if all(_is_int(v) for v in labels):
            classes = [str(i) for i in range(max(int(v) for v in labels) + 1)]
        else:
            classes = sorted(set(labels))
    lookup = {name: i for i, name in enumerate(classes)}
    out = np.empty(len(labels), dtype=np.int64)
    for i, (value, row) in enumerate(zip(labels, rows)):
        if value in lookup:
            out[i] = lookup[value]
        elif _is_int(value) and int(value) < len(classes):
            out[i] = int(value)
        else:
            raise DataError(
                f"{source}: row {row}: unknown label {value!r}; allowed: {', '.join(classes)} "
                f"or their indices 0..{len(classes) - 1}"
            )
    return out, classes


# --------------------------------------------------------------------------------------------------
# Decoding and preprocessing
# --------------------------------------------------------------------------------------------------


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


def load_row(
    image_path: str, mask_path: str | None, size: int, mask_classes: int | None, source: str, row: int
) -> tuple[np.ndarray, np.ndarray | None]:
    """Decode, check and preprocess one manifest row: (H, W, 3) uint8 image, (H, W) uint8 mask."""
    img = _open(image_path, "image", source, row)
    raw_size = img.size
    img = resize_center_crop(img.convert("RGB"), size, Image.Resampling.BICUBIC)
    mask = None
    if mask_path is not None:
        m = _open(mask_path, "mask", source, row)
        if m.mode not in ("L", "P", "I", "I;16", "1"):
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
    return np.asarray(img), mask


# --------------------------------------------------------------------------------------------------
# The prepared table and the dataset
# --------------------------------------------------------------------------------------------------


@dataclass
class PreparedData:
    """Every valid manifest row, checked, with labels, split and (when it fits) decoded pixels."""

    source: str
    image_size: int
    paths: list[str]
    mask_paths: list[str] | None
    labels: np.ndarray | None  # (N,) int64
    classes: list[str] | None
    mask_classes: int | None
    split: np.ndarray  # (N,) of "train" / "val" / "test"
    images: np.ndarray | None = None  # (N, H, W, 3) uint8 when cached
    masks: np.ndarray | None = None  # (N, H, W) uint8 when cached
    skipped: list[dict] = field(default_factory=list)

    @property
    def has_masks(self) -> bool:
        return self.mask_paths is not None

    @property
    def has_labels(self) -> bool:
        return self.labels is not None

    def indices(self, split: str) -> np.ndarray:
        return np.flatnonzero(self.split == split)

    def write_skipped(self, out_dir: str | Path) -> None:
        """Write skipped_rows.json (count and reasons) next to a stage's outputs when rows were skipped."""
        if self.skipped:
            atomic_write_json(Path(out_dir) / "skipped_rows.json", {"count": len(self.skipped), "rows": self.skipped})


def prepare_data(manifest: str | Path, cfg: DataConfig, seed: int = 42, threads: int | None = None) -> PreparedData:
    """Read a manifest, decode and check every row, resolve labels and split; cache pixels that fit."""
    frame = read_manifest(manifest)
    source = frame.attrs["source"]
    has_masks = "mask" in frame.columns
    size = cfg.image_size
    threads = threads or min(8, os.cpu_count() or 1)
    bytes_per_row = size * size * (4 if has_masks else 3)
    cache = len(frame) * bytes_per_row <= cfg.cache_max_gb * 2**30

    def check(i: int):
        rec = frame.iloc[i]
        try:
            img, mask = load_row(rec["image"], rec["mask"] if has_masks else None, size, cfg.mask_classes, source, int(rec["row"]))
            return (img, mask) if cache else (None, None if mask is None else mask.max())
        except DataError as exc:
            if not cfg.skip_bad_rows:
                raise
            return exc

    with ThreadPoolExecutor(threads) as pool:
        results = list(pool.map(check, range(len(frame))))
    skipped = [
        {"row": int(frame.iloc[i]["row"]), "file": frame.iloc[i]["image"], "reason": str(r)}
        for i, r in enumerate(results)
        if isinstance(r, DataError)
    ]
    keep = [i for i, r in enumerate(results) if not isinstance(r, DataError)]
    if skipped:
        log.warning("skipped %d bad manifest row(s) of %d (data.skip_bad_rows)", len(skipped), len(frame))
        for s in skipped:
            log.warning("  %s", s["reason"])
    if not keep:
        raise DataError(f"{source}: no usable rows")
    frame = frame.iloc[keep].reset_index(drop=True)
    results = [results[i] for i in keep]

    mask_classes = cfg.mask_classes
    if has_masks and mask_classes is None:
        mask_classes = max(2, 1 + max(int(m.max()) if cache else int(m) for _, m in results))
        log.info("data.mask_classes not set: %d classes inferred from the masks", mask_classes)

    labels = classes = None
    if "label" in frame.columns:
        labels, classes = resolve_labels(list(frame["label"]), cfg.classes, source, frame["row"])

    if "split" in frame.columns and any(frame["split"]):
        bad = frame[~frame["split"].isin(SPLITS)]
        if len(bad):
            rec = bad.iloc[0]
            raise DataError(f"{source}: row {rec['row']}: unknown split {rec['split']!r}; allowed: {', '.join(SPLITS)}")
        split = frame["split"].to_numpy(dtype=object)
    else:
        split = assign_split(len(frame), cfg.val_fraction, seed)
    if not (split == "train").any():
        raise DataError(f"{source}: no training rows (split column has no 'train')")

    data = PreparedData(
        source=source,
        image_size=size,
        paths=list(frame["image"]),
        mask_paths=list(frame["mask"]) if has_masks else None,
        labels=labels,
        classes=classes,
        mask_classes=mask_classes,
        split=split,
        skipped=skipped,
    )
    if cache:
        data.images = np.stack([img for img, _ in results])
        if has_masks:
            data.masks = np.stack([m for _, m in results])
    return data




class ImageDataset(torch.utils.data.Dataset):
    """Images (3, H, W) in [-1, 1], masks (H, W) int64 and labels, for the rows of one split.

    Batches are built whole by ``__getitems__`` (one vectorised gather from the cache, or a decode of
    each row when the dataset did not fit in memory), so the DataLoader adds no per-item overhead.
    """

    def __init__(self, data: PreparedData, split: str | None = "train"):
        self.data = data
        self.rows = np.arange(len(data.paths)) if split is None else data.indices(split)
        labels = data.labels[self.rows] if data.has_labels else None
        self.labels = None if labels is None else torch.from_numpy(labels)

    def __len__(self) -> int:
        return len(self.rows)

    def _pixels(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        d = self.data
        if d.images is not None:
            return d.images[rows], (d.masks[rows] if d.masks is not None else None)
        pairs = [
            load_row(d.paths[r], d.mask_paths[r] if d.has_masks else None, d.image_size, d.mask_classes, d.source, r + 1)
            for r in rows
        ]
        imgs = np.stack([p[0] for p in pairs])
        masks = np.stack([p[1] for p in pairs]) if d.has_masks else None
        return imgs, masks

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        idx = np.asarray(indices, dtype=np.int64)
        imgs, masks = self._pixels(self.rows[idx])
        batch = {
            "image": torch.from_numpy(imgs).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0),  # (N, 3, H, W)
            "index": torch.from_numpy(idx),
        }
        if masks is not None:
            batch["mask"] = torch.from_numpy(masks).long()  # (N, H, W)
        if self.labels is not None:
            batch["label"] = self.labels[idx]
        return batch

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[0] for k, v in self.__getitems__([i]).items()}


def build_dataset(config, manifest: str | Path, split: str | None = "train", threads: int | None = None) -> ImageDataset:
    """The research module's notebook helper: an :class:`ImageDataset` for one split of a manifest."""
    data = prepare_data(manifest, config.data, config.seed, threads)
    return ImageDataset(data, split)
