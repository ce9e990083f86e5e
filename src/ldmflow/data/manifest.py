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

import functools
import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

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
        real_folder = functools.lru_cache(maxsize=4096)(os.path.realpath)
        resolve = functools.partial(_resolve_path, path.parent, path, real_folder)
        for col in ("image", "mask", "control"):
            if col in frame.columns:
                frame[col] = [resolve(p, row) for row, p in enumerate(frame[col], 1)]
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
    class list does not depend on which classes a small sample happens to contain). ``synthesis`` (what made
    a synthetic set, :mod:`ldmflow.stages.synthesize`) is provenance, not read here."""
    source = Path(source)
    path = (source if source.is_dir() else source.parent) / "dataset.json"
    if not path.is_file():
        return {}
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON: {exc}") from None
    unknown = set(meta) - {"classes", "mask_classes", "synthesis"} if isinstance(meta, dict) else {"(not an object)"}
    if unknown:
        raise DataError(f"{path}: unknown key(s) {', '.join(sorted(unknown))}; allowed: classes, mask_classes, "
                        "synthesis")
    return {k: v for k, v in meta.items() if k != "synthesis"}


def _resolve_path(root: Path, source: Path, real_folder: Callable[[str], str], text: str, row: int) -> str:
    """The absolute path of a manifest entry with every symbolic link resolved, as ``os.path.realpath`` gives
    it; ``real_folder`` (a cached realpath) resolves each folder once, since most rows share a few folders."""
    text = text.strip()
    if not text:
        return ""
    if "\0" in text:
        raise DataError(f"{source}: row {row}: {text!r} is not a file path")
    folder, name = os.path.split(os.path.join(root, text))
    if name in ("", ".", ".."):
        return os.path.realpath(os.path.join(folder, name))
    full = os.path.join(real_folder(folder), name)
    # only a link needs more than its folder resolved (one lstat; a missing file is named when decoded)
    return os.path.realpath(full) if os.path.islink(full) else full


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
            size = os.fstat(f.fileno()).st_size
            # read(HASH_BYTES) would allocate a whole MiB for every small file first
            return size, hashlib.blake2b(f.read(min(size, HASH_BYTES)), digest_size=16).hexdigest()
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


# --------------------------------------------------------------------------------------------------
# The prepared table and the dataset
# --------------------------------------------------------------------------------------------------














