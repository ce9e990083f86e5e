"""Stage 3: pre-embed the whole dataset with the selected autoencoder into a zarr v3 store, and read it back.

Diffusion and ControlNet train on latents, so each image is encoded once, here, instead of every epoch.
The store (a zarr v3 group) holds, for all N manifest rows in manifest order:

- ``latents`` (N, C, h, w): the posterior mean (KL variant) or z (plain), float16 by default;
- ``logvar`` (N, C, h, w): the posterior log-variance, KL variant only;
- ``labels`` (N,) int64 (-1 without labels), ``split`` (N,) and ``paths`` (N,) strings;
- ``masks`` (N, H, W) uint8 at image resolution when the manifest has masks (ControlNet's control signal).

Its attributes carry what made it (the autoencoder checkpoint's path, sha256 and resolved config, the
manifest's sha256) and ``scale_factor``: 1 / std of the train-split latents over the whole store, the
scale-by-std of latent diffusion (Rombach et al. 2022) computed over all training data rather than one
batch. Writing streams batch by batch, so memory stays flat as the dataset grows, and the store appears
under its final name only when complete.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import math
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterable, Iterator, Literal, Sequence

import numpy as np
import torch
import zarr
from zarr.codecs import BloscCodec

from . import __version__
from .autoencoder import Autoencoder
from .autoencoder import load_autoencoder as load_autoencoder_checkpoint
from .config import AutoencoderExperiment, ConfigError, to_dict
from .data import SPLITS, DataError, ImageDataset, prepare_data
from .train_ae import file_sha256
from .training import get_device, load_checkpoint

log = logging.getLogger(__name__)

STORE_FORMAT = "ldmflow-latents-v1"
DTYPES = ("float16", "float32")
REQUIRED_ATTRS = ("n", "scale_factor", "variant", "image_size", "downsample", "latent_channels", "classes",
                  "mask_classes", "autoencoder")
CHUNK_BYTES = 1 << 20  # ~1 MiB uncompressed per chunk: whole chunks per write, cheap random reads
COMPRESSOR = BloscCodec(cname="zstd", clevel=5, shuffle="shuffle")  # byte shuffle suits float16/32


class LatentError(DataError):
    """A latent store is incomplete, inconsistent, or was made by another autoencoder; names the path."""


# --------------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------------


def resolve_checkpoint(checkpoint: str | Path) -> tuple[Path, Path | None]:
    """An autoencoder checkpoint path from a ``.pt`` file or a ``selected.json``: (checkpoint, selected)."""
    path = Path(checkpoint)
    if path.suffix != ".json":
        if not path.is_file():
            raise FileNotFoundError(f"{path}: autoencoder checkpoint not found")
        return path, None
    try:
        chosen = json.loads(path.read_text())["checkpoint"]
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: selection file not found") from None
    except (json.JSONDecodeError, KeyError, TypeError):
        raise ConfigError(f"{path}: expected a selected.json written by `ldmflow select-ae`, with the key "
                          "'checkpoint'") from None
    if not Path(chosen).is_file():
        raise FileNotFoundError(f"{path}: key 'checkpoint' names {chosen}, which does not exist")
    return Path(chosen), path


def chunk_rows(row_bytes: int, n: int) -> int:
    """Rows per chunk along N so that one chunk holds about CHUNK_BYTES."""
    return max(1, min(n, CHUNK_BYTES // max(row_bytes, 1)))


class RunningMoments:
    """Per-channel mean and variance in float64, merged batch by batch (Chan et al.'s parallel update)."""

    def __init__(self, channels: int):
        self.n = 0
        self.mean = np.zeros(channels, dtype=np.float64)
        self.m2 = np.zeros(channels, dtype=np.float64)

    def update(self, x: np.ndarray) -> None:
        """Add a batch (B, C, h, w)."""
        x = x.astype(np.float64)
        nb = x.shape[0] * x.shape[2] * x.shape[3]
        if nb == 0:
            return
        mean_b = x.mean(axis=(0, 2, 3))
        m2_b = ((x - mean_b[None, :, None, None]) ** 2).sum(axis=(0, 2, 3))
        total = self.n + nb
        delta = mean_b - self.mean
        self.mean += delta * nb / total
        self.m2 += m2_b + delta**2 * self.n * nb / total
        self.n = total

    def channel_std(self) -> np.ndarray:
        return np.sqrt(self.m2 / self.n)

    def overall_std(self) -> float:
        """The std of all values together (every channel has n values): what scale-by-std divides by."""
        grand = self.mean.mean()
        m2 = self.m2.sum() + (self.n * (self.mean - grand) ** 2).sum()
        return float(np.sqrt(m2 / (self.n * len(self.mean))))


class ChunkWriter:
    """Buffers rows of one array and writes whole chunks along N, so no chunk is rewritten."""

    def __init__(self, array: zarr.Array):
        self.array, self.start, self.fill = array, 0, 0
        self.buffer = np.empty(array.chunks, dtype=array.dtype)

    def append(self, rows: np.ndarray) -> None:
        while len(rows):
            take = min(len(rows), len(self.buffer) - self.fill)
            self.buffer[self.fill:self.fill + take] = rows[:take]
            self.fill += take
            rows = rows[take:]
            if self.fill == len(self.buffer):
                self.flush()

    def flush(self) -> None:
        if self.fill:
            self.array[self.start:self.start + self.fill] = self.buffer[:self.fill]
            self.start += self.fill
            self.fill = 0


def prefetch(load: Callable[[Sequence[int]], dict], batches: Iterable[Sequence[int]], workers: int) -> Iterator[dict]:
    """``load(batch)`` for each batch in order, decoded by a thread pool up to 2 x workers batches ahead.

    Threads, not DataLoader processes: PIL decodes and resizes with the GIL released, so threads overlap
    decoding with encoding as well as processes do, and on a busy 2-core machine measured faster (no
    worker start-up, no copies between processes); they also stay clear of fork with CUDA or zarr's I/O
    thread. The bounded look-ahead keeps memory flat.
    """
    with ThreadPoolExecutor(workers) as pool:
        pending: collections.deque = collections.deque()
        for rows in batches:
            pending.append(pool.submit(load, rows))
            if len(pending) > 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _fsync_tree(root: Path) -> None:
    """Flush every file and folder of a store to disk before the rename makes it visible."""
    for folder, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _remove_stale_temporaries(out: Path) -> None:
    """Remove temporary stores of earlier runs that were killed (their process no longer exists)."""
    for kind in ("tmp", "old"):
        for tmp in out.parent.glob(f".{out.name}.{kind}*"):
            pid = tmp.name.rsplit(f".{kind}", 1)[-1]
            if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
                log.info("removing %s, left by an interrupted run", tmp)
                shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _publish(tmp: Path, out: Path) -> None:
    """Move a finished store to its final name, replacing an older store only once the new one is whole."""
    if out.exists():
        old = out.with_name(f".{out.name}.old{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------


def embed_latents(checkpoint: str | Path, manifest: str | Path, out: str | Path, *, batch_size: int = 64,
                  dtype: Literal["float16", "float32"] = "float16", device: str | None = None,
                  threads: int | None = None) -> Path:
    """Encode every manifest row with an autoencoder into the zarr v3 store OUT; returns OUT.

    ``checkpoint`` is an autoencoder checkpoint or a ``selected.json`` naming one. Rows, labels, masks and
    the split come from the data layer with the autoencoder's own data config and seed, so the split is
    the one the autoencoder trained with. Images are decoded by a thread pool while the encoder runs.
    """
    if dtype not in DTYPES:
        raise ConfigError(f"key 'dtype' has value {dtype!r}; allowed: {', '.join(DTYPES)}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"key 'batch_size' has value {batch_size!r}; allowed: integer >= 1")
    ckpt_path, selected = resolve_checkpoint(checkpoint)
    out = Path(out)
    dev = get_device(device)
    if threads:
        torch.set_num_threads(threads)

    ae_sha256 = file_sha256(ckpt_path)
    state = load_checkpoint(ckpt_path)
    trained_on = (state.get("extra") or {}).get("manifest_sha256")
    del state
    model, cfg = load_autoencoder_checkpoint(ckpt_path, dev)
    manifest_sha256 = file_sha256(manifest) if Path(manifest).is_file() else None
    if trained_on and manifest_sha256 and trained_on != manifest_sha256:
        log.warning("%s differs from the manifest %s was trained on; its split (seed %d) is not the "
                    "autoencoder's", manifest, ckpt_path, cfg.seed)

    # cache_max_gb=0: every row is decoded and checked now, none is kept; batches are decoded again below
    data = prepare_data(manifest, dataclasses.replace(cfg.data, cache_max_gb=0.0), cfg.seed, threads)
    data.write_skipped(out.parent)
    n, size, f, c = len(data.paths), cfg.data.image_size, cfg.model.downsample, cfg.model.latent_channels
    h = size // f
    kl = cfg.model.variant == "kl"
    log.info("embedding %d images (%d px) with %s (%s, %d x %d x %d latents) into %s", n, size, ckpt_path,
             cfg.model.variant, c, h, h, out)

    dataset = ImageDataset(data, split=None)
    batches = prefetch(dataset.__getitems__, (range(i, min(i + batch_size, n)) for i in range(0, n, batch_size)),
                       workers=min(4, threads or os.cpu_count() or 1))

    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(out)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    try:
        group = zarr.open_group(tmp, mode="w", zarr_format=3)
        latent_bytes = c * h * h * np.dtype(dtype).itemsize

        def array(name: str, shape: tuple, kind, row_bytes: int, compress: bool = True) -> zarr.Array:
            return group.create_array(name, shape=shape, chunks=(chunk_rows(row_bytes, n),) + shape[1:], dtype=kind,
                                      compressors=COMPRESSOR if compress else "auto")

        writers = {"latents": ChunkWriter(array("latents", (n, c, h, h), dtype, latent_bytes))}
        if kl:
            writers["logvar"] = ChunkWriter(array("logvar", (n, c, h, h), dtype, latent_bytes))
        if data.has_masks:
            writers["masks"] = ChunkWriter(array("masks", (n, size, size), "uint8", size * size))
        labels = data.labels if data.has_labels else np.full(n, -1, dtype=np.int64)
        for name, kind, row_bytes, values in (("labels", "int64", 8, labels), ("split", str, 8, data.split),
                                              ("paths", str, 256, data.paths)):
            target = array(name, (n,), kind, row_bytes, compress=kind != str)
            step = target.chunks[0]
            for i in range(0, n, step):  # chunk by chunk: a fixed-width copy of all paths could be large
                target[i:i + step] = np.asarray(values[i:i + step], dtype=kind)

        train = data.split == "train"
        moments, posterior_var = RunningMoments(c), np.zeros(c, dtype=np.float64)
        done, t0, next_log = 0, time.monotonic(), 0.0
        with torch.inference_mode():
            for batch in batches:
                mean, logvar = model.encode(batch["image"].to(dev))  # (B, C, h, w) each
                stored = mean.float().cpu().numpy().astype(dtype)
                if not np.isfinite(stored).all():
                    rows = np.flatnonzero(~np.isfinite(stored).reshape(len(stored), -1).all(1)) + done
                    raise LatentError(
                        f"{ckpt_path}: non-finite latents for manifest row(s) {(rows + 1).tolist()[:10]}"
                        + ("; their values overflow float16, set dtype=float32" if dtype == "float16" else ""))
                writers["latents"].append(stored)
                in_train = train[done:done + len(stored)]
                moments.update(stored[in_train])
                if kl:
                    lv = logvar.float().cpu().numpy().astype(dtype)
                    writers["logvar"].append(lv)
                    posterior_var += np.exp(lv[in_train].astype(np.float64)).sum(axis=(0, 2, 3))
                if "masks" in writers:
                    writers["masks"].append(batch["mask"].numpy().astype(np.uint8))
                done += len(stored)
                if time.monotonic() >= next_log or done == n:
                    log.info("embedded %d / %d images (%.1f images/s)", done, n, done / (time.monotonic() - t0))
                    next_log = time.monotonic() + 30
        for w in writers.values():
            w.flush()
        if done != n:
            raise LatentError(f"{tmp}: encoded {done} of {n} rows")

        std = moments.overall_std()
        if not (std > 0 and math.isfinite(std)):
            raise LatentError(f"{ckpt_path}: the train-split latents have std {std}; cannot scale them")
        attrs = {
            "format": STORE_FORMAT,
            "n": n,
            "counts": {s: int((data.split == s).sum()) for s in SPLITS},
            "dtype": dtype,
            "scale_factor": 1.0 / std,
            "latent_std": std,
            "channel_mean": moments.mean.tolist(),
            "channel_std": moments.channel_std().tolist(),
            "variant": cfg.model.variant,
            "image_size": size,
            "downsample": f,
            "latent_channels": c,
            "classes": data.classes,
            "mask_classes": data.mask_classes if data.has_masks else None,
            "autoencoder": {"checkpoint": str(ckpt_path.resolve()), "sha256": ae_sha256, "name": cfg.name,
                            "selected": str(selected.resolve()) if selected else None,
                            "config": to_dict(cfg)},
            "manifest": {"path": str(Path(manifest).resolve()), "sha256": manifest_sha256,
                         "autoencoder_trained_on_it": None if not (trained_on and manifest_sha256)
                         else trained_on == manifest_sha256, "skipped_rows": len(data.skipped)},
            "ldmflow_version": __version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        if kl:
            # E[sigma^2] per channel: with kl_latents="sample" the latents' variance is std^2 + this
            attrs["posterior_var_mean"] = (posterior_var / moments.n).tolist()
        # the format attribute is written last: a store without it is never taken for a complete one
        group.attrs.update(attrs)
        _fsync_tree(tmp)
        _publish(tmp, out)
    except BaseException:
        batches.close()  # stop decoding before the temporary store goes
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote %s: %d latents, scale_factor %.5g", out, n, attrs["scale_factor"])
    return out


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------


class LatentStore:
    """A finished latent store, opened read-only and checked: format, array shapes, attributes.

    ``attrs`` is the attribute mapping; ``latents``, ``logvar`` and ``masks`` are the zarr arrays
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
        if self.attrs.get("format") != STORE_FORMAT:
            raise LatentError(f"{self.path}: not a complete ldmflow latent store (format attribute "
                              f"{self.attrs.get('format')!r}, expected {STORE_FORMAT!r}); rerun `ldmflow embed`")
        self._check()

    def _array(self, name: str) -> zarr.Array:
        try:
            return self.group[name]
        except KeyError:
            raise LatentError(f"{self.path}: array {name!r} is missing") from None

    def _check(self) -> None:
        a = self.attrs
        missing = [k for k in REQUIRED_ATTRS if k not in a]
        if missing:
            raise LatentError(f"{self.path}: attribute(s) {', '.join(missing)} missing from a {STORE_FORMAT} store")
        n, c, size = a["n"], a["latent_channels"], a["image_size"]
        h = size // a["downsample"]
        expected = {"latents": (n, c, h, h), "labels": (n,), "split": (n,), "paths": (n,)}
        if a["variant"] == "kl":
            expected["logvar"] = (n, c, h, h)
        if a["mask_classes"] is not None:
            expected["masks"] = (n, size, size)
        for name, shape in expected.items():
            got = self._array(name).shape
            if got != shape:
                raise LatentError(f"{self.path}: array {name!r} has shape {got}; expected {shape} from the "
                                  f"attributes (n={n}, latent_channels={c}, image_size={size}, "
                                  f"downsample={a['downsample']})")
        # named lookups, not a listing: Snakemake leaves a .snakemake_timestamp file in directory outputs
        extra = [k for k in ("logvar", "masks") if k not in expected and k in self.group]
        if extra:
            raise LatentError(f"{self.path}: unexpected array(s) {', '.join(extra)} for a {a['variant']} store"
                              f"{' without masks' if a['mask_classes'] is None else ''}")
        self.latents = self.group["latents"]
        self.logvar = self.group["logvar"] if "logvar" in expected else None
        self.masks = self.group["masks"] if "masks" in expected else None

    def __repr__(self) -> str:
        return f"LatentStore({str(self.path)!r}, n={self.n}, latents={self.latents.shape}, {self.attrs['variant']})"

    @property
    def n(self) -> int:
        return int(self.attrs["n"])

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, h, w) of one latent."""
        return tuple(int(v) for v in self.latents.shape[1:])

    @property
    def scale_factor(self) -> float:
        return float(self.attrs["scale_factor"])

    @property
    def classes(self) -> list[str] | None:
        return self.attrs["classes"]

    @property
    def mask_classes(self) -> int | None:
        return self.attrs["mask_classes"]

    @property
    def kl(self) -> bool:
        return self.attrs["variant"] == "kl"

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
        made_by = self.attrs["autoencoder"]
        sha = file_sha256(path)
        if sha != made_by["sha256"]:
            raise LatentError(
                f"{self.path}: made by autoencoder {made_by['checkpoint']} (sha256 {made_by['sha256'][:12]}...), "
                f"but {path} has sha256 {sha[:12]}...; decode with the autoencoder that made the store, or "
                "re-embed with this one")
        return path

    def load_autoencoder(self, device: str | torch.device | None = None,
                         checkpoint: str | Path | None = None) -> tuple[Autoencoder, AutoencoderExperiment]:
        """The autoencoder that made this store (the recorded checkpoint, or a moved copy of it), checked
        by sha256, in eval mode."""
        path = self.check_autoencoder(checkpoint or self.attrs["autoencoder"]["checkpoint"])
        return load_autoencoder_checkpoint(path, get_device(None if device is None else str(device)))


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
