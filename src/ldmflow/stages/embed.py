"""Stage embed: encode every image of a manifest with the selected autoencoder into a zarr latent store."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import zarr
import zarr.api.asynchronous
import zarr.storage
from zarr.core.sync import sync

from ldmflow import __version__
from ldmflow.artifacts import file_sha256, fsync_tree, publish_dir, remove_stale_temporaries, resolve_checkpoint
from ldmflow.checkpoints import load_autoencoder
from ldmflow.config.autoencoder import AutoencoderExperiment
from ldmflow.config.loading import resolved_config
from ldmflow.data.dataset import ImageDataset, NeedsCheckPass, decode_checked, plan_stream, prepare_data
from ldmflow.data.latent_store import COMPRESSOR, DTYPES, RAW_CHUNK_BYTES, chunk_rows
from ldmflow.data.manifest import SPLITS
from ldmflow.devices import get_device
from ldmflow.errors import ConfigError, LatentError
from ldmflow.metadata import AutoencoderRef, ManifestRef, StoreAttrs
from ldmflow.models.autoencoder import Autoencoder
from ldmflow.progress import progress_bar

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------------


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
    """Buffers rows of one array and writes whole chunks along N, so no chunk is rewritten.

    A full chunk is written when the next rows arrive, so the last one is left for :meth:`flush_async`, which
    writes it together with the other arrays' last chunks."""

    def __init__(self, array: zarr.Array):
        self.array, self.start, self.fill = array, 0, 0
        self.buffer = np.empty(array.chunks, dtype=array.dtype)

    def append(self, rows: np.ndarray) -> None:
        while len(rows):
            if self.fill == len(self.buffer):
                self.flush()
            take = min(len(rows), len(self.buffer) - self.fill)
            self.buffer[self.fill:self.fill + take] = rows[:take]
            self.fill += take
            rows = rows[take:]

    def flush(self) -> None:
        if self.fill:
            self.array[self.start:self.start + self.fill] = self.buffer[:self.fill]
            self.start += self.fill
            self.fill = 0

    async def flush_async(self) -> None:
        if self.fill:
            await self.array.async_array.setitem(slice(self.start, self.start + self.fill), self.buffer[:self.fill])
            self.start += self.fill
            self.fill = 0


class RawChunkWriter:
    """Appends rows of an uncompressed array straight to its chunk files, in the layout the zarr v3 spec fixes
    (C order, little endian, every chunk at full size; what latent_store.RowReader reads), so no chunk is
    held in memory: a 64 MiB chunk of latents would be, through zarr."""

    def __init__(self, array: zarr.Array, folder: Path):
        meta = array.metadata
        if np.dtype(array.dtype).byteorder not in ("<", "=", "|") or np.asarray(meta.fill_value).any():
            raise ValueError(f"{folder}: raw chunks need a little-endian array filled with zeros")
        self.folder, self.meta, self.chunk, self.done = folder, meta, int(array.chunks[0]), 0
        self.row_bytes = math.prod(array.shape[1:]) * np.dtype(array.dtype).itemsize
        self.dtype = np.dtype(array.dtype)

    def _file(self, chunk: int) -> Path:
        return self.folder / self.meta.encode_chunk_key((chunk,) + (0,) * (len(self.meta.shape) - 1))

    def append(self, rows: np.ndarray) -> None:
        data = np.ascontiguousarray(rows, dtype=self.dtype)
        while len(data):
            chunk, offset = divmod(self.done, self.chunk)
            take = min(len(data), self.chunk - offset)
            path = self._file(chunk)
            if offset == 0:
                path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "ab") as fh:  # open per batch: no descriptor outlives a failed run
                fh.write(memoryview(data[:take]).cast("B"))
            self.done += take
            data = data[take:]

    async def flush_async(self) -> None:
        """The last chunk padded to full size with the fill value (zeros)."""
        if self.done % self.chunk:
            os.truncate(self._file(self.done // self.chunk), self.chunk * self.row_bytes)


class StoreFiles:
    """zarr's writes into a dict (a MemoryStore: no trip to zarr's I/O thread and back per file), and from
    there into the folder by :meth:`spill`: metadata documents stay in memory for zarr to read back, chunks
    leave memory once written."""

    def __init__(self, folder: Path):
        self.folder, self.files, self.written = folder, {}, {}
        self.store = zarr.storage.MemoryStore(self.files)

    def spill(self) -> None:
        for key, buffer in list(self.files.items()):
            if self.written.get(key) is buffer:
                continue
            path = self.folder / key
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(buffer.to_bytes())
            if key.endswith("zarr.json"):
                self.written[key] = buffer
            else:
                del self.files[key]


class Prefetch:
    """``load(batch)`` for each batch in order, decoded by a thread pool, starting at once: the first batches
    decode while the caller creates its store.

    With ``overlap``, up to 2 x workers batches decode ahead while the caller encodes; without it, ``workers``
    batches decode at once, in parallel, only while the caller waits: when the encoder's threads take every
    core, a decoding thread beside them stalls them all. Threads, not DataLoader processes: PIL decodes and
    resizes with the GIL released, without a worker's start-up or the copies between processes, and clear
    of fork with CUDA or zarr's I/O thread. The bounded look-ahead keeps memory flat in N.
    """

    def __init__(self, load: Callable[[Sequence[int]], dict], batches: Iterable[Sequence[int]], workers: int,
                 overlap: bool = True):
        self.load, self.batches, self.overlap = load, iter(batches), overlap
        self.ahead = 2 * workers if overlap else workers
        self.pool = ThreadPoolExecutor(workers)
        self.pending: collections.deque = collections.deque()
        self._fill()

    def _fill(self) -> None:
        while len(self.pending) < self.ahead and (rows := next(self.batches, None)) is not None:
            self.pending.append(self.pool.submit(self.load, rows))

    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict:
        if not self.pending and not self.overlap:
            self._fill()
        if not self.pending:
            self.close()
            raise StopIteration
        try:
            if not self.overlap:
                wait(self.pending)  # the whole window decoded before the caller encodes again
            batch = self.pending.popleft().result()
        except BaseException:
            self.close()
            raise
        if self.overlap:
            self._fill()
        return batch

    def close(self) -> None:
        """Stop decoding: drop the batches not started, wait for those running."""
        for future in self.pending:
            future.cancel()
        self.pending.clear()
        self.pool.shutdown(wait=True)


def decoding_threads(dev: torch.device) -> tuple[int, bool]:
    """Threads that decode, and whether they decode while the encoder runs: on the CPU only on the cores that
    torch's threads leave free; with none free, every core decodes between encoder calls."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    free = cpus if dev.type != "cpu" else cpus - torch.get_num_threads()
    return (min(4, free), True) if free >= 1 else (min(4, cpus), False)


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Source:
    """What a store is embedded from: the autoencoder (its checkpoint, how it was named, sha256, model and
    config) and the manifest (its sha256, and whether the autoencoder trained on it)."""

    checkpoint: Path
    selected: Path | None
    sha256: str
    model: Autoencoder
    cfg: AutoencoderExperiment
    manifest: Path
    manifest_sha256: str | None
    trained_on_it: bool | None


def _check_options(dtype: str, batch_size: int) -> None:
    if dtype not in DTYPES:
        raise ConfigError(f"key 'dtype' has value {dtype!r}; allowed: {', '.join(DTYPES)}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"key 'batch_size' has value {batch_size!r}; allowed: integer >= 1")


def _source(checkpoint: str | Path, manifest: str | Path, dev: torch.device) -> Source:
    """The autoencoder and manifest, warning when the manifest is not the one the autoencoder trained on."""
    ckpt_path, selected = resolve_checkpoint(checkpoint)
    sha256 = file_sha256(ckpt_path)
    loaded = load_autoencoder(ckpt_path, dev)
    model = loaded.model
    if dev.type == "cpu":  # NHWC convolutions encode faster on a CPU, as they train faster (train_autoencoder)
        model = model.to(memory_format=torch.channels_last)
    manifest_sha256 = file_sha256(manifest) if Path(manifest).is_file() else None
    trained_on = loaded.meta.manifest_sha256
    same = None if not (trained_on and manifest_sha256) else trained_on == manifest_sha256
    if same is False:
        log.warning("%s differs from the manifest %s was trained on; its split (seed %d) is not the "
                    "autoencoder's", manifest, ckpt_path, loaded.config.seed)
    return Source(ckpt_path, selected, sha256, model, loaded.config, Path(manifest), manifest_sha256, same)


CONCURRENT_WRITES = 8  # chunks of labels, split and paths written at once (each a fixed-width copy of its rows)


async def _create_store(files: StoreFiles, data, cfg: AutoencoderExperiment,
                        dtype: str) -> tuple[zarr.Group, dict[str, ChunkWriter | RawChunkWriter]]:
    """The store's group and arrays, made concurrently (one round trip to zarr's I/O thread, not one per array):
    labels, split and paths written now; a chunk writer for each encoded array."""
    n, size, c = len(data.paths), cfg.data.image_size, cfg.model.latent_channels
    h = size // cfg.model.downsample
    latent = ((n, c, h, h), chunk_rows(c * h * h * np.dtype(dtype).itemsize, n, RAW_CHUNK_BYTES), dtype, None)
    # name: (shape, rows per chunk, dtype, compressors); latents uncompressed, so that training reads single
    # rows straight from the files (latent_store.RowReader)
    specs = {"latents": latent, **({"logvar": latent} if cfg.model.variant == "kl" else {}),
             **({"masks": ((n, size, size), chunk_rows(size * size, n), "uint8", COMPRESSOR)} if data.has_masks
                else {}),
             "labels": ((n,), chunk_rows(8, n), "int64", COMPRESSOR), "split": ((n,), chunk_rows(8, n), str, "auto"),
             "paths": ((n,), chunk_rows(256, n), str, "auto")}
    group = await zarr.api.asynchronous.open_group(files.store, mode="w", zarr_format=3)
    made = await asyncio.gather(*(group.create_array(name, shape=shape, chunks=(rows,) + shape[1:], dtype=kind,
                                                     compressors=compressors)
                                  for name, (shape, rows, kind, compressors) in specs.items()))
    arrays = dict(zip(specs, made))
    labels = data.labels if data.has_labels else np.full(n, -1, dtype=np.int64)
    writes = [(arrays[name], i, values, specs[name][2])
              for name, values in (("labels", labels), ("split", data.split), ("paths", data.paths))
              for i in range(0, n, specs[name][1])]
    for k in range(0, len(writes), CONCURRENT_WRITES):  # a few chunks at a time: all paths at once could be large
        await asyncio.gather(*(a.setitem(slice(i, i + a.chunks[0]), np.asarray(values[i:i + a.chunks[0]], dtype=kind))
                               for a, i, values, kind in writes[k:k + CONCURRENT_WRITES]))
    raw = {name: RawChunkWriter(zarr.Array(arrays[name]), files.folder / name) for name in ("latents", "logvar")
           if name in arrays}
    return zarr.Group(group), {**raw, **({"masks": ChunkWriter(zarr.Array(arrays["masks"]))} if data.has_masks
                                         else {})}


async def _finish_store(group: zarr.Group, writers: dict[str, ChunkWriter | RawChunkWriter], attrs: StoreAttrs) -> None:
    """The last chunks, then the attributes: the format attribute is written with the rest, last, so that a
    store without it is never taken for a whole one."""
    for w in writers.values():
        await w.flush_async()
    await group.update_attributes_async(attrs.to_dict())  # one metadata write (attrs.update writes once per key)


@dataclasses.dataclass
class Encoded:
    """The train split's latent moments and summed posterior variance (KL), over the rows encoded so far."""

    moments: RunningMoments
    posterior_var: np.ndarray
    done: int = 0


def _encode_batch(src: Source, batch: dict, writers: dict[str, ChunkWriter | RawChunkWriter], train: np.ndarray,
                  dtype: str, dev: torch.device, acc: Encoded) -> None:
    """Encode one batch, append it to the arrays and to the train split's statistics."""
    image = batch["image"].to(dev)
    if dev.type == "cpu":
        image = image.contiguous(memory_format=torch.channels_last)
    mean, logvar = src.model.encode(image)  # (B, C, h, w) each
    stored = mean.float().cpu().numpy().astype(dtype)
    if not np.isfinite(stored).all():
        rows = np.flatnonzero(~np.isfinite(stored).reshape(len(stored), -1).all(1)) + acc.done
        raise LatentError(f"{src.checkpoint}: non-finite latents for manifest row(s) {(rows + 1).tolist()[:10]}"
                          + ("; their values overflow float16, set dtype=float32" if dtype == "float16" else ""))
    writers["latents"].append(stored)
    in_train = train[acc.done:acc.done + len(stored)]
    acc.moments.update(stored[in_train])
    if "logvar" in writers:
        lv = logvar.float().cpu().numpy().astype(dtype)
        writers["logvar"].append(lv)
        acc.posterior_var += np.exp(lv[in_train].astype(np.float64)).sum(axis=(0, 2, 3))
    if "masks" in writers:
        writers["masks"].append(batch["mask"].numpy().astype(np.uint8))
    acc.done += len(stored)


def _encode_all(src: Source, batches: Iterator[dict], writers: dict[str, ChunkWriter | RawChunkWriter], data,
                dtype: str, dev: torch.device, name: str, written: Callable[[], None]) -> Encoded:
    """Encode every batch in order (``written`` after each), logging the rate every 30 s; the last chunks are
    left in the writers."""
    n, train = len(data.paths), data.split == "train"
    acc = Encoded(RunningMoments(src.cfg.model.latent_channels), np.zeros(src.cfg.model.latent_channels))
    t0, next_log = time.monotonic(), 0.0
    with torch.inference_mode(), progress_bar(n, f"embedding {name}", "img") as bar:
        for batch in batches:
            before = acc.done
            _encode_batch(src, batch, writers, train, dtype, dev, acc)
            written()
            bar.update(acc.done - before)
            if time.monotonic() >= next_log or acc.done == n:
                log.info("embedded %d / %d images (%.1f images/s)", acc.done, n, acc.done / (time.monotonic() - t0))
                next_log = time.monotonic() + 30
    if acc.done != n:
        raise LatentError(f"{name}: encoded {acc.done} of {n} rows")
    return acc


def _store_attrs(src: Source, data, dtype: str, acc: Encoded) -> StoreAttrs:
    """The finished store's attributes: what made it and the statistics of its train split."""
    std = acc.moments.overall_std()
    if not (std > 0 and math.isfinite(std)):
        raise LatentError(f"{src.checkpoint}: the train-split latents have std {std}; cannot scale them")
    cfg = src.cfg
    kl = cfg.model.variant == "kl"
    return StoreAttrs(
        n=len(data.paths), counts={s: int((data.split == s).sum()) for s in SPLITS}, dtype=dtype,
        scale_factor=1.0 / std, latent_std=std, channel_mean=acc.moments.mean.tolist(),
        channel_std=acc.moments.channel_std().tolist(), variant=cfg.model.variant, image_size=cfg.data.image_size,
        channels=data.channels,
        # raw per-channel [low, high] -> [-1, 1] (null: 8-bit, 0..255) and the files' bit depth: what
        # decoding needs to write samples back in the data's own values
        intensity={"range": data.value_range, "source_bits": data.source_bits},
        data_fingerprint=data.fingerprint, downsample=cfg.model.downsample,
        latent_channels=cfg.model.latent_channels, classes=data.classes,
        mask_classes=data.mask_classes if data.has_masks else None,
        autoencoder=AutoencoderRef(checkpoint=str(src.checkpoint.resolve()), sha256=src.sha256, name=cfg.name,
                                   selected=str(src.selected.resolve()) if src.selected else None,
                                   config=resolved_config(cfg)),  # as the checkpoint records it
        manifest=ManifestRef(path=str(src.manifest.resolve()), sha256=src.manifest_sha256,
                             autoencoder_trained_on_it=src.trained_on_it, skipped_rows=len(data.skipped)),
        # E[sigma^2] per channel: with kl_latents="sample" the latents' variance is std^2 + this
        posterior_var_mean=(acc.posterior_var / acc.moments.n).tolist() if kl else None,
        ldmflow_version=__version__, created=datetime.now(UTC).isoformat(timespec="seconds"))


def _write_store(src: Source, data, batches: Prefetch, out: Path, dtype: str, dev: torch.device,
                 finish: Callable[[], object]) -> StoreAttrs:
    """Encode ``batches`` into a temporary store beside OUT and publish it whole; ``finish`` runs once every
    batch is encoded, before the attributes are read from ``data``."""
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(out)
        files = StoreFiles(tmp)
        group, writers = sync(_create_store(files, data, src.cfg, dtype))
        files.spill()
        acc = _encode_all(src, batches, writers, data, dtype, dev, out.name, files.spill)
        finish()
        attrs = _store_attrs(src, data, dtype, acc)
        sync(_finish_store(group, writers, attrs))
        files.spill()
        fsync_tree(tmp)
        publish_dir(tmp, out)
    except BaseException:
        batches.close()  # stop decoding before the temporary store goes
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return attrs


def _embed(src: Source, data, load: Callable[[Sequence[int]], dict], out: Path, dtype: str, dev: torch.device,
           batch_size: int, finish: Callable[[], object] = lambda: None) -> Path:
    """Encode every row of ``data``, batches loaded by ``load`` in a few threads, into the store OUT."""
    cfg, n = src.cfg, len(data.paths)
    h = cfg.data.image_size // cfg.model.downsample
    log.info("embedding %d images (%d px) with %s (%s, %d x %d x %d latents) into %s", n, cfg.data.image_size,
             src.checkpoint, cfg.model.variant, cfg.model.latent_channels, h, h, out)
    batches = Prefetch(load, (range(i, min(i + batch_size, n)) for i in range(0, n, batch_size)),
                       *decoding_threads(dev))
    attrs = _write_store(src, data, batches, out, dtype, dev, finish)
    log.info("wrote %s: %d latents, scale_factor %.5g", out, n, attrs.scale_factor)
    return out


def embed_latents(checkpoint: str | Path, manifest: str | Path, out: str | Path, *, batch_size: int = 64,
                  dtype: Literal["float16", "float32"] = "float16", device: str | None = None,
                  threads: int | None = None) -> Path:
    """Encode every manifest row with an autoencoder into the zarr v3 store OUT; returns OUT.

    ``checkpoint`` is an autoencoder checkpoint or a ``selected.json`` naming one. Rows, labels, masks and
    the split come from the data layer with the autoencoder's own data config and seed, so the split is
    the one the autoencoder trained with. One pass decodes, checks and encodes each batch while a thread
    pool decodes the next ones, so every image is decoded once and memory holds a few batches whatever the
    manifest's length; a bad row stops the run with its row and file named, leaving OUT as it was.
    Where an answer needs every row first (bad rows skipped, mask classes or a percentile intensity range
    not yet known), every row is checked first and each batch is decoded again.
    """
    _check_options(dtype, batch_size)
    out = Path(out)
    dev = get_device(device)
    if threads:
        torch.set_num_threads(threads)
    src = _source(checkpoint, manifest, dev)
    cfg = src.cfg
    # the channels the encoder takes: build_autoencoder reads a config without data.channels as RGB
    channels = cfg.data.channels or 3
    check = plan_stream(manifest, cfg.data, cfg.seed, channels)
    if check is not None:
        try:
            return _embed(src, check.data, partial(decode_checked, check), out, dtype, dev, batch_size, check.finish)
        except NeedsCheckPass as exc:
            log.warning("%s; checking every row first to skip the bad ones (data.skip_bad_rows)", exc)
    # bounded memory: every row is checked, then each batch decoded again (nothing is cached)
    data = prepare_data(manifest, dataclasses.replace(cfg.data, cache_max_gb=0.0, channels=channels), cfg.seed,
                        threads)
    data.write_skipped(out.parent)
    return _embed(src, data, ImageDataset(data, split=None).__getitems__, out, dtype, dev, batch_size)
