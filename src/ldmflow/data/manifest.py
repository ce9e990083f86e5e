"""The data layer: manifests, validation of every row, preprocessing, splits and the image dataset.

A manifest is a CSV with the columns ``image`` (required), ``mask`` (optional: single-channel PNG of
integer class ids 0..K-1, the image's size), ``label`` (optional: integer or class name) and ``split``
(optional: train/val/test). Paths are relative to the manifest's folder. A plain folder of images is
accepted too. Every row is decoded and checked once, up front, so a bad file stops the run before
training starts with an error naming the manifest row and the file (or, with ``skip_bad_rows``, is
skipped and counted).

Read-time rules (:func:`read_manifest`):

* **Labels** are stripped of surrounding whitespace. An empty label means "unlabelled", never a class: a
  column of empty labels is dropped, and a column where some rows are labelled and others not is an
  error naming the unlabelled rows. With ``data.classes: null`` one column holds integer ids or names,
  not both, and no two names may differ only in case (``Circle`` / ``circle``): both are errors naming
  the rows, since guessing would silently make or merge classes.
* **Duplicates**: rows naming the same file, or files with the same content, are one image. They are
  reported (a warning naming the rows) and always land on the same side of the split (the split is drawn
  over unique images), so validation never holds a training image. Content is compared only between
  files of the same byte size, by a hash of their first MiB: exact for files under 1 MiB (nearly every
  training image), and for larger ones two files of one size and one first MiB count as one image.
  Duplicates with different labels or different ``split`` values are an error naming both rows.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image, UnidentifiedImageError

from ldmflow.config.common import DataConfig
from ldmflow.errors import DataError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}
SPLITS = ("train", "val", "test")
HASH_BYTES = 2**20  # duplicate files are compared by size and a hash of their first MiB
MAX_INTEGER_CLASSES = 10_000  # integer labels 0..K-1 with classes: null; larger ids are typos, not classes




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
        except pd.errors.EmptyDataError:
            raise DataError(f"{path}: empty manifest; a CSV with a header row (image[,mask,label,split,control]) "
                            "and one row per image is needed") from None
        except (pd.errors.ParserError, UnicodeDecodeError) as exc:
            raise DataError(f"{path}: not a readable CSV manifest: {str(exc).strip()}") from None
        except (IsADirectoryError, PermissionError) as exc:
            raise DataError(f"{path}: cannot read the manifest: {exc.strerror}") from None
        if "image" not in frame.columns:
            raise DataError(f"{path}: manifest needs an 'image' column; found columns: {', '.join(frame.columns)}")
        unknown = set(frame.columns) - {"image", "mask", "label", "split", "control"}
        if unknown:
            raise DataError(
                f"{path}: unknown manifest column(s) {', '.join(sorted(unknown))}; "
                "allowed: image, mask, label, split, control"
            )
        if not len(frame):
            raise DataError(f"{path}: manifest has a header but no rows")
        root = path.parent
        for col in ("image", "mask", "control"):
            if col in frame.columns:
                frame[col] = [_resolve_path(root, p, path, row) for row, p in enumerate(frame[col], 1)]
    else:
        raise DataError(f"{path}: manifest not found (give a CSV file or a folder of images)")
    frame.insert(0, "row", np.arange(1, len(frame) + 1))
    frame.attrs["source"] = str(path)
    if "label" in frame.columns:
        frame = normalise_labels(frame, str(path))
    frame["image_group"] = duplicate_groups(frame, str(path))
    return frame


def _resolve_path(root: Path, text: str, source: Path, row: int) -> str:
    text = text.strip()
    if not text:
        return ""
    if "\0" in text:
        raise DataError(f"{source}: row {row}: {text!r} is not a file path")
    return str((root / text).resolve())


def _rows(rows) -> str:
    """'rows 2, 5, 9' (at most eight, then the count)."""
    rows = [int(r) for r in rows]
    more = f" and {len(rows) - 8} more" if len(rows) > 8 else ""
    return f"row{'s' if len(rows) > 1 else ''} {', '.join(map(str, rows[:8]))}{more}"


def normalise_labels(frame: pd.DataFrame, source: str) -> pd.DataFrame:
    """Strip the labels; drop a column of empty labels; refuse a column where only some rows are labelled."""
    labels = frame["label"].astype(str).str.strip()
    empty = labels == ""
    if empty.all():
        log.info("%s: the label column is empty: the images are unlabelled", source)
        return frame.drop(columns="label")
    if empty.any():
        raise DataError(f"{source}: {_rows(frame['row'][empty])}: empty label while other rows have one; label "
                        "every row, or none (an empty label means unlabelled, not a class)")
    frame["label"] = labels
    return frame


def _content_key(path: str) -> tuple[int, str] | None:
    try:
        with open(path, "rb") as f:
            return os.fstat(f.fileno()).st_size, hashlib.blake2b(f.read(HASH_BYTES), digest_size=16).hexdigest()
    except OSError:
        return None  # a missing or unreadable file is named, with its row, when the row is decoded


def duplicate_groups(frame: pd.DataFrame, source: str) -> np.ndarray:
    """Each row's image group: the manifest row of the first row with the same file or the same content.

    Rows of one group must agree on label and split (else a DataError names both rows); groups of more
    than one row are logged as a warning.
    """
    paths = list(frame["image"])
    rows = [int(r) for r in frame["row"]]
    first_of_path: dict[str, int] = {}
    group = np.array([first_of_path.setdefault(p, r) if p else r for p, r in zip(paths, rows)], dtype=np.int64)
    # content: only files whose byte size another file shares can be copies, so most files are never read
    by_size: dict[int, list[int]] = {}
    for path, row in first_of_path.items():
        try:
            by_size.setdefault(os.stat(path).st_size, []).append(row)
        except (OSError, ValueError):
            pass
    path_of = {r: p for p, r in first_of_path.items()}
    first_of_content: dict[tuple[int, str], int] = {}
    same: dict[int, int] = {}
    for candidates in (v for v in by_size.values() if len(v) > 1):
        for row in sorted(candidates):
            key = _content_key(path_of[row])
            if key is not None:
                same[row] = first_of_content.setdefault(key, row)
    group = np.array([same.get(int(g), int(g)) for g in group], dtype=np.int64)
    repeated = np.flatnonzero(group != np.asarray(rows))
    if len(repeated):
        pairs = [f"{rows[i]} (= row {group[i]})" for i in repeated[:8]]
        log.warning("%s: %d row(s) repeat an earlier row's image (same file or same content): rows %s%s; each "
                    "image stays on one side of the split", source, len(repeated), ", ".join(pairs),
                    f" and {len(repeated) - 8} more" if len(repeated) > 8 else "")
        index = {r: i for i, r in enumerate(rows)}
        for col in ("label", "split"):
            if col in frame.columns:
                values = list(frame[col])
                for i in repeated:
                    j = index[int(group[i])]
                    if values[i] != values[j]:
                        raise DataError(f"{source}: rows {rows[j]} and {rows[i]} are the same image with different "
                                        f"{col}s ({values[j]!r}, {values[i]!r}); keep one row, or give them one {col}")
    return group


def split_by_image(frame: pd.DataFrame, val_fraction: float, seed: int) -> np.ndarray:
    """:func:`assign_split` over unique images: rows of one image (see :func:`duplicate_groups`) share a side.

    Without duplicates this is ``assign_split(len(frame), ...)``, row for row.
    """
    groups = frame["image_group"].to_numpy() if "image_group" in frame.columns else np.arange(len(frame))
    unique, inverse = np.unique(groups, return_inverse=True)
    return assign_split(len(unique), val_fraction, seed)[inverse]


def assign_split(n: int, val_fraction: float, seed: int) -> np.ndarray:
    """A deterministic train/val split of n rows by seed: at least one validation row when n > 1."""
    n_val = min(max(int(round(n * val_fraction)), 1 if n > 1 and val_fraction > 0 else 0), n - 1 if n > 1 else 0)
    order = np.random.default_rng(seed).permutation(n)
    split = np.full(n, "train", dtype=object)
    split[order[:n_val]] = "val"
    return split


def _is_int(value: str) -> bool:
    value = value.strip()
    return value.isascii() and value.isdigit()


def infer_classes(labels: list[str], source: str, rows) -> list[str]:
    """The classes of a label column when ``data.classes`` is null: integer ids 0..max become "0".."max",
    names become the sorted unique names. Ids and names mixed, or names differing only in case, are an
    error naming the rows."""
    rows = list(rows)
    is_int = [_is_int(v) for v in labels]
    if all(is_int):
        top = max(int(v) for v in labels)
        if top >= MAX_INTEGER_CLASSES:
            bad = [r for r, v in zip(rows, labels) if int(v) >= MAX_INTEGER_CLASSES]
            raise DataError(f"{source}: {_rows(bad)}: integer label {top}; allowed ids 0..{MAX_INTEGER_CLASSES - 1} "
                            "(name the classes in data.classes for other labels)")
        return [str(i) for i in range(top + 1)]
    if any(is_int):
        ints = [r for r, b in zip(rows, is_int) if b]
        names = [r for r, b in zip(rows, is_int) if not b]
        raise DataError(f"{source}: the label column mixes integer ids ({_rows(ints)}) and names ({_rows(names)}); "
                        "use one kind, or list the classes in data.classes")
    folded: dict[str, str] = {}
    for value, row in zip(labels, rows):
        other = folded.setdefault(value.casefold(), value)
        if other != value:
            first = next(r for r, v in zip(rows, labels) if v == other)
            raise DataError(f"{source}: rows {first} and {row}: labels {other!r} and {value!r} differ only in case; "
                            "use one spelling (or list both in data.classes)")
    return sorted(set(labels))


def resolve_labels(labels: list[str], classes: list[str] | None, source: str, rows) -> tuple[np.ndarray, list[str]]:
    """Map manifest labels (names or integer ids) to integer ids; an unknown label names its row.

    With no class list given, the classes are inferred by :func:`infer_classes`.
    """
    labels = [str(v).strip() for v in labels]
    if classes is None:
        classes = infer_classes(labels, source, rows)
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
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            (Path(out_dir) / "skipped_rows.json").write_text(
                json.dumps({"count": len(self.skipped), "rows": self.skipped}, indent=2)
            )


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
        split = split_by_image(frame, cfg.val_fraction, seed)
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
