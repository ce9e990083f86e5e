"""The data layer: manifests, validation of every row, preprocessing, splits and the image dataset.

A manifest is a CSV with the columns ``image`` (required), ``mask`` (optional: single-channel PNG of
integer class ids 0..K-1, the image's size), ``label`` (optional: integer or class name) and ``split``
(optional: train/val/test). Paths are relative to the manifest's folder. A folder of images is accepted
too: images in class subfolders (``cats/x.png``, ``dogs/y.png``) take the subfolder's name as their label,
and a ``masks/`` tree beside them (``F/images`` + ``F/masks``, or a folder with a sibling ``masks``) with the
same relative names gives masks. Every row is decoded and checked once, up front, so a bad file stops the
run before training starts with an error naming the manifest row and the file (or, with ``skip_bad_rows``,
is skipped and counted).

Decoding keeps the data: 8-bit grayscale (L, 1), 16-bit (I;16, I;16B) and 32-bit (I, F) grayscale, RGB,
RGBA and LA (composited on black: alpha multiplies the colour, so a transparent pixel is background 0),
palette images (expanded to RGB, or RGBA when they carry transparency), PNG, TIFF and the other formats
Pillow reads. A multi-page TIFF is an N-channel image (one page per channel) when ``data.channels`` is N,
and rejected otherwise. 8-bit images map 0..255 to [-1, 1]; deeper images by ``data.intensity`` (per-channel
percentiles of the train split by default), and the range used is kept with the run.

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

from ldmflow.artifacts import atomic_write_json
from ldmflow.config.common import DataConfig
from ldmflow.errors import DataError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}
SPLITS = ("train", "val", "test")
ONE_CHANNEL_MODES = {"1", "L", "LA", "La", "I", "F", "I;16", "I;16B", "I;16L", "I;16N"}
MASK_MODES = ("L", "P", "I", "I;16", "I;16B", "I;16L", "I;16N", "1")
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R BT.601
PERCENTILE_PIXELS = 4096  # pixels per train image (per channel) that the percentile rule looks at ...
PERCENTILE_TOTAL = 2**24  # ... and in all (fewer per image on large datasets: memory stays bounded)
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
        frame = read_folder(path)
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


def _images_under(root: Path) -> list[Path]:
    """Image files under ROOT, sorted, skipping hidden files and folders (.snakemake, .ipynb_checkpoints)."""
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(root).parts))


def read_folder(path: Path) -> pd.DataFrame:
    """A folder of images as a manifest frame: labels from class subfolders, masks from a ``masks/`` tree.

    ``F/images/...`` with ``F/masks/...``, or ``F`` with a sibling ``F/../masks``: each image's mask is the
    file with the same relative path (any image suffix) under ``masks``. Images all in subfolders: the first
    subfolder is the label (torchvision's ImageFolder convention); all at the top: no labels.
    """
    root, mask_root = path, None
    if (path / "images").is_dir() and (path / "masks").is_dir():
        root, mask_root = path / "images", path / "masks"
    elif path.name != "masks" and (path.parent / "masks").is_dir():
        mask_root = path.parent / "masks"
    files = _images_under(root)
    if not files:
        raise DataError(f"{root}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in this folder")
    frame = pd.DataFrame({"image": [str(p.resolve()) for p in files]})
    rel = [p.relative_to(root) for p in files]
    nested = [len(r.parts) > 1 for r in rel]
    if all(nested):
        frame["label"] = [r.parts[0] for r in rel]
    elif any(nested):
        top, sub = rel[nested.index(False)], rel[nested.index(True)]
        raise DataError(f"{root}: {top} lies at the top of the folder but {sub} in a class subfolder; put every "
                        "image in a class subfolder (labels) or none in one (no labels)")
    if mask_root is not None:
        masks = {m.relative_to(mask_root).with_suffix(""): m for m in _images_under(mask_root)}
        missing = [r for r in rel if r.with_suffix("") not in masks]
        if missing:
            raise DataError(f"{mask_root}: no mask for image {root / missing[0]} ({len(missing)} of {len(rel)} "
                            f"images have none); expected {mask_root / missing[0]} (any image suffix)")
        frame["mask"] = [str(masks[r.with_suffix("")].resolve()) for r in rel]
        log.info("%s: masks from %s", root, mask_root)
    return frame


def data_fingerprint(frame: pd.DataFrame) -> str:
    """sha256 of what a run reads: the manifest file's bytes, every row, and each file's size and mtime.

    A changed, added, removed or touched file changes it, so a run trained on other data is never resumed.
    """
    h = hashlib.sha256()
    source = Path(frame.attrs.get("source", ""))
    if source.is_file():
        h.update(source.read_bytes())
    columns = [c for c in ("image", "mask", "control", "label", "split") if c in frame.columns]
    for values in zip(*(frame[c] for c in columns)):
        for column, value in zip(columns, values):
            h.update(f"{column}={value}\0".encode())
            if column in ("image", "mask", "control") and value:
                try:
                    st = os.stat(value)
                    h.update(f"{st.st_size}:{st.st_mtime_ns}\0".encode())
                except OSError:
                    h.update(b"missing\0")
    return h.hexdigest()


def dataset_metadata(source: str | Path) -> dict:
    """The optional ``dataset.json`` beside a manifest (or inside an image folder): ``classes`` (names in id
    order) and ``mask_classes``, used when the data config leaves them null (the demo writes one, so its
    class list does not depend on which classes a small sample happens to contain)."""
    source = Path(source)
    path = (source if source.is_dir() else source.parent) / "dataset.json"
    if not path.is_file():
        return {}
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON: {exc}") from None
    unknown = set(meta) - {"classes", "mask_classes"} if isinstance(meta, dict) else {"(not an object)"}
    if unknown:
        raise DataError(f"{path}: unknown key(s) {', '.join(sorted(unknown))}; allowed: classes, mask_classes")
    return meta

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
    images: np.ndarray | None = None  # (N, H, W, C) uint8 (8-bit files) or float32 raw values, when cached
    masks: np.ndarray | None = None  # (N, H, W) uint8 when cached
    skipped: list[dict] = field(default_factory=list)
    channels: int = 3
    value_range: list[list[float]] | None = None  # per channel [low, high] raw values -> [-1, 1]; None: 8-bit
    source_bits: int = 8
    fingerprint: str | None = None  # sha256 of the manifest, its rows and its files' sizes and mtimes

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


def prepare_data(manifest: str | Path, cfg: DataConfig, seed: int = 42, threads: int | None = None) -> PreparedData:
    """Read a manifest, decode and check every row, resolve labels, split, channels and the intensity
    range; cache pixels that fit."""
    frame = read_manifest(manifest)
    source = frame.attrs["source"]
    fingerprint = data_fingerprint(frame)
    has_masks = "mask" in frame.columns
    meta = dataset_metadata(source)
    known_mask_classes = cfg.mask_classes or (meta.get("mask_classes") if has_masks else None)
    size = cfg.image_size
    threads = threads or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(threads) as pool:
        probes = list(pool.map(probe_image, frame["image"]))
    channels = cfg.channels or infer_channels(probes)
    deep = any(p is not None and p[1] > 8 for p in probes)
    bytes_per_row = size * size * (channels * (4 if deep else 1) + (1 if has_masks else 0))
    cache = len(frame) * bytes_per_row <= cfg.cache_max_gb * 2**30
    step = max(1, size * size // max(16, min(PERCENTILE_PIXELS, PERCENTILE_TOTAL // max(len(frame), 1))))

    def check(i: int):
        rec = frame.iloc[i]
        try:
            img, mask = load_row(rec["image"], rec["mask"] if has_masks else None, size, known_mask_classes, source,
                                 int(rec["row"]), channels)
            pixels = img.reshape(-1, channels)[::step] if img.dtype != np.uint8 else None
            kept = (img, mask) if cache else (None, None if mask is None else mask.max())
            return (*kept, pixels, probes[i][1] if probes[i] else (8 if img.dtype == np.uint8 else 32))
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
    depths = [r[3] for r in results]
    if len({d > 8 for d in depths}) > 1:
        first = next(i for i, d in enumerate(depths) if (d > 8) != (depths[0] > 8))
        raise DataError(f"{source}: row {frame.iloc[first]['row']}: image {frame.iloc[first]['image']} is "
                        f"{depths[first]}-bit but row {frame.iloc[0]['row']}'s is {depths[0]}-bit; one dataset "
                        "needs one bit depth (convert the files)")

    mask_classes = known_mask_classes
    if has_masks and mask_classes is None:
        mask_classes = max(2, 1 + max(int(m.max()) if cache else int(m) for _, m, _, _ in results))
        log.info("data.mask_classes not set: %d classes inferred from the masks", mask_classes)

    labels = classes = None
    if "label" in frame.columns:
        labels, classes = resolve_labels(list(frame["label"]), cfg.classes or meta.get("classes"), source,
                                         frame["row"])

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

    bits = cfg.intensity.source_bits or max(depths)
    train_pixels = [r[2] for r, s in zip(results, split) if s == "train" and r[2] is not None]
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
        channels=channels,
        value_range=resolve_value_range(cfg, max(depths), channels, train_pixels, source),
        source_bits=bits,
        fingerprint=fingerprint,
    )
    if cache:
        data.images = np.stack([img for img, _, _, _ in results])
        if has_masks:
            data.masks = np.stack([m for _, m, _, _ in results])
    return data




class ImageDataset(torch.utils.data.Dataset):
    """Images (C, H, W) in [-1, 1], masks (H, W) int64 and labels, for the rows of one split.

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
            load_row(d.paths[r], d.mask_paths[r] if d.has_masks else None, d.image_size, d.mask_classes, d.source,
                     r + 1, d.channels)
            for r in rows
        ]
        imgs = np.stack([p[0] for p in pairs])
        masks = np.stack([p[1] for p in pairs]) if d.has_masks else None
        return imgs, masks

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        idx = np.asarray(indices, dtype=np.int64)
        imgs, masks = self._pixels(self.rows[idx])
        batch = {
            "image": to_unit_range(imgs, self.data.value_range),  # (N, C, H, W)
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
