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

import collections
import contextlib
import copy
import logging
import math
import os
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import zarr
from zarr.codecs import BloscCodec, BytesCodec

from ldmflow.artifacts import require_sha256, resolve_checkpoint
from ldmflow.data.manifest import SPLITS
from ldmflow.errors import LatentError
from ldmflow.metadata import STORE_FORMAT, LatentsInfo, StoreAttrs

log = logging.getLogger(__name__)

DTYPES = ("float16", "float32")
CHUNK_BYTES = 1 << 20  # ~1 MiB uncompressed per chunk: whole chunks per write, cheap random reads
# Latents and log-variances are stored uncompressed (float16 noise barely compresses) in larger chunks, so a
# training batch reads each of its rows straight from a chunk file (RowReader) instead of decoding a chunk
# per row; 64 MiB keeps a 1M-latent store of 32x32x4 at 128 files (all open at once in a reader) for a write
# buffer of 64 MiB per array while embedding.
RAW_CHUNK_BYTES = 64 << 20
COMPRESSOR = BloscCodec(cname="zstd", clevel=5, shuffle="shuffle")  # byte shuffle suits float16/32
MAX_OPEN_CHUNKS = 128  # chunk files a RowReader keeps open (per process)


def chunk_rows(row_bytes: int, n: int, chunk_bytes: int = CHUNK_BYTES) -> int:
    """Rows per chunk along N so that one chunk holds about ``chunk_bytes``."""
    return max(1, min(n, chunk_bytes // max(row_bytes, 1)))


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


class RowReader:
    """Rows of one store array by index, safe to use in DataLoader workers.

    An uncompressed array (the latents and log-variances of current stores) is read with one ``pread`` per
    row from its chunk files, whose layout the zarr v3 spec fixes (C order, little endian, every chunk at
    full size); the files are opened lazily in each process, at most MAX_OPEN_CHUNKS at a time, so a store
    larger than memory streams from the page cache and disk. Other arrays (compressed ones, stores of
    earlier versions) go through zarr, opened lazily in each process: a worker never uses a zarr object
    its parent made before forking.
    """

    def __init__(self, array: zarr.Array, folder: Path):
        self.folder, self.shape, self.dtype = folder, tuple(array.shape), np.dtype(array.dtype)
        self.chunk = int(array.chunks[0])
        self.row_bytes = math.prod(self.shape[1:]) * self.dtype.itemsize
        meta = array.metadata
        codecs = getattr(meta, "codecs", ())
        raw = (array.shards is None and len(codecs) == 1 and isinstance(codecs[0], BytesCodec)
               and tuple(array.chunks[1:]) == self.shape[1:] and self.dtype.byteorder in ("<", "=", "|"))
        nchunks = -(-self.shape[0] // self.chunk)
        zeros = (0,) * (len(self.shape) - 1)
        self.files = [str(folder / meta.encode_chunk_key((i, *zeros))) for i in range(nchunks)] if raw else None
        self.fill = meta.fill_value
        self._pid: int | None = None
        self._open: collections.OrderedDict[int, int | None] = collections.OrderedDict()
        self._array: zarr.Array | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_pid": None, "_open": collections.OrderedDict(), "_array": None}

    def _close_files(self) -> None:
        """Close the chunk files open in this process (after a fork: this process's copies only)."""
        for fd in self._open.values():
            if fd is not None:
                os.close(fd)

    def __del__(self) -> None:
        # this process's descriptors only; at interpreter exit the os module may already be gone
        with contextlib.suppress(Exception):
            if self._pid == os.getpid():
                self._close_files()

    def _own(self) -> None:
        """Forget what another process opened (a forked worker): its descriptors and zarr objects."""
        if self._pid != os.getpid():
            self._close_files()
            self._pid, self._open, self._array = os.getpid(), collections.OrderedDict(), None

    def _fd(self, c: int) -> int | None:
        """The open chunk file c, or None when zarr left it unwritten (all fill value)."""
        if c in self._open:
            self._open.move_to_end(c)
            return self._open[c]
        if len(self._open) >= MAX_OPEN_CHUNKS:
            old = self._open.popitem(last=False)[1]
            if old is not None:
                os.close(old)
        try:
            fd = os.open(self.files[c], os.O_RDONLY)
        except FileNotFoundError:
            fd = None
        self._open[c] = fd
        return fd

    def read(self, rows: np.ndarray) -> np.ndarray:
        """The rows (ascending reads each zarr chunk once), as (len(rows), *shape[1:]) in the stored dtype."""
        self._own()
        if self.files is None:
            if self._array is None:
                self._array = zarr.open_array(self.folder, mode="r", zarr_format=3)
            return self._array.oindex[rows]
        out = np.empty((len(rows), *self.shape[1:]), dtype=self.dtype)
        flat = out.reshape(len(rows), -1).view(np.uint8)  # (B, row_bytes)
        chunks, within = np.divmod(np.asarray(rows, dtype=np.int64), self.chunk)
        for k, (c, w) in enumerate(zip(chunks.tolist(), within.tolist())):
            fd = self._fd(c)
            if fd is None:
                out[k] = self.fill
            elif os.preadv(fd, [flat[k]], w * self.row_bytes) != self.row_bytes:
                raise LatentError(f"{self.files[c]}: chunk file shorter than its {self.chunk} rows; the store is "
                                  "damaged, rerun `ldmflow embed`")
        return out


class LatentDataset(torch.utils.data.Dataset):
    """The latents of one split, scaled by the store's ``scale_factor``, in batches like ImageDataset's.

    ``__getitems__`` returns ``latent`` float32 (B, C, h, w) already multiplied by ``scale_factor``;
    ``logvar`` (B, C, h, w) in the same scaled units when ``kl_latents == "sample"`` (so a sample is
    ``latent + exp(logvar / 2) * noise``); ``label`` int64 (B,) when the store has labels; ``mask`` uint8
    (B, H, W) only when ``masks`` is set and the store has masks (only a ControlNet reads them);
    ``index`` (B,) the positions in this dataset. The split is held in memory (in the stored dtype) when
    it fits under ``max_gb``; otherwise each batch's rows are read from the store's chunk files
    (:class:`RowReader`), so a store of any size trains in bounded memory, in DataLoader workers too.
    """

    def __init__(self, store: LatentStore | str | Path, split: str | None = "train",
                 kl_latents: Literal["mean", "sample"] = "mean", max_gb: float = 4.0, masks: bool = False):
        self.store = store if isinstance(store, LatentStore) else LatentStore(store)
        if kl_latents not in ("mean", "sample"):
            raise ValueError(f"kl_latents {kl_latents!r}; allowed: 'mean', 'sample'")
        if kl_latents == "sample" and not self.store.kl:
            raise LatentError(f"{self.store.path}: kl_latents='sample' needs a KL autoencoder's store; this one was "
                              "made by a plain autoencoder (no logvar); allowed: 'mean'")
        self.kl_latents, self.max_gb = kl_latents, max_gb
        self.rows = np.arange(self.store.n) if split is None else self.store.indices(split)
        self.scale = self.store.scale_factor
        self.names = ["latents"] + (["logvar"] if kl_latents == "sample" else []) + \
            (["masks"] if masks and self.store.masks is not None else [])
        self.labels = torch.from_numpy(self.store.labels[self.rows]) if self.store.classes is not None else None
        self._load()

    def _load(self) -> None:
        """Readers for the arrays in ``names``, and the split in memory when it fits under ``max_gb``."""
        self.readers = {k: RowReader(self.store.group[k], self.store.path / k) for k in self.names}
        row_bytes = sum(r.row_bytes for r in self.readers.values())
        self.in_memory = len(self.rows) * row_bytes <= self.max_gb * 2**30
        self.cache = {k: self._read(k, self.rows) for k in self.names} if self.in_memory else None

    @property
    def masks(self) -> bool:
        """Whether batches carry ``mask``."""
        return "masks" in self.names

    def with_masks(self) -> LatentDataset:
        """This dataset, its batches also carrying the store's ``mask`` (B, H, W) uint8 when it has masks."""
        if self.masks or self.store.masks is None:
            return self
        other = copy.copy(self)
        other.names = [*self.names, "masks"]
        other._load()
        return other

    def _read(self, name: str, rows: np.ndarray) -> np.ndarray:
        """Rows of one array for the in-memory copy; ascending rows let zarr read each chunk it touches once."""
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
            # read each needed row once, in ascending order (file by file), then restore the batch order
            wanted, inverse = np.unique(self.rows[idx], return_inverse=True)
            parts = {k: r.read(wanted)[inverse] for k, r in self.readers.items()}
        batch = {"latent": torch.from_numpy(parts["latents"]).float().mul_(self.scale)}  # (B, C, h, w)
        if "logvar" in parts:
            # Var(s z) = s^2 Var(z): log-variance in the scaled units of "latent"
            batch["logvar"] = torch.from_numpy(parts["logvar"]).float().add_(2 * math.log(self.scale))
        if self.labels is not None:
            batch["label"] = self.labels[idx]
        if "masks" in parts:
            batch["mask"] = torch.from_numpy(parts["masks"])  # (B, H, W) uint8: class ids, widened on the device
        batch["index"] = torch.from_numpy(idx)
        return batch

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[0] for k, v in self.__getitems__([i]).items()}


def store_provenance(store: LatentStore) -> LatentsInfo:
    """What a diffusion checkpoint records about its latents: enough to rebuild, sample and decode."""
    return LatentsInfo.of_store(str(store.path), store.info)
