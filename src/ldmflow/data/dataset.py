"""Prepared data: every manifest row decoded and checked once, split, channels and intensity resolved; the image
dataset the autoencoder trains on."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from ldmflow.artifacts import atomic_write_json
from ldmflow.config.common import DataConfig
from ldmflow.data.images import (
    PERCENTILE_PIXELS,
    PERCENTILE_TOTAL,
    DecodedRow,
    MaskRule,
    decode_row,
    infer_channels,
    load_row,
    mask_rule,
    probe_image,
    resolve_value_range,
    to_unit_range,
)
from ldmflow.data.manifest import (
    SPLITS,
    data_fingerprint,
    dataset_metadata,
    read_manifest,
    resolve_labels,
    split_by_image,
)
from ldmflow.errors import DataError

log = logging.getLogger(__name__)

MAX_INFERRED_MASK_CLASSES = 32  # more inferred classes are an encoding (0..255 grays), not a segmentation
CHECK_RUN = 32  # rows per decoding task at most
REPORTED_UPSCALE = 2.0  # upscaling beyond this is reported once per dataset (data.max_upscale makes it an error)


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
    mask_rule: MaskRule | None = None  # data.mask_values / data.mask_palette, checked
    mask_lut: np.ndarray | None = None  # (256,) uint8: stored mask value -> class id (binary 0/k masks)

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


@dataclass(frozen=True)
class _DecodePlan:
    """How every row of one manifest is decoded and what is kept of it."""

    source: str
    size: int
    channels: int
    has_masks: bool
    known_mask_classes: int | None  # from the config or dataset.yaml; None: inferred from the masks
    cache: bool  # keep the decoded pixels (they fit in data.cache_max_gb)
    step: int  # every step-th pixel of a high-bit-depth image feeds the intensity percentiles
    probes: list  # probe_image of each row: None or (channels, bits, short side)
    mask_rule: MaskRule | None
    max_upscale: float | None  # data.max_upscale: a row needing more is a DataError


class _Row(NamedTuple):
    """What the check of one row keeps."""

    image: np.ndarray | None  # (H, W, C), when cached
    mask: np.ndarray | None  # (H, W) class ids, when cached
    mask_values: np.ndarray | None  # the mask's distinct values
    pixels: np.ndarray | None  # sampled pixels of a deep image, for the intensity percentiles
    bits: int
    short_side: int | None


def _decode_plan(frame, cfg: DataConfig, meta: dict, threads: int) -> _DecodePlan:
    """Probe every image (in ``threads`` threads) for channels and bit depth; decide whether pixels are cached."""
    has_masks = "mask" in frame.columns
    size = cfg.image_size
    with ThreadPoolExecutor(threads) as pool:
        probes = list(pool.map(probe_image, frame["image"]))
    channels = cfg.channels or infer_channels(probes)
    deep = any(p is not None and p[1] > 8 for p in probes)
    bytes_per_row = size * size * (channels * (4 if deep else 1) + (1 if has_masks else 0))
    rule = mask_rule(cfg) if has_masks else None
    return _DecodePlan(
        source=frame.attrs["source"], size=size, channels=channels, has_masks=has_masks,
        known_mask_classes=cfg.mask_classes or (meta.get("mask_classes") if has_masks else None)
        or (rule.classes if rule else None),
        cache=len(frame) * bytes_per_row <= cfg.cache_max_gb * 2**30,
        step=max(1, size * size // max(16, min(PERCENTILE_PIXELS, PERCENTILE_TOTAL // max(len(frame), 1)))),
        probes=probes, mask_rule=rule, max_upscale=cfg.max_upscale,
    )


def _check_upscale(source: str, size: int, max_upscale: float | None, row: int, path: str, short: int | None) -> None:
    if short and max_upscale is not None and size / short > max_upscale:
        raise DataError(f"{source}: row {row}: image {path} has a short side of {short} px: x{size / short:.3g} to "
                        f"data.image_size {size}, beyond data.max_upscale {max_upscale:g}")


def _check_row(records: list[dict], plan: _DecodePlan, skip_bad_rows: bool, i: int) -> _Row | DataError:
    """Decode and check row ``i``, or return the row's DataError when bad rows are skipped."""
    rec, probe = records[i], plan.probes[i]
    try:
        _check_upscale(plan.source, plan.size, plan.max_upscale, rec["row"], rec["image"], probe[2] if probe else None)
        img, mask = load_row(rec["image"], rec["mask"] if plan.has_masks else None, plan.size,
                             plan.known_mask_classes, plan.source, int(rec["row"]), plan.channels, plan.mask_rule)
        pixels = img.reshape(-1, plan.channels)[::plan.step] if img.dtype != np.uint8 else None
        return _Row(img if plan.cache else None, mask if plan.cache else None,
                    # the values found are needed only to infer the class count
                    None if mask is None or plan.known_mask_classes is not None else np.unique(mask), pixels,
                    probe[1] if probe else (8 if img.dtype == np.uint8 else 32), probe[2] if probe else None)
    except DataError as exc:
        if not skip_bad_rows:
            raise
        return exc


def _drop_bad_rows(frame, results: list, source: str) -> tuple:
    """The frame and results without the rows that failed their check, and the skipped rows' records."""
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
    return frame.iloc[keep].reset_index(drop=True), [results[i] for i in keep], skipped


def _check_one_bit_depth(frame, depths: list[int], source: str) -> None:
    """All 8-bit or all deeper: one dataset is scaled to [-1, 1] one way."""
    if len({d > 8 for d in depths}) > 1:
        first = next(i for i, d in enumerate(depths) if (d > 8) != (depths[0] > 8))
        raise DataError(f"{source}: row {frame.iloc[first]['row']}: image {frame.iloc[first]['image']} is "
                        f"{depths[first]}-bit but row {frame.iloc[0]['row']}'s is {depths[0]}-bit; one dataset "
                        "needs one bit depth (convert the files)")


def _mask_classes(plan: _DecodePlan, results: list[_Row]) -> tuple[int | None, np.ndarray | None]:
    """The configured number of mask classes, else one inferred from the values found: 0 and one k is a
    binary mask (k -> 1, the returned lookup table), else the largest value + 1 (at least 2, at most 32)."""
    if not plan.has_masks or plan.known_mask_classes is not None:
        return plan.known_mask_classes, None
    found = np.unique(np.concatenate([r.mask_values for r in results]))
    top = int(found.max())
    if len(found) == 2 and found[0] == 0 and top > 1:
        lut = np.arange(256, dtype=np.uint8)
        lut[top] = 1
        log.info("data.mask_classes not set: the masks hold only the values 0 and %d: read as binary masks "
                 "(0 background, %d -> class 1); set data.mask_values for another reading", top, top)
        return 2, lut
    if top + 1 > MAX_INFERRED_MASK_CLASSES:
        shown = ", ".join(map(str, found[:12].tolist())) + (f" and {len(found) - 12} more" if len(found) > 12 else "")
        raise DataError(f"{plan.source}: the masks hold the values {shown} ({len(found)} distinct): read as ids "
                        f"they make {top + 1} classes, more than {MAX_INFERRED_MASK_CLASSES} are not inferred; set "
                        f"data.mask_values to the raw values in class order (e.g. [{', '.join(map(str, found[:3]))}]) "
                        "or data.mask_classes")
    log.info("data.mask_classes not set: %d classes inferred from the masks", max(2, top + 1))
    return max(2, top + 1), None


def _report_upscale(short_sides: list[int | None], size: int) -> None:
    """One warning per dataset for images upscaled beyond x2: how many, and the smallest."""
    small = [s for s in short_sides if s and size / s > REPORTED_UPSCALE]
    if small:
        _warn_upscaled(len(small), len(short_sides), min(small), size)


def _warn_upscaled(count: int, total: int, smallest: int, size: int) -> None:
    log.warning("%d of %d image(s) are upscaled more than x%g to data.image_size %d (the smallest has a short "
                "side of %d px, x%.3g); set data.max_upscale to refuse them", count, total, REPORTED_UPSCALE, size,
                smallest, size / smallest)


def _resolve_split(frame, cfg: DataConfig, seed: int, source: str) -> np.ndarray:
    """The manifest's split column when it has one (checked), else a seeded split by image."""
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
    return split


def prepare_data(manifest: str | Path, cfg: DataConfig, seed: int = 42, threads: int | None = None) -> PreparedData:
    """Read a manifest, decode and check every row, resolve labels, split, channels and the intensity
    range; cache pixels that fit."""
    frame = read_manifest(manifest)
    source = frame.attrs["source"]
    fingerprint = data_fingerprint(frame)
    meta = dataset_metadata(source)
    threads = threads or min(8, os.cpu_count() or 1)
    plan = _decode_plan(frame, cfg, meta, threads)
    # plain dicts: a pandas row lookup per image costs more than decoding a small one
    records = frame[[c for c in ("image", "mask", "row") if c in frame.columns]].to_dict("records")
    check = partial(_check_row, records, plan, cfg.skip_bad_rows)
    # runs of rows per task: a task per small image costs the pool more than the decoding
    step = max(1, min(CHECK_RUN, -(-len(frame) // (4 * threads))))
    with ThreadPoolExecutor(threads) as pool:
        runs = pool.map(lambda lo: [check(i) for i in range(lo, min(lo + step, len(frame)))],
                        range(0, len(frame), step))
        results = [r for run in runs for r in run]
    frame, results, skipped = _drop_bad_rows(frame, results, source)
    depths = [r.bits for r in results]
    _check_one_bit_depth(frame, depths, source)
    mask_classes, mask_lut = _mask_classes(plan, results)
    if cfg.max_upscale is None:
        _report_upscale([r.short_side for r in results], plan.size)
    labels = classes = None
    if "label" in frame.columns:
        labels, classes = resolve_labels(list(frame["label"]), cfg.classes or meta.get("classes"), source,
                                         frame["row"])
    split = _resolve_split(frame, cfg, seed, source)
    train_pixels = [r.pixels for r, s in zip(results, split) if s == "train" and r.pixels is not None]
    data = PreparedData(
        source=source,
        image_size=plan.size,
        paths=list(frame["image"]),
        mask_paths=list(frame["mask"]) if plan.has_masks else None,
        labels=labels,
        classes=classes,
        mask_classes=mask_classes,
        split=split,
        skipped=skipped,
        channels=plan.channels,
        value_range=resolve_value_range(cfg, max(depths), plan.channels, train_pixels, source),
        source_bits=cfg.intensity.source_bits or max(depths),
        fingerprint=fingerprint, mask_rule=plan.mask_rule, mask_lut=mask_lut,
    )
    if plan.cache:
        data.images = np.stack([r.image for r in results])
        if plan.has_masks:
            masks = np.stack([r.mask for r in results])
            data.masks = masks if mask_lut is None else mask_lut[masks]
    return data


# --------------------------------------------------------------------------------------------------
# One streamed pass: each batch decoded, checked and used at once
# --------------------------------------------------------------------------------------------------


PROBED_ROWS = 8  # rows whose headers are read, in order, to find the dataset's bit depth before streaming


class NeedsCheckPass(Exception):
    """A streamed pass met a bad row while bad rows are skipped: which rows stay, and so the split, is known
    only after a pass that checks every row (:func:`prepare_data`)."""


@dataclass
class StreamReport:
    """What the rows of a streamed pass said, merged batch by batch (from the decoding threads)."""

    rows: int = 0
    bits: int = 0  # the deepest file's bit depth
    upscaled: int = 0  # rows upscaled beyond REPORTED_UPSCALE
    smallest: int = 0  # the smallest short side among those
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, bits: list[int], short_sides: list[int], size: int) -> None:
        small = [s for s in short_sides if size / s > REPORTED_UPSCALE]
        with self.lock:
            self.rows += len(bits)
            self.bits = max(self.bits, *bits)
            if small:
                self.smallest = min(small + ([self.smallest] if self.upscaled else []))
                self.upscaled += len(small)


@dataclass(frozen=True)
class RowCheck:
    """A manifest resolved without decoding its rows (labels, split, channels, intensity), and how each row of
    a streamed pass is checked as :func:`prepare_data` would check it."""

    data: PreparedData  # no pixels, no skipped rows; source_bits is the files' deepest once the pass is done
    first: tuple[int, str, int]  # the first readable row's number, file and bit depth: every row must match it
    max_upscale: float | None
    skip_bad_rows: bool
    configured_bits: int | None  # data.intensity.source_bits
    report: StreamReport = field(default_factory=StreamReport)

    def finish(self) -> PreparedData:
        """The data once every row was decoded: the files' bit depth, and the one upscaling warning."""
        r = self.report
        self.data.source_bits = self.configured_bits or r.bits
        if self.max_upscale is None and r.upscaled:
            _warn_upscaled(r.upscaled, r.rows, r.smallest, self.data.image_size)
        return self.data


def plan_stream(manifest: str | Path, cfg: DataConfig, seed: int, channels: int) -> RowCheck | None:
    """A manifest ready for one pass that decodes, checks and uses each batch (:func:`decode_checked`), with
    ``channels`` image channels; None when an answer needs every row decoded first: deep data scaled by the
    train split's percentiles, a mask class count inferred from the masks, no readable row among the first."""
    frame = read_manifest(manifest)
    source = frame.attrs["source"]
    meta = dataset_metadata(source)
    has_masks = "mask" in frame.columns
    rule = mask_rule(cfg) if has_masks else None
    mask_classes = cfg.mask_classes or (meta.get("mask_classes") if has_masks else None) or (
        rule.classes if rule else None)
    probes = ((i, probe_image(p)) for i, p in enumerate(frame["image"][:PROBED_ROWS]))
    first = next(((i, p[1]) for i, p in probes if p is not None), None)
    if (has_masks and mask_classes is None) or first is None:
        return None
    bits = first[1]
    if bits > 8 and cfg.intensity.range is None and cfg.intensity.mode == "percentile":
        return None
    labels = classes = None
    if "label" in frame.columns:
        labels, classes = resolve_labels(list(frame["label"]), cfg.classes or meta.get("classes"), source,
                                         frame["row"])
    data = PreparedData(
        source=source, image_size=cfg.image_size, paths=list(frame["image"]),
        mask_paths=list(frame["mask"]) if has_masks else None, labels=labels, classes=classes,
        mask_classes=mask_classes, split=_resolve_split(frame, cfg, seed, source), channels=channels,
        value_range=resolve_value_range(cfg, bits, channels, [], source), source_bits=cfg.intensity.source_bits or bits,
        fingerprint=data_fingerprint(frame), mask_rule=rule,
    )
    return RowCheck(data, (int(frame["row"].iloc[first[0]]), frame["image"].iloc[first[0]], bits), cfg.max_upscale,
                    cfg.skip_bad_rows, cfg.intensity.source_bits)


def _decode_checked_row(check: RowCheck, r: int) -> DecodedRow:
    d, (first_row, first_path, first_bits) = check.data, check.first
    row = decode_row(d.paths[r], d.mask_paths[r] if d.has_masks else None, d.image_size, d.mask_classes, d.source,
                     r + 1, d.channels, d.mask_rule)
    _check_upscale(d.source, d.image_size, check.max_upscale, r + 1, d.paths[r], row.short_side)
    if (row.bits > 8) != (first_bits > 8):
        raise DataError(f"{d.source}: row {r + 1}: image {d.paths[r]} is {row.bits}-bit but row {first_row}'s "
                        f"({first_path}) is {first_bits}-bit; one dataset needs one bit depth (convert the files)")
    return row


def decode_checked(check: RowCheck, rows: Sequence[int]) -> dict[str, torch.Tensor]:
    """Rows ``rows`` (0-based) of a planned stream decoded and checked, as :class:`ImageDataset` batches them;
    a bad row raises its DataError (NeedsCheckPass when bad rows are skipped)."""
    d = check.data
    try:
        decoded = [_decode_checked_row(check, r) for r in rows]
    except DataError as exc:
        if check.skip_bad_rows:
            raise NeedsCheckPass(str(exc)) from None
        raise
    check.report.add([x.bits for x in decoded], [x.short_side for x in decoded], d.image_size)
    batch = {"image": to_unit_range(np.stack([x.image for x in decoded]), d.value_range),  # (B, C, H, W)
             "index": torch.as_tensor(np.asarray(rows, dtype=np.int64))}
    if d.has_masks:
        batch["mask"] = torch.from_numpy(np.stack([x.mask for x in decoded])).long()  # (B, H, W)
    return batch


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
                     r + 1, d.channels, d.mask_rule)
            for r in rows
        ]
        imgs = np.stack([p[0] for p in pairs])
        masks = np.stack([p[1] for p in pairs]) if d.has_masks else None
        if masks is not None and d.mask_lut is not None:
            masks = d.mask_lut[masks]
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


def build_dataset(config, manifest: str | Path, split: str | None = "train",
                  threads: int | None = None) -> ImageDataset:
    """The research module's notebook helper: an :class:`ImageDataset` for one split of a manifest."""
    data = prepare_data(manifest, config.data, config.seed, threads)
    return ImageDataset(data, split)
