"""Feature vectors for the memorization search: zero-mean, unit-norm, tile-major."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from ldmflow.errors import ConfigError

log = logging.getLogger(__name__)


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


def untile_features(f: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    """(N, T, d) tile-major features -> (N, C, H, W) maps of ``shape`` (C, H, W): the inverse of the cut in
    :func:`tile_features` (the values stay normalised)."""
    c, h, w = shape
    tiles = round(f.shape[1] ** 0.5)
    ys, xs = np.linspace(0, h, tiles + 1).round().astype(int), np.linspace(0, w, tiles + 1).round().astype(int)
    out = f.new_zeros(len(f), c, h, w)
    for i in range(tiles):
        for j in range(tiles):
            hy, wx = ys[i + 1] - ys[i], xs[j + 1] - xs[j]
            out[:, :, ys[i]:ys[i + 1], xs[j]:xs[j + 1]] = f[:, i * tiles + j, :c * hy * wx].reshape(-1, c, hy, wx)
    return out


class Features:
    """Feature vectors (N, T, d) float16, in memory or in a raw file read back block by block.

    The file is read with plain reads, not a memory map, so a search over a file larger than memory keeps
    only the current block resident.
    """

    def __init__(self, n: int, tiles: int, dim: int, path: Path | None = None,
                 map_shape: tuple[int, int, int] | None = None):
        self.shape = (n, tiles, dim)
        self.path = path
        self.map_shape = map_shape  # (C, H, W) of the feature map the tiles were cut from
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

    def take(self, index: np.ndarray) -> np.ndarray:
        """Rows ``index`` (any order, repeats allowed) as (len(index), T, d) float16."""
        index = np.asarray(index, np.int64)
        if self._array is not None:
            return self._array[index]
        rows, inverse = np.unique(index, return_inverse=True)
        out = np.empty((len(rows), *self.shape[1:]), np.float16)
        with open(self.path, "rb") as fh:
            for j, r in enumerate(rows):
                fh.seek(int(r) * self._row_bytes)
                out[j] = np.fromfile(fh, np.float16, self.shape[1] * self.shape[2]).reshape(self.shape[1:])
        return out[inverse.reshape(-1)]
