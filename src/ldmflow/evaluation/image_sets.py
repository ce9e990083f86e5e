"""Image sets for evaluation: manifests, latent stores, sample folders and stores, tensors."""

from __future__ import annotations

import dataclasses
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ldmflow.config.memorization import MemorizationConfig
from ldmflow.data.images import load_row, to_unit_range
from ldmflow.data.manifest import IMAGE_SUFFIXES, read_manifest
from ldmflow.errors import ConfigError, DataError
from ldmflow.evaluation.features import Features, tile_features
from ldmflow.metadata import STORE_FORMAT, StoreAttrs, autoencoder_of_store, store_image_size

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------
# Image sets: manifests, latent stores, sample folders and stores, tensors
# --------------------------------------------------------------------------------------------------


def _is_zarr_group(path: Path) -> bool:
    return path.is_dir() and (path / "zarr.json").is_file()


def _open_zarr(path: Path):
    import zarr

    return zarr.open_group(str(path), mode="r")


def _strings(values) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in np.asarray(values).reshape(-1)]


def _resolve(path: str, root: Path) -> str:
    """An image or checkpoint path from a store: absolute, else relative to the store's folder, else as given."""
    p = Path(path)
    if p.is_absolute() or not (root / p).exists():
        return str(p)
    return str((root / p).resolve())


@dataclass
class ImageSet:
    """The rows of one input that an evaluation uses: image files and/or latents, with names for reports."""

    source: str
    names: list[str]  # what per_sample.csv calls each row: the sample file or the image path
    paths: list[str | None]  # image file per row; None where only a latent exists
    rows: list[int]  # row numbers for error messages (manifest row, or store index + 1)
    latents: Any = None  # zarr array (M, C, h, w) or tensor, indexed by latent_index
    latent_index: np.ndarray | None = None  # (N,) rows -> latents
    split: np.ndarray | None = None  # (N,) "train" / "val" / "test" where known
    checkpoint: str | None = None  # the autoencoder that made the latents
    images: torch.Tensor | None = None  # (N, C, H, W) in [-1, 1] for in-memory sets
    image_size: int | None = None  # a latent store's: its files, resized and cropped to this, made the latents

    def __len__(self) -> int:
        return len(self.names)

    def subset(self, keep: np.ndarray) -> ImageSet:
        keep = np.asarray(keep, dtype=np.int64)
        return dataclasses.replace(
            self, names=[self.names[i] for i in keep], paths=[self.paths[i] for i in keep],
            rows=[self.rows[i] for i in keep],
            latent_index=None if self.latent_index is None else self.latent_index[keep],
            split=None if self.split is None else self.split[keep],
            images=None if self.images is None else self.images[torch.from_numpy(keep)],
        )

    @property
    def has_latents(self) -> bool:
        return self.latents is not None


def open_image_set(path: str | Path) -> ImageSet:
    """Open a manifest CSV, a folder of images, a latent store (``*.zarr``) or a samples store."""
    path = Path(path)
    if _is_zarr_group(path):
        return _open_store(path)
    if path.is_dir():
        files = sorted(path.glob("sample_*.png")) or sorted(
            p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        store = path / "samples.zarr"
        if files:
            out = ImageSet(str(path), [p.name for p in files], [str(p) for p in files], list(range(1, len(files) + 1)))
            if _is_zarr_group(store):
                latents = _open_store(store)
                if len(latents) != len(out):
                    raise DataError(f"{path}: {len(files)} sample PNGs but {store} holds {len(latents)} latents")
                out.latents, out.latent_index = latents.latents, latents.latent_index
                out.checkpoint = latents.checkpoint
            return out
        if _is_zarr_group(store):
            return _open_store(store)
    frame = read_manifest(path)
    split = frame["split"].to_numpy(dtype=object) if "split" in frame.columns and any(frame["split"]) else None
    return ImageSet(frame.attrs["source"], list(frame["image"]), list(frame["image"]), [int(r) for r in frame["row"]],
                    split=split)


def _open_store(path: Path) -> ImageSet:
    group = _open_zarr(path)
    attrs = dict(group.attrs)
    # named lookups, not a listing: a listing warns about the .snakemake_timestamp file that Snakemake
    # leaves in a directory() output (zarr cannot read it as a node)
    arrays = {name for name in ("latents", "paths", "split") if name in group}
    if "latents" not in arrays:
        raise DataError(f"{path}: a zarr group without a 'latents' array; expected an ldmflow latent store "
                        f"(format {STORE_FORMAT}) or samples store")
    latents = group["latents"]
    count = latents.shape[0]
    # a samples store records the autoencoder at the top level, a latent store under "autoencoder"
    ckpt = autoencoder_of_store(attrs)[0]
    ckpt = _resolve(str(ckpt), path.parent) if ckpt else None
    if StoreAttrs.format_of(attrs) == STORE_FORMAT:
        missing = {"paths", "split"} - arrays
        if missing:
            raise DataError(f"{path}: latent store without the array(s) {', '.join(sorted(missing))}")
        paths = [_resolve(p, path.parent) for p in _strings(group["paths"][:])]
        split = np.array(_strings(group["split"][:]), dtype=object)
        if len(paths) != count or len(split) != count:
            raise DataError(f"{path}: latents has {count} rows but paths {len(paths)} and split {len(split)}")
        return ImageSet(str(path), paths, list(paths), list(range(1, count + 1)), latents, np.arange(count), split,
                        ckpt, image_size=store_image_size(attrs))
    names = [f"sample_{i:05d}" for i in range(count)]
    return ImageSet(str(path), names, [None] * count, list(range(1, count + 1)), latents, np.arange(count),
                    checkpoint=ckpt)


def tensor_image_set(images: torch.Tensor, name: str = "tensor") -> ImageSet:
    """An in-memory set of images (N, C, H, W) in [-1, 1]."""
    if images.ndim != 4:
        raise ValueError(f"{name}: expected images (N, C, H, W) in [-1, 1]; got shape {tuple(images.shape)}")
    n = len(images)
    return ImageSet(name, [f"{name}_{i:05d}" for i in range(n)], [None] * n, list(range(1, n + 1)),
                    images=images.detach().float().cpu())


GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})


def image_formats(s: ImageSet, decoded_size, limit: int = 2000) -> dict[tuple[int, int, str | None], int]:
    """How many images of a set come in each (width, height, 'gray' / 'colour') as the evaluation reads them.

    Files are read by their headers only, at most ``limit`` of them spread evenly over the set (so a
    100k-image manifest costs 2000 opens). A latent store's files count at the store's ``image_size``
    (the size they were embedded at); rows with only a latent at ``decoded_size()`` (the autoencoder's),
    of unknown channels (None).
    """
    from PIL import Image, UnidentifiedImageError

    if s.images is not None:  # (N, 3, H, W)
        return {(int(s.images.shape[-1]), int(s.images.shape[-2]), "colour"): len(s)}
    if s.image_size:
        return {(s.image_size, s.image_size, None): len(s)}
    picks = np.unique(np.linspace(0, len(s) - 1, min(len(s), limit)).round().astype(np.int64)) if len(s) else []
    counts: dict[tuple[int, int, str | None], int] = {}
    for i in picks:
        path = s.paths[i]
        if path is None:
            key = (decoded_size(), decoded_size(), None)
        else:
            try:
                with Image.open(path) as img:
                    key = (img.size[0], img.size[1], "gray" if img.mode in GRAY_MODES else "colour")
            except (OSError, UnidentifiedImageError, ValueError):
                continue  # the loader names the unreadable file, with its row, when it reads it
        counts[key] = counts.get(key, 0) + 1
    return counts


class Loader:
    """Decodes, encodes and draws the rows of image sets, loading the autoencoder once when needed."""

    def __init__(self, cfg: MemorizationConfig, device: torch.device, checkpoint: str | None,
                 threads: int | None = None):
        self.cfg, self.device, self.checkpoint = cfg, device, checkpoint
        self.threads = threads or min(8, os.cpu_count() or 1)
        self._ae = None

    @property
    def autoencoder(self):
        if self._ae is None:
            from ldmflow.checkpoints import load_autoencoder

            if self.checkpoint is None:
                raise ConfigError("memorization options: key 'autoencoder' is null, and no store names an "
                                  "autoencoder_checkpoint; the latent space, decoding latents and the quality "
                                  "numbers need one (--set autoencoder=CHECKPOINT)")
            self._ae = load_autoencoder(self.checkpoint, self.device)
        return self._ae

    @property
    def ae_size(self) -> int:
        return self.autoencoder.config.data.image_size

    @property
    def channels(self) -> int:
        """The data's channels (the autoencoder's data.channels; 3 without an autoencoder): image files are
        decoded to it, so files and decoded latents compare channel for channel."""
        return (self.autoencoder.config.data.channels or 3) if self.checkpoint is not None else 3

    def unit_range(self, img: np.ndarray) -> torch.Tensor:
        """A decoded file (H, W, C) -> (C, H, W) in [-1, 1]: 8-bit 0..255; deeper data by the autoencoder's
        intensity range (what it trained with), else by the image's own per-channel min..max."""
        if img.dtype == np.uint8:
            return to_unit_range(img[None])[0]
        value_range = self.autoencoder.config.data.intensity.range if self.checkpoint is not None else None
        if value_range is None:
            flat = img.reshape(-1, img.shape[-1])
            value_range = [[float(lo), float(max(hi, lo + 1e-6))] for lo, hi in zip(flat.min(0), flat.max(0))]
        return to_unit_range(img[None], value_range)[0]

    def images(self, s: ImageSet, idx: np.ndarray, size: int) -> torch.Tensor:
        """Rows ``idx`` as (n, C, size, size) float in [-1, 1]: decoded files, tensors or decoded latents."""
        if s.images is not None:
            x = s.images[torch.from_numpy(np.asarray(idx, np.int64))]
            if x.shape[-1] != size or x.shape[-2] != size:
                x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
            return x
        have = [i for i in idx if s.paths[i] is not None]
        if len(have) < len(idx):
            if not s.has_latents:
                raise DataError(f"{s.source}: rows without an image file or a latent")
            return self._decode(s, idx, size)

        channels = self.channels

        def load(i):
            img, _ = load_row(s.paths[i], None, size, None, s.source, s.rows[i], channels)
            return self.unit_range(img)

        with ThreadPoolExecutor(self.threads) as pool:
            return torch.stack(list(pool.map(load, idx)))  # (n, C, size, size)

    def _decode(self, s: ImageSet, idx: np.ndarray, size: int) -> torch.Tensor:
        model = self.autoencoder.model
        z = self._stored_latents(s, idx).to(self.device)
        with torch.no_grad():
            bs = self.cfg.batch_size
            x = torch.cat([model.decode(z[b:b + bs])[0] for b in range(0, len(z), bs)])
        x = x.float().clamp(-1, 1).cpu()
        if x.shape[-1] != size:
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        return x

    def _stored_latents(self, s: ImageSet, idx: np.ndarray) -> torch.Tensor:
        rows = s.latent_index[np.asarray(idx, np.int64)]
        order = np.argsort(rows)  # zarr reads sorted coordinates fastest; put them back afterwards
        block = np.asarray(s.latents.get_orthogonal_selection((rows[order],)))
        out = np.empty_like(block)
        out[order] = block
        return torch.from_numpy(out.astype(np.float32))

    def latents(self, s: ImageSet, idx: np.ndarray) -> torch.Tensor:
        """Rows ``idx`` as latents (n, C, h, w): from the store when it has them, else encoded images."""
        if s.has_latents:
            return self._stored_latents(s, idx)
        model = self.autoencoder.model
        x = self.images(s, idx, self.ae_size).to(self.device)
        with torch.no_grad():
            z = [model.encode(x[b:b + self.cfg.batch_size])[0] for b in range(0, len(x), self.cfg.batch_size)]
        return torch.cat(z).float().cpu()

    def features(self, s: ImageSet, tmp_dir: Path, name: str, block: int = 256) -> Features:
        """The normalised tile-major features of a whole set in the configured feature space."""
        cfg = self.cfg
        out: Features | None = None
        for start in range(0, len(s), block):
            idx = np.arange(start, min(start + block, len(s)))
            x = self.latents(s, idx) if cfg.feature == "latent" else self.images(s, idx, cfg.image_size)
            f = tile_features(x, cfg.tiles).numpy()  # (b, T, d)
            if out is None:
                size_gb = len(s) * f[0].size * 2 / 2**30
                path = tmp_dir / f"{name}.f16" if size_gb > cfg.feature_memory_gb else None
                out = Features(len(s), f.shape[1], f.shape[2], path, map_shape=tuple(x.shape[1:]))
            out.write(start, f)
        assert out is not None
        return out
