"""Synthetic labelled data sets in the input's own format: ``results/synthetic/NAME/``.

:func:`synthesize` samples N images of a diffusion model (labels from its classes) or a mask ControlNet (labels
and masks: the train masks it was given, drawn seeded and stratified by class, optionally flipped or turned) and
writes them as a data set ldmflow (or any tool) reads back:

- ``images/[CLASS/]synth_NNNNN.png|tif`` in the data's own values (:func:`ldmflow.samples.save_data_values`:
  8-bit or 16-bit PNG, TIFF for 32-bit or other channel counts);
- ``masks/[CLASS/]synth_NNNNN.png`` (ControlNets): the control mask, as the input's mask ids;
- ``manifest.csv`` (image, [mask], [label], split: a seeded, stratified val share);
- ``dataset.json``: the data reader's ``classes`` and ``mask_classes`` (the source's ids) and, under
  ``synthesis``, what made the set (checkpoint and sha256, autoencoder, seed, sampler, counts per class, controls);
- ``grid.png``: the first images (beside their masks for a ControlNet).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ldmflow import __version__
from ldmflow.artifacts import atomic_write_bytes, atomic_write_json, file_sha256, fsync_tree, publish_dir
from ldmflow.checkpoints import Loaded, checkpoint_stage, load_controlnet, load_diffusion, verified_autoencoder
from ldmflow.config.common import DataConfig
from ldmflow.config.schema import to_dict
from ldmflow.config.synthetic import SyntheticConfig, synthetic_config
from ldmflow.data.controls import to_model_input
from ldmflow.data.draws import allocate, rows_for_counts, stratified_rows
from ldmflow.data.latent_store import LatentStore
from ldmflow.devices import get_device
from ldmflow.diffusion.generate import decode_latents, generate, seeded_noise
from ldmflow.diffusion.schedules import NoiseSchedule
from ldmflow.errors import ConfigError, SamplingError
from ldmflow.samples import save_data_values
from ldmflow.viz import colorize, grid, preview, save_png

log = logging.getLogger(__name__)

FORMAT = "ldmflow-synthetic-v1"
GRID_IMAGES = 32  # images shown in grid.png


def class_counts(cfg: SyntheticConfig, classes: list[str] | None, train_labels: np.ndarray) -> np.ndarray:
    """Images per class (K,): equal (``balanced``), the train split's frequencies (``train``) or a table of
    fractions by class name; (1,) holding N for a model without classes."""
    if not classes:
        return np.array([cfg.n])
    if cfg.classes == "balanced":
        weights = np.ones(len(classes))
    elif cfg.classes == "train":
        weights = np.bincount(train_labels[train_labels >= 0], minlength=len(classes)).astype(np.float64)
    else:
        unknown = set(cfg.classes) - set(classes)
        if unknown:
            raise ConfigError(f"synthetic {cfg.name}: key 'classes' names {sorted(unknown)}; the model's classes "
                              f"are {', '.join(classes)}")
        weights = np.array([float(cfg.classes.get(c, 0.0)) for c in classes])
    return allocate(cfg.n, weights)


@dataclass
class Controls:
    """The control masks a ControlNet set is made under: store rows, their masks (N, H, W) uint8 after the
    augmentation, labels (N,) (-1: none) and each mask's flip and quarter turns."""

    rows: np.ndarray
    masks: np.ndarray
    labels: np.ndarray
    hflip: np.ndarray
    turns: np.ndarray


def draw_controls(store: LatentStore, counts: np.ndarray, classes: list[str] | None, cfg: SyntheticConfig
                  ) -> Controls:
    """Train masks drawn seeded and stratified by class (``counts`` per class), flipped / turned as
    ``cfg.augment`` asks (each with probability 1/2; turns of 0-3 quarters), from the same seed."""
    if store.masks is None:
        raise SamplingError(f"{store.path}: the latent store holds no masks to draw ControlNet controls from")
    train = store.indices("train")
    labels = store.labels[train]
    if classes:
        picks = rows_for_counts(labels, dict(enumerate(counts.tolist())), cfg.seed)
    else:
        picks = stratified_rows(None, cfg.n, cfg.seed, length=len(train))
    rows = train[picks]
    rng = np.random.default_rng([cfg.seed, 1])
    hflip = rng.random(len(rows)) < 0.5 if "hflip" in cfg.augment else np.zeros(len(rows), bool)
    turns = rng.integers(0, 4, len(rows)) if "rot90" in cfg.augment else np.zeros(len(rows), np.int64)
    masks = []
    for r, flip, k in zip(rows, hflip, turns):
        m = np.asarray(store.masks[int(r)])
        masks.append(np.rot90(m[:, ::-1] if flip else m, int(k)))
    return Controls(rows, np.ascontiguousarray(np.stack(masks)), store.labels[rows], hflip, turns)


@dataclass
class Drawn:
    """A generated set: latents (N, C, h, w) in the autoencoder's space, labels (N,) (-1: none), the control
    masks (ControlNets) and the first images as uint8 for the grid."""

    latents: np.ndarray
    labels: np.ndarray
    controls: Controls | None
    preview: np.ndarray


def _sample(loaded: Loaded, labels: np.ndarray, controls: Controls | None, cfg: SyntheticConfig, dev) -> Drawn:
    """Generate batch by batch (controls made per batch, so memory stays bounded); the noise of all N is drawn
    up front from the seed, as ``ldmflow sample`` draws it."""
    meta = loaded.meta
    base = loaded.base_config or loaded.config
    schedule = NoiseSchedule.from_config(base.diffusion).to(dev)
    sampling = loaded.config.sampling.base() if controls is not None else loaded.config.sampling
    scale = loaded.config.sampling.scale if controls is not None else 1.0
    decoder = verified_autoencoder(meta.latents, dev).model
    noise, gen = seeded_noise(cfg.n, meta.latents.latent_shape, seed=cfg.seed, device=dev)
    y = torch.from_numpy(labels) if meta.num_classes else None
    latents, shown = [], []
    for lo in range(0, cfg.n, cfg.batch_size):
        hi = min(cfg.n, lo + cfg.batch_size)
        ctl = None if controls is None else to_model_input(
            "mask", torch.from_numpy(controls.masks[lo:hi].astype(np.int64)), meta.control_channels)
        z = generate(loaded.model, schedule, noise[lo:hi], labels=None if y is None else y[lo:hi], controls=ctl,
                     control_scale=scale, sampling=sampling, prediction=base.diffusion.prediction, generator=gen)
        lat, pixels = decode_latents(decoder, z, meta.latents.scale_factor, batch_size=cfg.batch_size)
        latents.append(lat)
        shown.append(pixels[: max(0, GRID_IMAGES - lo)])
    return Drawn(np.concatenate(latents), labels, controls, np.concatenate(shown))


def _labels(counts: np.ndarray, classes: list[str] | None, seed: int) -> np.ndarray:
    """Class ids (N,) holding ``counts[c]`` of each class, in a seeded order (-1 for a model without classes)."""
    if not classes:
        return np.full(int(counts.sum()), -1, np.int64)
    ids = np.repeat(np.arange(len(counts)), counts)
    return ids[np.random.default_rng([seed, 2]).permutation(len(ids))]


def _relative_names(labels: np.ndarray, classes: list[str] | None) -> list[str]:
    """Each image's path under ``images/`` (and its mask's under ``masks/``), without suffix: a class folder
    per class (so the folder itself reads as a data set), none without classes."""
    return [(f"{classes[c]}/" if classes and c >= 0 else "") + f"synth_{i:05d}" for i, c in enumerate(labels)]


def _write_files(tmp: Path, drawn: Drawn, names: list[str], decoder, intensity: dict | None,
                 batch_size: int) -> list[str]:
    """``images/`` in the data's own values and ``masks/`` (ControlNets): the images' paths relative to TMP."""
    raw = save_data_values(tmp / ".raw", drawn.latents, decoder, intensity, batch_size)  # raw/sample_NNNNN.*
    images = []
    for i, name in enumerate(names):
        src = next(raw.glob(f"sample_{i:05d}.*"))
        dst = tmp / "images" / f"{name}{src.suffix}"
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.replace(src, dst)
        images.append(str(dst.relative_to(tmp)))
        if drawn.controls is not None:
            mask = drawn.controls.masks[i]
            save_png(mask if mask.max() < 256 else mask.astype(np.uint16), tmp / "masks" / f"{name}.png")
    shutil.rmtree(tmp / ".raw")
    return images


def _manifest(images: list[str], drawn: Drawn, names: list[str], classes: list[str] | None, seed: int) -> bytes:
    """manifest.csv: image, [mask], [label], split; a seeded val share stratified by class, so the folder trains
    as it is (a user may rewrite the split)."""
    n = len(images)
    frame = pd.DataFrame({"image": images})
    if drawn.controls is not None:
        frame["mask"] = [f"masks/{name}.png" for name in names]
    if classes:
        frame["label"] = [classes[c] for c in drawn.labels]
    split = np.full(n, "train", dtype=object)
    n_val = int(round(n * DataConfig().val_fraction)) if n > 1 else 0
    if n_val:
        split[stratified_rows(drawn.labels, n_val, seed)] = "val"
    frame["split"] = split
    return frame.to_csv(index=False).encode()


def _grid(drawn: Drawn) -> np.ndarray:
    """The first images in rows of 8 (each beside its mask for a ControlNet)."""
    tiles = preview(drawn.preview)
    if drawn.controls is not None:
        masks = colorize(torch.from_numpy(drawn.controls.masks[: len(tiles)].astype(np.int64)))
        tiles = np.stack([masks, tiles], 1).reshape(-1, *tiles.shape[1:])
    cols = 8
    pad = (-len(tiles)) % cols
    tiles = np.concatenate([tiles, np.full((pad, *tiles.shape[1:]), 255, np.uint8)])
    table = tiles.reshape(-1, cols, *tiles.shape[1:])
    return grid([table[:, c] for c in range(cols)])


def _load(checkpoint: str | Path, cfg: SyntheticConfig, dev) -> Loaded:
    stage = checkpoint_stage(checkpoint)
    if stage != cfg.stage:
        raise SamplingError(f"synthetic {cfg.name}: {checkpoint} is a {stage} checkpoint, but the entry names "
                            f"{cfg.model}")
    if stage == "diffusion":
        return load_diffusion(checkpoint, dev)
    loaded = load_controlnet(checkpoint, dev)
    if loaded.config.control.signal != "mask":
        raise SamplingError(f"synthetic {cfg.name}: {checkpoint} is controlled by {loaded.config.control.signal}; "
                            "a synthetic labelled set needs a mask ControlNet (its masks are the labels)")
    return loaded


def _record(checkpoint: str | Path, loaded: Loaded, cfg: SyntheticConfig, drawn: Drawn, classes: list[str] | None,
            store: LatentStore) -> dict:
    """dataset.json: what made the set, enough to make it again."""
    meta, controls = loaded.meta, drawn.controls
    sampling = loaded.config.sampling.base() if controls is not None else loaded.config.sampling
    counts = np.bincount(drawn.labels[drawn.labels >= 0], minlength=len(classes)) if classes else None
    record = {
        "format": FORMAT, "name": cfg.name, "model": cfg.model, "checkpoint": str(checkpoint),
        "checkpoint_sha256": file_sha256(checkpoint), "experiment": to_dict(loaded.config),
        "base_checkpoint": getattr(meta, "base_checkpoint", None), "base_sha256": getattr(meta, "base_sha256", None),
        "autoencoder_checkpoint": meta.latents.autoencoder_checkpoint,
        "autoencoder_sha256": meta.latents.autoencoder_sha256, "latents": str(store.path),
        "source_manifest": store.info.manifest.path, "source_manifest_sha256": store.info.manifest.sha256,
        "source_fingerprint": store.info.data_fingerprint,
        "options": to_dict(cfg), "seed": cfg.seed, "n": cfg.n, "sampler": sampling.sampler, "steps": sampling.steps,
        "eta": sampling.eta, "guidance": sampling.guidance if meta.num_classes else None,
        "classes": classes, "counts": dict(zip(classes, counts.tolist())) if classes else {"(none)": cfg.n},
        "intensity": meta.latents.intensity, "ldmflow_version": __version__,
    }
    if controls is not None:
        record["controls"] = {"source": "train split masks of the latent store, drawn seeded and stratified by class",
                              "scale": loaded.config.sampling.scale, "augment": list(cfg.augment),
                              "rows": controls.rows.tolist(), "hflip": controls.hflip.tolist(),
                              "rot90": controls.turns.tolist()}
    return record


def synthesize(checkpoint: str | Path, out_dir: str | Path, options: SyntheticConfig | dict, *,
               device: str | None = None) -> dict:
    """Write a synthetic labelled set of ``options`` (a :class:`SyntheticConfig` or its mapping) made by
    ``checkpoint`` into OUT_DIR (replaced whole once the new set is complete); returns dataset.json's record."""
    cfg = synthetic_config(options)
    dev = get_device(device)
    start = time.monotonic()
    loaded = _load(checkpoint, cfg, dev)
    meta = loaded.meta
    store = LatentStore(meta.latents.latents)
    # a diffusion model's labels are the classes it was asked for (none when unconditional); a ControlNet's are
    # the classes of the rows its control masks come from
    classes = (meta.latents.classes if meta.num_classes else None) if cfg.stage == "diffusion" else store.classes
    counts = class_counts(cfg, classes, store.labels[store.indices("train")])
    controls = None
    if cfg.stage == "controlnet":
        controls = draw_controls(store, counts, classes, cfg)
        labels = np.where(controls.labels >= 0, controls.labels, np.arange(cfg.n) % max(meta.num_classes or 1, 1))
        labels = labels if classes else np.full(cfg.n, -1)
    else:
        labels = _labels(counts, classes, cfg.seed)
    drawn = _sample(loaded, labels.astype(np.int64), controls, cfg, dev)
    out = Path(out_dir)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    names = _relative_names(drawn.labels, classes)
    decoder = verified_autoencoder(meta.latents, dev).model
    images = _write_files(tmp, drawn, names, decoder, meta.latents.intensity, cfg.batch_size)
    atomic_write_bytes(tmp / "manifest.csv", _manifest(images, drawn, names, classes, cfg.seed))
    record = {**_record(checkpoint, loaded, cfg, drawn, classes, store), "seconds": time.monotonic() - start}
    # the data reader's own keys first: the set reads back with the source's class ids and mask classes
    atomic_write_json(tmp / "dataset.json", {"classes": classes, "mask_classes": store.mask_classes if
                                             controls is not None else None, "synthesis": record})
    save_png(_grid(drawn), tmp / "grid.png", upscale=max(1, 64 // drawn.preview.shape[1]))
    fsync_tree(tmp)
    publish_dir(tmp, out)
    log.info("synthetic %s: %d images of %s (%s) in %s, %.1f s", cfg.name, cfg.n, cfg.model,
             ", ".join(f"{k} {v}" for k, v in record["counts"].items()), out, record["seconds"])
    return record
