"""Stage 3: pre-embed the whole dataset with the selected autoencoder into a zarr v3 store, and read it back.

Diffusion and ControlNet train on latents, so each image is encoded once, here, instead of every epoch.
The store (a zarr v3 group) holds, for all N manifest rows in manifest order:

- ``latents`` (N, C, h, w): the posterior mean (KL variant) or z (plain), float16 by default;
- ``logvar`` (N, C, h, w): the posterior log-variance, KL variant only;
- ``labels`` (N,) int64 (-1 without labels), ``split`` (N,) and ``paths`` (N,) strings;
- ``masks`` (N, H, W) uint8 at image resolution when the manifest has masks (ControlNet's control signal).

Its attributes carry what made it (the autoencoder checkpoint's path, sha256 and resolved config, the
manifest's sha256 and the data fingerprint), the images' ``channels`` and ``intensity`` (the per-channel raw
range mapped to [-1, 1] and the files' bit depth), and ``scale_factor``: 1 / std of the train-split latents
over the whole store, the
scale-by-std of latent diffusion (Rombach et al. 2022) computed over all training data rather than one
batch. Writing streams batch by batch, so memory stays flat as the dataset grows, and the store appears
under its final name only when complete.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import zarr
from zarr.codecs import BloscCodec

from ldmflow.artifacts import require_sha256, resolve_checkpoint
from ldmflow.data.manifest import SPLITS
from ldmflow.errors import LatentError
from ldmflow.metadata import STORE_FORMAT, LatentsInfo, StoreAttrs

log = logging.getLogger(__name__)

DTYPES = ("float16", "float32")
CHUNK_BYTES = 1 << 20  # ~1 MiB uncompressed per chunk: whole chunks per write, cheap random reads
COMPRESSOR = BloscCodec(cname="zstd", clevel=5, shuffle="shuffle")  # byte shuffle suits float16/32


def chunk_rows(row_bytes: int, n: int) -> int:
    """Rows per chunk along N so that one chunk holds about CHUNK_BYTES."""
    return max(1, min(n, CHUNK_BYTES // max(row_bytes, 1)))


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------


class LatentStore:
    """A finished latent store, opened read-only and checked: format, array shapes, attributes.

    ``info`` is the typed attributes (:class:`ldmflow.metadata.StoreAttrs`), ``attrs`` the raw mapping as
    zarr holds it; ``latents``, ``logvar`` and ``masks`` are the zarr arrays
    (``logvar`` None for a plain autoencoder, ``masks`` None without masks).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(f"{self.path}: latent store not found (write one with `ldmflow embed`)")
        try:
            self.group = zarr.open_group(self.path, mode="r", zarr_format=3)
        except Exception as exc:  # zarr raises several types for a folder that is not a group
            raise LatentError(f"{self.path}: not a zarr v3 group ({type(exc).__name__}: {exc})") from None
        self.attrs = dict(self.group.attrs)
        found = StoreAttrs.format_of(self.attrs)
        if found != STORE_FORMAT:
            raise LatentError(f"{self.path}: not a complete ldmflow latent store (format attribute "
                              f"{found!r}, expected {STORE_FORMAT!r}); rerun `ldmflow embed`")
        missing = StoreAttrs.missing(self.attrs)
        if missing:
            raise LatentError(f"{self.path}: attribute(s) {', '.join(missing)} missing from a {STORE_FORMAT} store")
        self.info = StoreAttrs.from_dict(self.attrs, str(self.path))
        self._check()

    def _array(self, name: str) -> zarr.Array:
        try:
            return self.group[name]
        except KeyError:
            raise LatentError(f"{self.path}: array {name!r} is missing") from None

    def _check(self) -> None:
        a = self.info
        n, c, size = a.n, a.latent_channels, a.image_size
        h = size // a.downsample
        expected = {"latents": (n, c, h, h), "labels": (n,), "split": (n,), "paths": (n,)}
        if a.variant == "kl":
            expected["logvar"] = (n, c, h, h)
        if a.mask_classes is not None:
            expected["masks"] = (n, size, size)
        for name, shape in expected.items():
            got = self._array(name).shape
            if got != shape:
                raise LatentError(f"{self.path}: array {name!r} has shape {got}; expected {shape} from the "
                                  f"attributes (n={n}, latent_channels={c}, image_size={size}, "
                                  f"downsample={a.downsample})")
        # named lookups, not a listing: Snakemake leaves a .snakemake_timestamp file in directory outputs
        extra = [k for k in ("logvar", "masks") if k not in expected and k in self.group]
        if extra:
            raise LatentError(f"{self.path}: unexpected array(s) {', '.join(extra)} for a {a.variant} store"
                              f"{' without masks' if a.mask_classes is None else ''}")
        self.latents = self.group["latents"]
        self.logvar = self.group["logvar"] if "logvar" in expected else None
        self.masks = self.group["masks"] if "masks" in expected else None

    def __repr__(self) -> str:
        return f"LatentStore({str(self.path)!r}, n={self.n}, latents={self.latents.shape}, {self.info.variant})"

    @property
    def n(self) -> int:
        return int(self.info.n)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, h, w) of one latent."""
        return tuple(int(v) for v in self.latents.shape[1:])

    @property
    def scale_factor(self) -> float:
        return float(self.info.scale_factor)

    @property
    def classes(self) -> list[str] | None:
        return self.info.classes

    @property
    def mask_classes(self) -> int | None:
        return self.info.mask_classes

    @property
    def kl(self) -> bool:
        return self.info.variant == "kl"

    @property
    def labels(self) -> np.ndarray:
        """(N,) int64 class ids; -1 where the manifest had no labels."""
        return self.group["labels"][:]

    @property
    def split(self) -> np.ndarray:
        return self.group["split"][:].astype(object)

    @property
    def paths(self) -> list[str]:
        return [str(p) for p in self.group["paths"][:]]

    def indices(self, split: str) -> np.ndarray:
        """Row indices (ascending) of one split."""
        if split not in SPLITS:
            raise ValueError(f"split {split!r}; allowed: {', '.join(SPLITS)}")
        return np.flatnonzero(self.split == split)

    def check_autoencoder(self, checkpoint: str | Path) -> Path:
        """Refuse a checkpoint (or selected.json) other than the autoencoder that made this store."""
        path, _ = resolve_checkpoint(checkpoint)
        made_by = self.info.autoencoder
        return require_sha256(path, made_by.sha256, LatentError,
                              f"{self.path}: made by autoencoder {made_by.checkpoint}",
                              "decode with the autoencoder that made the store, or re-embed with this one")


class LatentDataset(torch.utils.data.Dataset):
    """The latents of one split, scaled by the store's ``scale_factor``, in batches like ImageDataset's.

    ``__getitems__`` returns ``latent`` float32 (B, C, h, w) already multiplied by ``scale_factor``;
    ``logvar`` (B, C, h, w) in the same scaled units when ``kl_latents == "sample"`` (so a sample is
    ``latent + exp(logvar / 2) * noise``); ``label`` int64 (B,) when the store has labels; ``mask`` int64
    (B, H, W) when it has masks; ``index`` (B,) the positions in this dataset. The split is held in memory
    (in the stored dtype) when it fits under ``max_gb``; otherwise each batch is read from the store.
    """

    def __init__(self, store: LatentStore | str | Path, split: str | None = "train",
                 kl_latents: Literal["mean", "sample"] = "mean", max_gb: float = 4.0):
        self.store = store if isinstance(store, LatentStore) else LatentStore(store)
        if kl_latents not in ("mean", "sample"):
            raise ValueError(f"kl_latents {kl_latents!r}; allowed: 'mean', 'sample'")
        if kl_latents == "sample" and not self.store.kl:
            raise LatentError(f"{self.store.path}: kl_latents='sample' needs a KL autoencoder's store; this one was "
                              "made by a plain autoencoder (no logvar); allowed: 'mean'")
        self.kl_latents = kl_latents
        self.rows = np.arange(self.store.n) if split is None else self.store.indices(split)
        self.scale = self.store.scale_factor
        self.names = ["latents"] + (["logvar"] if kl_latents == "sample" else []) + \
            (["masks"] if self.store.masks is not None else [])
        self.labels = torch.from_numpy(self.store.labels[self.rows]) if self.store.classes is not None else None
        row_bytes = sum(math.prod(self.store.group[k].shape[1:]) * self.store.group[k].dtype.itemsize
                        for k in self.names)
        self.in_memory = len(self.rows) * row_bytes <= max_gb * 2**30
        self.cache = {k: self._read(k, self.rows) for k in self.names} if self.in_memory else None

    def _read(self, name: str, rows: np.ndarray) -> np.ndarray:
        """Rows of one array; ascending rows let zarr read each chunk it touches once."""
        arr = self.store.group[name]
        if len(rows) == arr.shape[0] and (rows == np.arange(arr.shape[0])).all():
            return arr[:]
        return arr.oindex[rows]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        idx = np.asarray(indices, dtype=np.int64)
        if self.cache is not None:
            parts = {k: v[idx] for k, v in self.cache.items()}
        else:
            # read each needed row once, in ascending order (chunk by chunk), then restore the batch order
            wanted, inverse = np.unique(self.rows[idx], return_inverse=True)
            parts = {k: self._read(k, wanted)[inverse] for k in self.names}
        batch = {"latent": torch.from_numpy(parts["latents"]).float().mul_(self.scale)}  # (B, C, h, w)
        if "logvar" in parts:
            # Var(s z) = s^2 Var(z): log-variance in the scaled units of "latent"
            batch["logvar"] = torch.from_numpy(parts["logvar"]).float().add_(2 * math.log(self.scale))
        if self.labels is not None:
            batch["label"] = self.labels[idx]
        if "masks" in parts:
            batch["mask"] = torch.from_numpy(parts["masks"]).long()  # (B, H, W)
        batch["index"] = torch.from_numpy(idx)
        return batch

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[0] for k, v in self.__getitems__([i]).items()}


def store_provenance(store: LatentStore) -> LatentsInfo:
    """What a diffusion checkpoint records about its latents: enough to rebuild, sample and decode."""
    return LatentsInfo.of_store(str(store.path), store.info)
