"""The blocked nearest-neighbour search, bounded in memory, and the tests on the neighbours."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np
import torch

from ldmflow.config.memorization import MemorizationConfig
from ldmflow.devices import get_device
from ldmflow.errors import ConfigError
from ldmflow.evaluation.features import Features, tile_features, untile_features
from ldmflow.progress import progress_bar

log = logging.getLogger(__name__)


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
def _tile_distances(qa: torch.Tensor, q_norm: torch.Tensor, ta: torch.Tensor,
                    tn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One query block against one training block: cosine similarity (q, t), largest squared tile distance
    (q, t), and the (q, t) scratch of one tile's squared distances (returned so its bytes can be counted)."""
    q, t = len(qa), len(ta)
    total = qa.new_zeros(q, t)  # (q, t) sum over tiles of squared tile distances = |a - b|^2
    d2 = qa.new_full((q, t), -math.inf)  # (q, t) largest squared tile distance
    x = qa.new_empty(q, t)  # (q, t) one tile's squared distances
    for j in range(qa.shape[1]):
        torch.mm(qa[:, j], ta[:, j].T, out=x)  # strided views of the tile: no copies
        total += x
        torch.maximum(d2, x, out=d2)
    # cos = a.b = (|a|^2 + |b|^2 - |a - b|^2) / 2, in place
    sim = total.neg_().add_(q_norm).add_(tn.sum(1)[None]).mul_(0.5)
    return sim, d2, x


def _search_query_block(qa: torch.Tensor, qn: torch.Tensor, train: Features | np.ndarray | torch.Tensor, nt: int,
                        t_block: int, k: int, n: int, device: torch.device,
                        bar) -> tuple[tuple[torch.Tensor, ...], int]:
    """Stream every training block past one query block; returns the running lists (top-k similarities and
    their indices, n smallest largest-tile distances and theirs) and the largest working set in bytes."""
    tiles, q = qa.shape[1], len(qa)
    q_norm = qn.sum(1, keepdim=True)  # (q, 1) |a|^2 of the whole vector
    best_s = qa.new_empty(q, 0)
    best_si = torch.empty(q, 0, dtype=torch.long, device=device)
    best_d, best_di = best_s.clone(), best_si.clone()
    peak = 0
    for ts in range(0, nt, t_block):
        raw = _rows(train, ts, ts + t_block)  # (t, T, d) as stored
        ta, tn = _augmented(raw, device, tiles, query=False)  # (t, T, d + 2), (t, T)
        sim, d2, x = _tile_distances(qa, q_norm, ta, tn)
        # the working set: the tensors alive in this step, the block as read and its device copy, and
        # the merges' temporaries (sizes as in block_bytes)
        live = [qa, qn, ta, tn, sim, d2, x, best_s, best_si, best_d, best_di]
        held = sum(_nbytes(v) for v in live) + 2 * _nbytes(raw) + 16 * q * len(ta) + 64 * q * (k + n)
        peak = max(peak, held)
        best_s, best_si = _merge(best_s, best_si, sim, ts, k, largest=True)
        best_d, best_di = _merge(best_d, best_di, d2, ts, n, largest=False)
        del ta, tn, sim, d2, x, raw
        bar.update()
    return (best_s, best_si, best_d, best_di), peak


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
    bar = progress_bar(math.ceil(nq / q_block) * math.ceil(nt / t_block), "nearest-neighbour search", "block")
    for qs in range(0, nq, q_block):
        qa, qn = _augmented(_rows(queries, qs, qs + q_block), device, tiles, query=True)  # (q, T, d + 2), (q, T)
        (best_s, best_si, best_d, best_di), block_peak = _search_query_block(qa, qn, train, nt, t_block, k, n,
                                                                             device, bar)
        peak = max(peak, block_peak)
        out_sim.append(best_s.cpu())
        out_idx.append(best_si.cpu())
        out_tl2.append(best_d.clamp_min(0).sqrt().cpu())
        out_tidx.append(best_di.cpu())
    bar.close()
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


@torch.no_grad()
def shift_ratio(queries: Features | np.ndarray, train: Features | np.ndarray, nb: Neighbours, *, n: int, shift: int,
                map_shape: tuple[int, int, int], memory_gb: float = 1.0, candidates: int = 50,
                device: str | torch.device | None = None) -> np.ndarray:
    """Shift-tolerant tiled-L2 ratio of each query (Q,): the smallest tiled-L2 distance between the query
    moved by up to ``shift`` feature pixels (each of the (2 shift + 1)^2 offsets, edges replicated, then
    normalised again) and any of its ``candidates`` (50) tiled-L2 nearest training items, divided by the mean
    unshifted tiled-L2 distance to its ``n`` nearest. (A copy moved by a pixel keeps its source among the
    nearest few; the cap keeps the cost flat when ``n`` is large.)

    The tiled distance (largest over tiles) keeps a noisy copy close, since noise spreads evenly over the
    tiles while a different image differs somewhere in particular; the shifts keep a copy moved by a pixel
    close; the division by the mean distance to the n nearest makes the number comparable between dense
    and sparse parts of the training set (Carlini et al. 2023).
    """
    device = get_device(str(device) if device else None)
    nq, tiles, d = _as_tiles(queries)
    n = min(n, nb.tiled_index.shape[1])
    scale = np.maximum(nb.tiled_l2[:, :n].astype(np.float64).mean(1), 1e-12)
    n = min(n, candidates)
    offsets = [(dy, dx) for dy in range(-shift, shift + 1) for dx in range(-shift, shift + 1)]
    # per query: its candidates (fp16 read, fp32 copy), its moves and the (T, S, n) distances
    block = max(1, int(memory_gb * 2**30 // (6 * n * tiles * d + 8 * len(offsets) * tiles * (d + n) + 1)))
    best = np.empty(nq)
    c, h, w = map_shape
    side = round(tiles**0.5)  # tiles per side
    for qs in range(0, nq, block):
        q = torch.from_numpy(np.asarray(_rows(queries, qs, qs + block), np.float32)).to(device)  # (q, T, d)
        idx = nb.tiled_index[qs:qs + len(q), :n]  # (q, n)
        cand = torch.from_numpy(np.asarray(train.take(idx.reshape(-1)) if isinstance(train, Features)
                                           else train[idx.reshape(-1)], np.float32)).to(device)
        cand = cand.view(len(q), n, tiles, d).permute(0, 2, 3, 1)  # (q, T, d, n)
        cand_sq = cand.square().sum(2, keepdim=True)  # (q, T, 1, n)
        padded = torch.nn.functional.pad(untile_features(q, (c, h, w)), (shift,) * 4, mode="replicate")
        # every move of the query, normalised again: (q, T, S, d); one product per tile serves all S moves
        a = torch.stack([tile_features(padded[:, :, shift + dy:shift + dy + h, shift + dx:shift + dx + w], side)
                         for dy, dx in offsets], 2)
        d2 = a.square().sum(-1, keepdim=True) + cand_sq - 2 * torch.matmul(a, cand)  # (q, T, S, n)
        low = d2.amax(1).flatten(1).amin(1)  # largest over tiles, smallest over moves and candidates
        best[qs:qs + len(q)] = low.clamp_min(0).sqrt().cpu().numpy()
    return best / scale


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
    # the calibrated criterion needs the reference (see stages.memorization); tiled_l2 stands in for it here
    combined = {"calibrated": flag_t, "tiled_l2": flag_t, "nn_ratio": flag_r, "either": flag_t | flag_r,
                "both": flag_t & flag_r}
    # fp16 storage can put a copy's similarity a hair above 1
    return {"similarity": np.clip(nb.similarity[:, 0].astype(np.float64), -1, 1),
            "tiled_l2": nb.tiled_l2[:, 0].astype(np.float64), "tiled_ratio": tiled_ratio, "nn_ratio": nn_ratio,
            "memorized_tiled_l2": flag_t, "memorized_nn_ratio": flag_r, "memorized": combined[cfg.criterion]}
