"""Image files and image rows read a batch at a time for scoring: what the judge (:func:`ldmflow.evaluation.judge.
judge_outputs`) reads so that scoring N images holds one batch of them in memory, not N. Files are decoded as the
data pipeline decodes them (:func:`ldmflow.data.images.load_row`, then :func:`~ldmflow.data.images.to_unit_range`):
(N, C, H, W) in [-1, 1]."""

from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from ldmflow.data.images import load_row, to_unit_range
from ldmflow.errors import DataError


def _decode(paths: list[str], size: int, channels: int, source: str, threads: int, first: int = 0) -> np.ndarray:
    """Image files -> (n, size, size, C) as the data pipeline decodes them (uint8, or float32 raw values of deeper
    files); ``first``: the index of ``paths[0]`` in its set, for the row numbers of error messages."""
    def load(i: int) -> np.ndarray:
        return load_row(paths[i], None, size, None, source, first + i + 1, channels)[0]

    with ThreadPoolExecutor(threads) as pool:
        arrays = list(pool.map(load, range(len(paths))))
    return np.stack(arrays) if arrays else np.empty((0, size, size, channels), np.uint8)


def _own_range(low: np.ndarray, high: np.ndarray) -> list[list[float]]:
    """Deeper files without a recorded range: each channel's own [min, max] over the set (never empty)."""
    return [[float(lo), float(max(hi, lo + 1e-6))] for lo, hi in zip(low, high)]


def read_images(paths: list[str], size: int, channels: int, value_range: list[list[float]] | None, source: str,
                threads: int = 4) -> torch.Tensor:
    """Image files -> (N, C, size, size) in [-1, 1]: decoded, resized and scaled as the data pipeline does.
    All N at once: to score many files, read them a batch at a time with :class:`ImageFiles`."""
    stack = _decode(paths, size, channels, source, threads)
    if stack.dtype != np.uint8 and value_range is None:
        flat = stack.reshape(-1, stack.shape[-1])
        value_range = _own_range(flat.min(0), flat.max(0))
    return to_unit_range(stack, value_range if stack.dtype != np.uint8 else None)


@dataclass
class ImageFiles:
    """Image files as :func:`read_images` reads them, but a batch at a time: ``files[lo:hi]`` -> (n, C, size,
    size) in [-1, 1], ``len(files)`` -> N. :func:`judge_outputs` reads it so, holding one batch of images, not N.

    Deeper files without a recorded ``value_range`` are scaled by the whole set's own range, as
    :func:`read_images` scales them: found by one extra pass over the files when the first deep batch is read.
    A set mixing 8-bit and deeper files stops with a :class:`DataError` (read at once, its 8-bit files would be
    scaled by the deeper files' range, which a batch read before the first deep file cannot know)."""

    paths: list[str]
    size: int
    channels: int
    value_range: list[list[float]] | None
    source: str
    threads: int = 4
    _deep: bool | None = dataclasses.field(default=None, repr=False)  # the batches read so far were deeper

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, rows: slice) -> torch.Tensor:
        start = rows.indices(len(self.paths))[0]
        stack = _decode(self.paths[rows], self.size, self.channels, self.source, self.threads, start)
        if not len(stack):
            return to_unit_range(stack)
        deep = stack.dtype != np.uint8
        if self._deep is not None and deep != self._deep:
            raise DataError(f"{self.source}: 8-bit and deeper image files in one set; convert them to one bit depth")
        self._deep = deep
        if deep and self.value_range is None:
            self.value_range = self._range()
        return to_unit_range(stack, self.value_range if deep else None)

    def _range(self, batch: int = 256) -> list[list[float]]:
        """Each channel's [min, max] over every file, a batch of files at a time."""
        low = high = None
        for lo in range(0, len(self.paths), batch):
            flat = _decode(self.paths[lo:lo + batch], self.size, self.channels, self.source, self.threads, lo)
            flat = flat.reshape(-1, flat.shape[-1])
            low = flat.min(0) if low is None else np.minimum(low, flat.min(0))
            high = flat.max(0) if high is None else np.maximum(high, flat.max(0))
        return _own_range(low, high)


@dataclass
class Rows:
    """Some rows of images (N, C, H, W), gathered a batch at a time as they are scored rather than copied at once:
    ``Rows(images, rows)[lo:hi]`` is ``images[rows[lo:hi]]``."""

    images: torch.Tensor
    rows: np.ndarray

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, part: slice) -> torch.Tensor:
        return self.images[self.rows[part]]


@dataclass
class DecodedLatents:
    """Latents (N, c, h, w) (a tensor or an array, e.g. a zarr array, read a slice at a time) as the images
    (N, C, H, W) in [-1, 1] that ``decoder`` decodes from them, a slice at a time: ``decoded[lo:hi]``. Each
    image is decoded in the same batch of ``chunk`` (rows ``chunk * i`` onwards) whichever slice asks for it,
    so that it comes out the same as from one pass over all the latents in chunks."""

    latents: object
    decoder: torch.nn.Module
    chunk: int = 64

    def __len__(self) -> int:
        return self.latents.shape[0]

    @torch.no_grad()
    def __getitem__(self, rows: slice) -> torch.Tensor:
        lo, hi, _ = rows.indices(len(self))
        first = lo - lo % self.chunk
        device = next(self.decoder.parameters()).device
        parts = [self.decoder.decode(torch.as_tensor(np.asarray(self.latents[i:i + self.chunk], np.float32))
                                     .to(device))[0].float().clamp(-1, 1).cpu() for i in range(first, hi, self.chunk)]
        if not parts:
            return torch.empty(0)
        return torch.cat(parts)[lo - first:hi - first]
