"""Memorization evaluation: is a generated sample a copy of a training image?

Each generated sample is compared with every training image in one feature space (``pixel``: the image
at ``image_size`` pixels; ``latent``: the autoencoder's latent), with a blocked nearest-neighbour search
that never holds more than a memory budget's worth of the samples x training similarity matrix.

Every image becomes a feature vector that is **zero-mean and unit-norm** (so a global brightness or
contrast change of a copy does not hide it, and the dot product of two vectors is their cosine
similarity), stored cut into ``tiles`` x ``tiles`` spatial tiles. On these vectors:

* **similarity**: cosine similarity; the nearest training image is the most similar one.
* **tiled L2** (Carlini et al. 2023, "Extracting Training Data from Diffusion Models"): the distance of
  two images is the *largest* L2 distance between corresponding tiles, so a copy must match everywhere,
  not only on average. A sample is memorized when its tiled-L2 distance to the nearest training image,
  divided by the mean tiled-L2 distance to its ``n`` (50) nearest training images, is below ``alpha``
  (0.5). Carlini et al. use raw pixels at 512 x 512 with 16 tiles; here the tiles are of the normalised
  vectors at ``image_size``.
* **nearest / second-nearest ratio**: d1 / d2 of the (global) L2 distances ``sqrt(2 - 2 cos)`` to the
  nearest and second-nearest training images; memorized when below ``ratio`` (1/3). Two identical
  training images make d2 = d1, so duplicates in the training set hide copies of them from this test.

**Reference**: held-out real images (the validation split, or ``reference``) are compared with the
training set in the same way. They were never trained on, so their similarities show how close an image
can be to the training set by chance: a generated sample closer than any held-out image is the
memorization signal (``above_reference``), and the reference's own flag rate estimates false positives.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from .config import ConfigError, from_dict, param, to_dict, validate
from .data import IMAGE_SUFFIXES, DataError, load_row, read_manifest
from .training import atomic_write_bytes, get_device
from .viz import grid, save_png, to_uint8

log = logging.getLogger(__name__)

Feature = Literal["pixel", "latent"]
Criterion = Literal["tiled_l2", "nn_ratio", "either", "both"]
LATENT_STORE_FORMAT = "ldmflow-latents-v1"
SUMMARY_FORMAT = "ldmflow-memorization-v1"
PERCENTILES = (50, 75, 90, 95, 99)


@dataclass
class MemorizationConfig:
    feature: Feature = param("pixel", "Feature space: pixel (images at image_size) or latent (autoencoder latents).")
    image_size: int = param(
        64, "Side of the square images in the pixel feature space and in top_matches.png.", minimum=8,
    )
    tiles: int = param(4, "Tiles per side for the tiled L2 distance (4: 16 tiles, as Carlini et al. 2023).", minimum=1)
    k: int = param(5, "Nearest training images listed per sample in per_sample.csv.", minimum=2)
    n: int = param(50, "Tiled L2 test: the nearest distance is divided by the mean distance to this many "
                   "nearest training images (Carlini et al.: 50).", minimum=2)
    alpha: float = param(0.5, "Tiled L2 test: memorized when the distance ratio is below this (Carlini et al.: 0.5).",
                         exclusiveMinimum=0.0, maximum=1.0)
    ratio: float = param(1 / 3, "Nearest / second-nearest test: memorized when d1 / d2 is below this.",
                         exclusiveMinimum=0.0, maximum=1.0)
    criterion: Criterion = param(
        "tiled_l2", "Which test sets the 'memorized' column: tiled_l2, nn_ratio, either or both (all are reported).",
    )
    reference_split: Literal["val", "test"] = param(
        "val", "Split of the training manifest or store used as held-out reference when no reference is given.",
    )
    memory_gb: float = param(
        1.0, "Working memory of the nearest-neighbour search (feature blocks and similarity blocks).",
        exclusiveMinimum=0.0,
    )
    feature_memory_gb: float = param(
        4.0, "Hold the feature vectors in memory up to this size; larger sets go to a temporary file in OUT "
        "and are streamed in blocks (100k 64x64 images take 2.3 GiB).", minimum=0.0,
    )
    autoencoder: str | None = param(
        None, "Autoencoder checkpoint for the latent space and the quality features; null: the store's "
        "autoencoder_checkpoint attribute.",
    )
    quality: bool = param(True, "Also compute Fréchet distance and precision/recall in autoencoder features.")
    quality_max_images: int = param(10000, "At most this many images of each set for the quality numbers.", minimum=2)
    pr_k: int = param(3, "k of the k-NN manifolds of precision/recall (Kynkäänniemi et al. 2019: 3).", minimum=1)
    inception: str | None = param(
        None, "Local TorchScript Inception weights (e.g. inception-2015-12-05.pt) for Inception FID; null skips it.",
    )
    top_matches: int = param(16, "Most similar sample/training pairs drawn in top_matches.png.", minimum=1)
    batch_size: int = param(64, "Images per batch when decoding and encoding.", minimum=1)
    seed: int = param(0, "Seed of the subsets drawn for the quality numbers.", minimum=0)


def option_names() -> tuple[str, ...]:
    """The keys ``--set`` accepts for ``ldmflow memorization``."""
    return tuple(f.name for f in dataclasses.fields(MemorizationConfig))


def memorization_config(config: MemorizationConfig | dict | None = None, **options: Any) -> MemorizationConfig:
    """Validate options (a mapping and/or keywords) into a :class:`MemorizationConfig`; errors name the key."""
    data = to_dict(config) if isinstance(config, MemorizationConfig) else dict(config or {})
    data.update(options)
    validate(data, MemorizationConfig, "memorization options")
    return from_dict(MemorizationConfig, data)


# --------------------------------------------------------------------------------------------------
# Feature vectors: zero-mean, unit-norm, tile-major
# --------------------------------------------------------------------------------------------------


def tile_features(x: torch.Tensor, tiles: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, T, d) float32: each item zero-mean and unit-norm, cut into tiles x tiles tiles.

    Tiles of unequal size (H not a multiple of ``tiles``) are zero-padded to one length, which changes no
    dot product and no norm. The concatenated tiles are the whole normalised vector.
    """
    n, c, h, w = x.shape
    if min(h, w) < tiles:
        raise ConfigError(f"memorization options: key 'tiles' has {tiles}; allowed: at most {min(h, w)} for "
                          f"a {h}x{w} feature map")
    v = x.detach().float().reshape(n, -1)
    v = v - v.mean(1, keepdim=True)
    v = (v / v.norm(dim=1, keepdim=True).clamp_min(1e-12)).view(n, c, h, w)
    ys, xs = np.linspace(0, h, tiles + 1).round().astype(int), np.linspace(0, w, tiles + 1).round().astype(int)
    parts = [v[:, :, ys[i]:ys[i + 1], xs[j]:xs[j + 1]].reshape(n, -1) for i in range(tiles) for j in range(tiles)]
    out = v.new_zeros(n, len(parts), max(p.shape[1] for p in parts))
    for t, p in enumerate(parts):
        out[:, t, :p.shape[1]] = p
    return out


class Features:
    """Feature vectors (N, T, d) float16, in memory or in a raw file read back block by block.

    The file is read with plain reads, not a memory map, so a search over a file larger than memory keeps
    only the current block resident.
    """

    def __init__(self, n: int, tiles: int, dim: int, path: Path | None = None):
        self.shape = (n, tiles, dim)
        self.path = path
        self._row_bytes = tiles * dim * 2
        if path is None:
            self._array: np.ndarray | None = np.zeros(self.shape, np.float16)
        else:
            self._array = None
            with open(path, "wb") as fh:
                fh.truncate(n * self._row_bytes)

    def __len__(self) -> int:
        return self.shape[0]

    def write(self, start: int, block: np.ndarray) -> None:
        block = np.ascontiguousarray(block, np.float16)
        if self._array is not None:
            self._array[start:start + len(block)] = block
            return
        with open(self.path, "r+b") as fh:
            fh.seek(start * self._row_bytes)
            fh.write(block.tobytes())

    def read(self, start: int, stop: int) -> np.ndarray:
        stop = min(stop, len(self))
        if self._array is not None:
            return self._array[start:stop]
        with open(self.path, "rb") as fh:
            fh.seek(start * self._row_bytes)
            flat = np.fromfile(fh, np.float16, (stop - start) * self.shape[1] * self.shape[2])
        return flat.reshape(stop - start, *self.shape[1:])



# --------------------------------------------------------------------------------------------------
# The blocked nearest-neighbour search
# --------------------------------------------------------------------------------------------------


@dataclass
class Neighbours:
    """Nearest training items of each query, by cosine similarity and by tiled L2."""

    index: np.ndarray  # (Q, k) int64, most similar first
    similarity: np.ndarray  # (Q, k) float32 cosine similarity
    tiled_index: np.ndarray  # (Q, n) int64, nearest first
    tiled_l2: np.ndarray  # (Q, n) float32 tiled L2 distance
    stats: dict = field(default_factory=dict)  # block sizes and the largest working set measured


def block_bytes(q: int, t: int, tiles: int, dim: int, k: int, n: int) -> int:
    """Bytes a q x t step of :func:`blocked_search` holds at once (dim = tiles x per-tile length).

    Query side: the augmented fp32 block (4 q (dim + 2 tiles)), its norms and the running top lists
    (values and indices, 12 q (k + n)). Training side: the block as read (fp16) and its device copy
    (4 t dim), the augmented fp32 block and its norms. Then three (q, t) fp32 matrices (summed and largest
    tile distance, one tile's distances) and the merges of the running lists with the block (a
    concatenation and topk's workspace, 16 q t, and the index bookkeeping, 64 q (k + n)).
    """
    aug = dim + 2 * tiles
    return 4 * q * aug + 4 * t * aug + 4 * t * dim + 8 * (q + t) * tiles + 28 * q * t + 76 * q * (k + n)


def plan_blocks(n_query: int, n_train: int, tiles: int, dim: int, k: int, n: int,
                memory_bytes: float) -> tuple[int, int]:
    """Query and training block sizes whose working set (:func:`block_bytes`) fits the memory budget.

    The training set is streamed once per query block, so query blocks are made large (up to 4096) first;
    they shrink (not below 64) only until a training block of 1024 fits, and the training block then takes
    the rest of the budget.
    """
    def fitting_t(q: int) -> int:  # largest t with block_bytes(q, t) <= budget (it is linear in t)
        fixed = block_bytes(q, 0, tiles, dim, k, n)
        return int((memory_bytes - fixed) // (block_bytes(q, 1, tiles, dim, k, n) - fixed))

    q = min(n_query, 4096)
    while q > 64 and fitting_t(q) < min(n_train, 1024):
        q //= 2
    while q > 1 and fitting_t(q) < 1:
        q //= 2
    t = min(fitting_t(q), n_train)
    if t < 1:
        need = block_bytes(1, 1, tiles, dim, k, n)
        raise ConfigError(f"memorization options: key 'memory_gb' has {memory_bytes / 2**30:.3g}; allowed: at "
                          f"least {need / 2**30:.3g} for {tiles} tiles of {dim // tiles} values")
    if t == n_train and q < n_query:  # the whole training set fits: spend the rest on queries
        per_q = block_bytes(1, t, tiles, dim, k, n) - block_bytes(0, t, tiles, dim, k, n)
        q = int(min(n_query, max(q, (memory_bytes - block_bytes(0, t, tiles, dim, k, n)) // per_q)))
    return q, t


def _rows(x: Features | np.ndarray | torch.Tensor, start: int, stop: int) -> np.ndarray | torch.Tensor:
    return x.read(start, stop) if isinstance(x, Features) else x[start:stop]


def _as_tiles(x: Features | np.ndarray | torch.Tensor) -> tuple[int, int, int]:
    shape = tuple(x.shape)
    if len(shape) == 2:
        return shape[0], 1, shape[1]
    if len(shape) == 3:
        return shape  # type: ignore[return-value]
    raise ValueError(f"features must be (N, D) or (N, tiles, d); got shape {shape}")


def _augmented(block, device: torch.device, tiles: int, query: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """A stored row block (rows, T, d) -> augmented fp32 tiles (rows, T, d + 2) on the device, and tile norms.

    Per tile a query becomes [a, |a|^2, 1] and a training item [-2 b, 1, |b|^2], so that one product of
    the two is |a|^2 - 2 a.b + |b|^2 = |a - b|^2: each tile's squared distances come out of one matrix
    product with nothing to add afterwards.
    """
    x = block if torch.is_tensor(block) else torch.from_numpy(np.ascontiguousarray(block))
    x = x.to(device, non_blocking=True).reshape(len(block), tiles, -1)
    d = x.shape[-1]
    out = torch.empty(len(x), tiles, d + 2, device=device)
    norms = torch.linalg.vector_norm(x, dim=-1, dtype=torch.float32).square_()  # (rows, T)
    if query:
        out[..., :d] = x  # fp16 -> fp32
        out[..., d], out[..., d + 1] = norms, 1.0
    else:
        torch.mul(x, -2.0, out=out[..., :d])
        out[..., d], out[..., d + 1] = 1.0, norms
    return out, norms


def _nbytes(x) -> int:
    return x.nbytes if isinstance(x, np.ndarray) else x.numel() * x.element_size()


def _merge(best_v: torch.Tensor, best_i: torch.Tensor, v: torch.Tensor, offset: int, keep: int, largest: bool):
    """Merge a block's values (q, t) into running top lists (q, m) -> (q, keep), with training indices."""
    m = best_v.shape[1]
    vals, pos = torch.cat([best_v, v], 1).topk(min(keep, m + v.shape[1]), dim=1, largest=largest, sorted=True)
    if m == 0:
        return vals, pos + offset
    idx = torch.where(pos < m, best_i.gather(1, pos.clamp(max=m - 1)), pos - m + offset)
    return vals, idx


@torch.no_grad()
def blocked_search(queries: Features | np.ndarray | torch.Tensor, train: Features | np.ndarray | torch.Tensor, *,
                   k: int = 5, n: int = 50, memory_gb: float = 1.0,
                   device: str | torch.device | None = None) -> Neighbours:
    """Top-k most similar and n nearest-by-tiled-L2 training items of each query, block by block.

    ``queries`` (Q, T, d) and ``train`` (N, T, d) are normalised tile-major features (see
    :func:`tile_features`; an (N, D) array is one tile). Query blocks x training blocks are sized by
    :func:`plan_blocks` so that the working set stays within ``memory_gb``; training blocks are read
    (from memory or a file) one at a time, so the training set need not fit on the device. Runs on CUDA
    when present, in fp32 (fp16 only for storage).
    """
    device = get_device(str(device) if device else None)
    nq, tiles, d = _as_tiles(queries)
    nt, tiles_t, d_t = _as_tiles(train)
    if (tiles, d) != (tiles_t, d_t):
        raise ValueError(f"query features ({tiles} x {d}) and training features ({tiles_t} x {d_t}) differ")
    if nt < 2:
        raise ValueError(f"the nearest-neighbour tests need at least 2 training items; got {nt}")
    k, n = min(k, nt), min(n, nt)
    q_block, t_block = plan_blocks(nq, nt, tiles, tiles * d, k, n, memory_gb * 2**30)
    peak = 0
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        cuda_start = torch.cuda.memory_allocated(device)
    out_sim, out_idx, out_tl2, out_tidx = [], [], [], []
    for qs in range(0, nq, q_block):
        qa, qn = _augmented(_rows(queries, qs, qs + q_block), device, tiles, query=True)  # (q, T, d + 2), (q, T)
        q = len(qa)
        q_norm = qn.sum(1, keepdim=True)  # (q, 1) |a|^2 of the whole vector
        best_s = qa.new_empty(q, 0)
        best_si = torch.empty(q, 0, dtype=torch.long, device=device)
        best_d, best_di = best_s.clone(), best_si.clone()
        for ts in range(0, nt, t_block):
            raw = _rows(train, ts, ts + t_block)  # (t, T, d) as stored
            ta, tn = _augmented(raw, device, tiles, query=False)  # (t, T, d + 2), (t, T)
            t = len(ta)
            total = qa.new_zeros(q, t)  # (q, t) sum over tiles of squared tile distances = |a - b|^2
            d2 = qa.new_full((q, t), -math.inf)  # (q, t) largest squared tile distance
            x = qa.new_empty(q, t)  # (q, t) one tile's squared distances
            for j in range(tiles):
                torch.mm(qa[:, j], ta[:, j].T, out=x)  # strided views of the tile: no copies
                total += x
                torch.maximum(d2, x, out=d2)
            # cos = a.b = (|a|^2 + |b|^2 - |a - b|^2) / 2, in place
            sim = total.neg_().add_(q_norm).add_(tn.sum(1)[None]).mul_(0.5)
            # the working set: the tensors alive in this step, the block as read and its device copy, and
            # the merges' temporaries (sizes as in block_bytes)
            live = [qa, qn, ta, tn, sim, d2, x, best_s, best_si, best_d, best_di]
            held = sum(_nbytes(v) for v in live) + 2 * _nbytes(raw) + 16 * q * t + 64 * q * (k + n)
            peak = max(peak, held)
            best_s, best_si = _merge(best_s, best_si, sim, ts, k, largest=True)
            best_d, best_di = _merge(best_d, best_di, d2, ts, n, largest=False)
            del ta, tn, total, sim, d2, x, raw
        out_sim.append(best_s.cpu())
        out_idx.append(best_si.cpu())
        out_tl2.append(best_d.clamp_min(0).sqrt().cpu())
        out_tidx.append(best_di.cpu())
    stats = {"query_block": q_block, "train_block": t_block, "peak_bytes": peak,
             "budget_bytes": int(memory_gb * 2**30), "device": str(device)}
    if device.type == "cuda":  # the allocator's own count, on top of what was allocated before
        stats["cuda_peak_bytes"] = torch.cuda.max_memory_allocated(device) - cuda_start
    return Neighbours(torch.cat(out_idx).numpy(), torch.cat(out_sim).numpy(), torch.cat(out_tidx).numpy(),
                      torch.cat(out_tl2).numpy(), stats)


def brute_force_search(queries: np.ndarray | torch.Tensor, train: np.ndarray | torch.Tensor, k: int = 5,
                       n: int = 50) -> Neighbours:
    """The same search as :func:`blocked_search` with whole matrices in float64 (for tests and small sets)."""
    q = torch.as_tensor(np.asarray(queries), dtype=torch.float64)
    t = torch.as_tensor(np.asarray(train), dtype=torch.float64)
    if q.ndim == 2:
        q, t = q[:, None], t[:, None]
    sim = torch.einsum("qtd,ntd->qn", q, t)
    tiled = (q[:, None] - t[None]).pow(2).sum(-1).amax(-1).sqrt()  # (Q, N)
    k, n = min(k, len(t)), min(n, len(t))
    s, si = sim.topk(k, dim=1)
    dd, di = tiled.topk(n, dim=1, largest=False)
    return Neighbours(si.numpy(), s.float().numpy(), di.numpy(), dd.float().numpy())


# --------------------------------------------------------------------------------------------------
# The tests on the neighbours
# --------------------------------------------------------------------------------------------------


def neighbour_tests(nb: Neighbours, cfg: MemorizationConfig) -> dict[str, np.ndarray]:
    """Per-query numbers and flags of both tests from the search result."""
    n = min(cfg.n, nb.tiled_l2.shape[1])
    tiled_ratio = nb.tiled_l2[:, 0] / np.maximum(nb.tiled_l2[:, :n].mean(1), 1e-12)
    l2 = np.sqrt(np.clip(2 - 2 * nb.similarity[:, :2].astype(np.float64), 0, None))  # (Q, 2) global L2
    nn_ratio = l2[:, 0] / np.maximum(l2[:, 1], 1e-12)
    flag_t, flag_r = tiled_ratio < cfg.alpha, nn_ratio < cfg.ratio
    combined = {"tiled_l2": flag_t, "nn_ratio": flag_r, "either": flag_t | flag_r, "both": flag_t & flag_r}
    # fp16 storage can put a copy's similarity a hair above 1
    return {"similarity": np.clip(nb.similarity[:, 0].astype(np.float64), -1, 1),
            "tiled_l2": nb.tiled_l2[:, 0].astype(np.float64), "tiled_ratio": tiled_ratio, "nn_ratio": nn_ratio,
            "memorized_tiled_l2": flag_t, "memorized_nn_ratio": flag_r, "memorized": combined[cfg.criterion]}


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
    images: torch.Tensor | None = None  # (N, 3, H, W) in [-1, 1] for in-memory sets

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
    arrays = set(group.array_keys())
    if "latents" not in arrays:
        raise DataError(f"{path}: a zarr group without a 'latents' array; expected an ldmflow latent store "
                        f"(format {LATENT_STORE_FORMAT}) or samples store")
    latents = group["latents"]
    count = latents.shape[0]
    # a samples store records the autoencoder at the top level, a latent store under "autoencoder"
    ckpt = attrs.get("autoencoder_checkpoint") or (attrs.get("autoencoder") or {}).get("checkpoint")
    ckpt = _resolve(str(ckpt), path.parent) if ckpt else None
    if attrs.get("format") == LATENT_STORE_FORMAT:
        missing = {"paths", "split"} - arrays
        if missing:
            raise DataError(f"{path}: latent store without the array(s) {', '.join(sorted(missing))}")
        paths = [_resolve(p, path.parent) for p in _strings(group["paths"][:])]
        split = np.array(_strings(group["split"][:]), dtype=object)
        if len(paths) != count or len(split) != count:
            raise DataError(f"{path}: latents has {count} rows but paths {len(paths)} and split {len(split)}")
        return ImageSet(str(path), paths, list(paths), list(range(1, count + 1)), latents, np.arange(count), split,
                        ckpt)
    names = [f"sample_{i:05d}" for i in range(count)]
    return ImageSet(str(path), names, [None] * count, list(range(1, count + 1)), latents, np.arange(count),
                    checkpoint=ckpt)


def tensor_image_set(images: torch.Tensor, name: str = "tensor") -> ImageSet:
    """An in-memory set of images (N, 3, H, W) in [-1, 1]."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"{name}: expected images (N, 3, H, W) in [-1, 1]; got shape {tuple(images.shape)}")
    n = len(images)
    return ImageSet(name, [f"{name}_{i:05d}" for i in range(n)], [None] * n, list(range(1, n + 1)),
                    images=images.detach().float().cpu())


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
            from .autoencoder import load_autoencoder

            if self.checkpoint is None:
                raise ConfigError("memorization options: key 'autoencoder' is null, and no store names an "
                                  "autoencoder_checkpoint; the latent space, decoding latents and the quality "
                                  "numbers need one (--set autoencoder=CHECKPOINT)")
            self._ae = load_autoencoder(self.checkpoint, self.device)
        return self._ae

    @property
    def ae_size(self) -> int:
        return self.autoencoder[1].data.image_size

    def images(self, s: ImageSet, idx: np.ndarray, size: int) -> torch.Tensor:
        """Rows ``idx`` as (n, 3, size, size) float in [-1, 1]: decoded files, tensors or decoded latents."""
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

        def load(i):
            img, _ = load_row(s.paths[i], None, size, None, s.source, s.rows[i])
            return img

        with ThreadPoolExecutor(self.threads) as pool:
            arr = np.stack(list(pool.map(load, idx)))  # (n, size, size, 3) uint8
        return torch.from_numpy(arr).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)

    def _decode(self, s: ImageSet, idx: np.ndarray, size: int) -> torch.Tensor:
        model, _ = self.autoencoder
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
        model, _ = self.autoencoder
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
                out = Features(len(s), f.shape[1], f.shape[2], path)
            out.write(start, f)
        assert out is not None
        return out


# --------------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------------


def _percentiles(x: np.ndarray) -> dict[str, float] | None:
    if len(x) == 0:
        return None
    return {f"p{p}": float(v) for p, v in zip(PERCENTILES, np.percentile(x, PERCENTILES))}


def _json_safe(value):
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


def _flags(mask: np.ndarray) -> dict:
    return {"count": int(mask.sum()), "fraction": float(mask.mean()) if len(mask) else None}


def _bool_text(mask: np.ndarray) -> list[str]:
    return ["true" if m else "false" for m in mask]


def write_per_sample(path: Path, samples: ImageSet, train: ImageSet, nb: Neighbours, tests: dict,
                     above_reference: np.ndarray | None) -> None:
    """per_sample.csv: one row per generated sample with its nearest training images and the tests."""
    frame = pd.DataFrame({
        "sample": samples.names,
        "nearest": [train.names[i] for i in nb.index[:, 0]],
        "nearest_index": nb.index[:, 0],
        "similarity": tests["similarity"],
        "distance_ratio": tests["tiled_ratio"],
        "tiled_l2": tests["tiled_l2"],
        "nn_ratio": tests["nn_ratio"],
        "memorized": _bool_text(tests["memorized"]),
        "memorized_tiled_l2": _bool_text(tests["memorized_tiled_l2"]),
        "memorized_nn_ratio": _bool_text(tests["memorized_nn_ratio"]),
        "above_reference": _bool_text(above_reference) if above_reference is not None else "",
    })
    for j in range(nb.index.shape[1]):
        frame[f"neighbour_{j + 1}"] = [train.names[i] for i in nb.index[:, j]]
        frame[f"similarity_{j + 1}"] = np.clip(nb.similarity[:, j], -1, 1)
    atomic_write_bytes(path, frame.to_csv(index=False, float_format="%.6g").encode())


def write_histogram(path: Path, generated: np.ndarray, reference: np.ndarray | None, feature: str) -> None:
    """histogram.png: nearest-training-image similarity of generated samples and of held-out images."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), dpi=100)
    ax = fig.add_subplot()
    values = [generated] + ([reference] if reference is not None and len(reference) else [])
    lo, hi = min(float(v.min()) for v in values), max(float(v.max()) for v in values)
    bins = np.linspace(lo, hi + 1e-6, 41)
    ax.hist(generated, bins=bins, alpha=0.6, density=True, label=f"generated ({len(generated)})")
    if len(values) > 1:
        ax.hist(reference, bins=bins, alpha=0.6, density=True, label=f"held-out real ({len(reference)})")
        ax.axvline(float(reference.max()), color="k", linestyle="--", linewidth=1, label="held-out maximum")
    ax.set_xlabel(f"cosine similarity to the nearest training image ({feature} space)")
    ax.set_ylabel("density")
    ax.legend(loc="upper left")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())


def _generate(model, n: int, batch: int) -> torch.Tensor:
    """n images (N, 3, H, W) in [-1, 1] from ``model.sample(n)`` or a callable ``n -> images``."""
    fn = model.sample if hasattr(model, "sample") else model
    if not callable(fn):
        raise TypeError("model must have a sample(n) method or be a callable n -> images (N, 3, H, W) in [-1, 1]")
    out, left = [], n
    while left > 0:
        x = fn(min(batch, left))
        x = x["image"] if isinstance(x, dict) else x
        out.append(torch.as_tensor(x).detach().float().cpu())
        left -= len(out[-1])
    return torch.cat(out)[:n]


def _collect(batches: Iterable, limit: int | None) -> torch.Tensor:
    """Images (N, 3, H, W) from a dataloader yielding tensors or dicts with "image" (at most ``limit``)."""
    out, count = [], 0
    for batch in batches:
        x = batch["image"] if isinstance(batch, dict) else batch[0] if isinstance(batch, (list, tuple)) else batch
        out.append(torch.as_tensor(x).detach().float().cpu())
        count += len(out[-1])
        if limit is not None and count >= limit:
            break
    if not out:
        raise ValueError("the dataloader yielded no images")
    return torch.cat(out)[:limit]


def _quality(loader: Loader, train: ImageSet, samples: ImageSet, reference: ImageSet | None,
             cfg: MemorizationConfig) -> tuple[dict, dict]:
    """Fréchet distance and precision/recall in autoencoder features, and Inception FID when weights are given."""
    from . import quality

    rng = np.random.default_rng(cfg.seed)

    def pick(s: ImageSet) -> np.ndarray:
        idx = np.arange(len(s))
        if len(s) <= cfg.quality_max_images:
            return idx
        return np.sort(rng.choice(idx, cfg.quality_max_images, replace=False))

    picks = {"train": pick(train), "generated": pick(samples)}
    sets = {"train": train, "generated": samples}
    if reference is not None and len(reference):
        picks["reference"], sets["reference"] = pick(reference), reference

    def numbers(feats: dict[str, np.ndarray]) -> dict:
        out: dict[str, Any] = {"images": {k: len(v) for k, v in feats.items()}}
        for name in ("generated", "reference"):
            if name not in feats:
                continue
            if min(len(feats["train"]), len(feats[name])) <= cfg.pr_k:
                out[name] = {"skipped": f"precision/recall and Fréchet distance need more than pr_k={cfg.pr_k} "
                                        "images in each set"}
                continue
            out[name] = {"frechet_distance": quality.frechet_distance(feats["train"], feats[name]),
                         **quality.precision_recall(feats["train"], feats[name], cfg.pr_k, device=loader.device)}
        return out

    if not cfg.quality:
        ae = {"skipped": "quality=false"}
    elif loader.checkpoint is None:
        ae = {"skipped": "no autoencoder checkpoint (give a latent store, or --set autoencoder=CHECKPOINT)"}
    else:
        model, _ = loader.autoencoder
        feats = {}
        for name, s in sets.items():
            parts = [quality.autoencoder_features(model, loader.images(s, picks[name][b:b + 256], loader.ae_size),
                                                  cfg.batch_size) for b in range(0, len(picks[name]), 256)]
            feats[name] = np.concatenate(parts)
        ae = {"feature": f"autoencoder encoder features, average-pooled ({feats['train'].shape[1]} dims)",
              "checkpoint": loader.checkpoint, **numbers(feats)}

    if not cfg.inception:
        inception = {"skipped": "no Inception weights given: set inception=PATH to a local TorchScript Inception "
                                "(e.g. NVIDIA's inception-2015-12-05.pt) for Inception FID"}
    else:
        net = quality.load_inception(cfg.inception, loader.device)
        feats = {}
        for name, s in sets.items():
            parts = []
            for b in range(0, len(picks[name]), 256):
                x = loader.images(s, picks[name][b:b + 256], cfg.image_size)
                parts.append(quality.inception_features(net, torch.from_numpy(to_uint8(x)).permute(0, 3, 1, 2),
                                                        cfg.batch_size))
            feats[name] = np.concatenate(parts)
        inception = {"weights": str(cfg.inception), "image_size": cfg.image_size, **numbers(feats)}
    return ae, inception


def _evaluate(train: ImageSet, samples: ImageSet, reference: ImageSet | None, cfg: MemorizationConfig,
              out: Path | None, device: str | torch.device | None, inputs: dict, notes: list[str]) -> dict:
    device = get_device(str(device) if device else None)
    checkpoint = cfg.autoencoder or train.checkpoint or samples.checkpoint
    loader = Loader(cfg, device, checkpoint)
    if len(train) < 2:
        raise DataError(f"{train.source}: {len(train)} training image(s); the tests need at least 2")
    if len(train) < cfg.n:
        notes.append(f"{len(train)} training images: the tiled L2 test averages over {len(train)}, not n={cfg.n}")
    t0 = time.monotonic()
    work = Path(out) if out is not None else Path(tempfile.gettempdir())
    work.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".memorization-", dir=work) as tmp:
        tmp_dir = Path(tmp)
        f_train = loader.features(train, tmp_dir, "train")
        f_samples = loader.features(samples, tmp_dir, "samples")
        t_feat = time.monotonic()
        nb = blocked_search(f_samples, f_train, k=cfg.k, n=cfg.n, memory_gb=cfg.memory_gb, device=device)
        ref_nb = None
        if reference is not None and len(reference):
            f_ref = loader.features(reference, tmp_dir, "reference")
            ref_nb = blocked_search(f_ref, f_train, k=cfg.k, n=cfg.n, memory_gb=cfg.memory_gb, device=device)
        t_search = time.monotonic()
    tests = neighbour_tests(nb, cfg)
    ref_tests = neighbour_tests(ref_nb, cfg) if ref_nb is not None else None
    above = tests["similarity"] > ref_tests["similarity"].max() if ref_tests is not None else None
    if ref_tests is None:
        notes.append("no held-out reference images: give --reference, or a training manifest/store with a "
                     f"'{cfg.reference_split}' split, to calibrate the similarities")
    ae_quality, inception = _quality(loader, train, samples, reference, cfg)

    order = np.argsort(-tests["similarity"], kind="stable")[:cfg.top_matches]
    summary = {
        "format": SUMMARY_FORMAT,
        "inputs": inputs,
        "feature": cfg.feature,
        "counts": {"generated": len(samples), "training": len(train), "reference": len(reference or [])},
        "memorized": {**_flags(tests["memorized"]), "criterion": cfg.criterion},
        "tests": {
            "tiled_l2": {**_flags(tests["memorized_tiled_l2"]), "alpha": cfg.alpha, "n": min(cfg.n, len(train)),
                         "tiles": cfg.tiles * cfg.tiles,
                         "distance": "largest L2 distance between corresponding tiles of the zero-mean, unit-norm "
                                     "feature vectors; memorized when the distance to the nearest training image "
                                     "/ the mean distance to the n nearest < alpha (Carlini et al. 2023)"},
            "nn_ratio": {**_flags(tests["memorized_nn_ratio"]), "threshold": cfg.ratio,
                         "distance": "global L2 distance of the zero-mean, unit-norm feature vectors, sqrt(2 - 2 cos); "
                                     "memorized when nearest / second-nearest < threshold"},
            "above_reference": (None if above is None else
                                {**_flags(above), "threshold": float(ref_tests["similarity"].max()),
                                 "meaning": "similarity to the nearest training image above every held-out image's"}),
        },
        "similarity": "cosine similarity of the zero-mean, unit-norm feature vectors (1: identical up to brightness "
                      "and contrast)",
        "similarity_percentiles": {"generated": _percentiles(tests["similarity"]),
                                   "reference": _percentiles(ref_tests["similarity"]) if ref_tests else None},
        "reference": None if ref_tests is None else {
            "memorized_tiled_l2": _flags(ref_tests["memorized_tiled_l2"]),
            "memorized_nn_ratio": _flags(ref_tests["memorized_nn_ratio"]),
            "memorized": _flags(ref_tests["memorized"]),
            "max_similarity": float(ref_tests["similarity"].max()),
        },
        "quality": ae_quality,
        "inception_fid": inception,
        "top_matches": [{"sample": samples.names[i], "nearest": train.names[nb.index[i, 0]],
                         "similarity": float(tests["similarity"][i])} for i in order],
        "search": {**nb.stats, "feature_seconds": t_feat - t0, "search_seconds": t_search - t_feat},
        "config": to_dict(cfg),
        "notes": notes,
    }
    summary = _json_safe(summary)
    if out is not None:
        out = Path(out)
        write_per_sample(out / "per_sample.csv", samples, train, nb, tests, above)
        atomic_write_bytes(out / "summary.json", (json.dumps(summary, indent=2) + "\n").encode())
        write_histogram(out / "histogram.png", tests["similarity"],
                        ref_tests["similarity"] if ref_tests else None, cfg.feature)
        size = cfg.image_size
        columns = [to_uint8(loader.images(samples, order, size)),
                   to_uint8(loader.images(train, nb.index[order, 0], size))]
        save_png(grid(columns), out / "top_matches.png", upscale=max(1, 128 // size))
        log.info("memorization: %d of %d samples flagged (%s); wrote %s", summary["memorized"]["count"],
                 len(samples), cfg.criterion, out)
    return summary


def evaluate_memorization(train: str | Path, samples: str | Path, out: str | Path, *,
                          reference: str | Path | None = None, config: MemorizationConfig | dict | None = None,
                          device: str | torch.device | None = None, **options: Any) -> dict:
    """Compare generated samples with the training set; write per_sample.csv, summary.json and the plots.

    ``train``: a manifest CSV (its ``train`` split, or every row without a split column) or a latent store
    (rows with split ``train``). ``samples``: a folder of PNGs (with or without ``samples.zarr``), a
    samples store or a manifest. ``reference``: held-out real images (every row); by default the
    ``reference_split`` rows of ``train``. Options are :class:`MemorizationConfig` keys (``feature="latent"``
    ...). Returns the summary written to ``OUT/summary.json``.
    """
    cfg = memorization_config(config, **options)
    everything = open_image_set(train)
    notes: list[str] = []
    if everything.split is not None:
        train_set = everything.subset(np.flatnonzero(everything.split == "train"))
        if not len(train_set):
            raise DataError(f"{everything.source}: no rows with split 'train'")
    else:
        train_set = everything
        notes.append(f"{everything.source} has no split column: every row counts as a training image")
    if reference is not None:
        ref_set = open_image_set(reference)
        overlap = len(set(p for p in ref_set.paths if p) & set(p for p in train_set.paths if p))
        if overlap:
            notes.append(f"{overlap} reference image file(s) are also training images")
            log.warning("%s: %d reference image(s) are also training images", ref_set.source, overlap)
        ref_desc = str(reference)
    elif everything.split is not None and (everything.split == cfg.reference_split).any():
        ref_set = everything.subset(np.flatnonzero(everything.split == cfg.reference_split))
        ref_desc = f"{train} (split '{cfg.reference_split}')"
    else:
        ref_set, ref_desc = None, None
    sample_set = open_image_set(samples)
    inputs = {"train": str(train), "samples": str(samples), "reference": ref_desc}
    return _evaluate(train_set, sample_set, ref_set, cfg, Path(out), device, inputs, notes)


# --------------------------------------------------------------------------------------------------
# Notebook API (the original research module's names)
# --------------------------------------------------------------------------------------------------


def check_memorization(model: Any, dataloader: Iterable, num_generate: int = 100, num_training: int | None = None,
                       *, reference: Iterable | None = None, out: str | Path | None = None,
                       device: str | torch.device | None = None, **options: Any) -> dict:
    """Generate ``num_generate`` images with ``model`` and test them against ``num_training`` training images.

    ``model`` has a ``sample(n)`` method or is a callable ``n -> images`` (N, 3, H, W) in [-1, 1];
    ``dataloader`` (and ``reference``, held-out images) yield image batches or dicts with ``"image"``.
    Options are :class:`MemorizationConfig` keys. Returns the summary dict; writes the report files too
    when ``out`` is given.
    """
    cfg = memorization_config(None, **options)
    samples = tensor_image_set(_generate(model, num_generate, cfg.batch_size), "sample")
    train = tensor_image_set(_collect(dataloader, num_training), "train")
    ref = tensor_image_set(_collect(reference, None), "reference") if reference is not None else None
    inputs = {"train": "dataloader", "samples": "model", "reference": "dataloader" if ref is not None else None}
    return _evaluate(train, samples, ref, cfg, Path(out) if out is not None else None, device, inputs, [])


def compute_sample_similarity(samples: torch.Tensor, training_data: torch.Tensor, *, feature_size: int | None = None,
                              memory_gb: float = 1.0, device: str | torch.device | None = None
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest training item of each sample: indices (N,) and cosine similarities (N,) of the normalised vectors.

    Takes images (N, 3, H, W) or any (N, ...) tensors; with ``feature_size`` images are resized to it first.
    """
    def prep(x: torch.Tensor) -> torch.Tensor:
        x = torch.as_tensor(x).detach().float().cpu()
        if feature_size is not None and x.ndim == 4:
            x = F.interpolate(x, size=(feature_size, feature_size), mode="bilinear", antialias=True,
                              align_corners=False)
        v = x.reshape(len(x), -1)
        v = v - v.mean(1, keepdim=True)
        return v / v.norm(dim=1, keepdim=True).clamp_min(1e-12)

    a, b = prep(samples), prep(training_data)
    if len(b) == 1:  # the search needs two items; one training item is its own nearest
        return torch.zeros(len(a), dtype=torch.long), (a @ b.T)[:, 0]
    nb = blocked_search(a, b, k=2, n=2, memory_gb=memory_gb, device=device)
    return torch.from_numpy(nb.index[:, 0]), torch.from_numpy(nb.similarity[:, 0])


__all__ = ["MemorizationConfig", "Features", "Neighbours", "ImageSet", "blocked_search", "brute_force_search",
           "check_memorization", "compute_sample_similarity", "evaluate_memorization", "memorization_config",
           "neighbour_tests", "open_image_set", "plan_blocks", "tile_features"]
