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


SUB_BYTES = {"cpu": 16 * 2**20, "cuda": 64 * 2**20}  # tile products held at once, per device type


def block_bytes(q: int, t: int, tiles: int, dim: int, k: int, n: int, sub_bytes: int = 0) -> int:
    """Bytes a q x t step of :func:`blocked_search` holds at once (dim = tiles x per-tile length).

    Query side: the augmented fp32 block (4 q (dim + 2 tiles)), its norms and the running top lists
    (values and indices, 12 q (k + n)). Training side: the block as read (fp16) and its device copy. Then
    three times ``sub_bytes`` for one sub-block (see :func:`_sub_block`: the tile products, the training
    columns augmented and their norms), two (q, t) fp32 matrices (summed and largest tile distance), the
    selections' group leaders and gathered candidates (under 2 q t) and their index bookkeeping.
    """
    aug = dim + 2 * tiles
    return 4 * q * aug + 4 * t * dim + 8 * q * tiles + 3 * sub_bytes + 10 * q * t + 76 * q * (k + n)


def plan_blocks(n_query: int, n_train: int, tiles: int, dim: int, k: int, n: int,
                memory_bytes: float, sub_bytes: int = SUB_BYTES["cpu"]) -> tuple[int, int]:
    """Query and training block sizes whose working set (:func:`block_bytes`) fits the memory budget.

    The training set is streamed once per query block, so query blocks are made large (up to 4096) first;
    they shrink (not below 64) only until a training block of 1024 fits, and the training block then takes
    the rest of the budget. A sub-block takes at most three eighths of the budget.
    """
    sub = int(min(sub_bytes, memory_bytes / 8))

    def fitting_t(q: int) -> int:  # largest t with block_bytes(q, t) <= budget (it is linear in t)
        fixed = block_bytes(q, 0, tiles, dim, k, n, sub)
        return int((memory_bytes - fixed) // (block_bytes(q, 1, tiles, dim, k, n, sub) - fixed))

    q = min(n_query, 4096)
    while q > 64 and fitting_t(q) < min(n_train, 1024):
        q //= 2
    while q > 1 and fitting_t(q) < 1:
        q //= 2
    t = min(fitting_t(q), n_train)
    if t < 1:
        need = block_bytes(1, 1, tiles, dim, k, n, 4 * (dim + 3 * tiles))
        raise ConfigError(f"memorization options: key 'memory_gb' has {memory_bytes / 2**30:.3g}; allowed: at "
                          f"least {need / 2**30:.3g} for {tiles} tiles of {dim // tiles} values")
    if t == n_train and q < n_query:  # the whole training set fits: spend the rest on queries
        per_q = block_bytes(1, t, tiles, dim, k, n, sub) - block_bytes(0, t, tiles, dim, k, n, sub)
        q = int(min(n_query, max(q, (memory_bytes - block_bytes(0, t, tiles, dim, k, n, sub)) // per_q)))
    return q, t


def _sub_block(q: int, t: int, tiles: int, aug: int, sub_bytes: int) -> tuple[int, int]:
    """Rows and columns of the sub-blocks whose tile products (tiles, rows, columns) fit ``sub_bytes`` and
    whose training columns augmented (tiles, columns, aug) fit twice that: small enough to stay in cache
    between the product and the two reductions that read it, large enough for an efficient product."""
    rows = max(1, min(q, 512, sub_bytes // (4 * tiles * (aug + 1))))
    cols = min(sub_bytes // (4 * tiles * rows), 2 * sub_bytes // (4 * tiles * aug))
    return rows, max(1, min(t, cols))


def _rows(x: Features | np.ndarray | torch.Tensor, start: int, stop: int) -> np.ndarray | torch.Tensor:
    return x.read(start, stop) if isinstance(x, Features) else x[start:stop]


def _as_tiles(x: Features | np.ndarray | torch.Tensor) -> tuple[int, int, int]:
    shape = tuple(x.shape)
    if len(shape) == 2:
        return shape[0], 1, shape[1]
    if len(shape) == 3:
        return shape  # type: ignore[return-value]
    raise ValueError(f"features must be (N, D) or (N, tiles, d); got shape {shape}")


def _augmented(block, device: torch.device, tiles: int, query: bool,
               buffer: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A stored row block (rows, T, d) -> augmented fp32 tiles (T, rows, d + 2) on the device, and norms (T, rows).

    Per tile a query becomes [a, |a|^2, 1] and a training item [-2 b, 1, |b|^2], so that one product of
    the two is |a|^2 - 2 a.b + |b|^2 = |a - b|^2: each tile's squared distances come out of one matrix
    product with nothing to add afterwards. Tile-major, so that each tile is one contiguous matrix. Written
    into ``buffer`` (flat fp32) when given: fresh large tensors cost a page fault per 4 KiB.
    """
    x = block if torch.is_tensor(block) else torch.from_numpy(np.ascontiguousarray(block))
    x = x.to(device, non_blocking=True).reshape(len(block), tiles, -1).transpose(0, 1)  # (T, rows, d)
    d, size = x.shape[-1], (tiles, x.shape[1], x.shape[-1] + 2)
    out = torch.empty(size, device=device) if buffer is None else buffer[:math.prod(size)].view(size)
    out[..., :d] = x  # fp16 -> fp32, once: the norms and the products read the fp32 copy
    norms = torch.linalg.vector_norm(out[..., :d], dim=-1).square_()  # (T, rows)
    if query:
        out[..., d], out[..., d + 1] = norms, 1.0
    else:
        out[..., :d].mul_(-2.0)
        out[..., d], out[..., d + 1] = 1.0, norms
    return out, norms


def _nbytes(x) -> int:
    return x.nbytes if isinstance(x, np.ndarray) else x.numel() * x.element_size()


GROUP = 16  # columns per group in the selection's first pass


def _in_order(vals: torch.Tensor, idx: torch.Tensor, largest: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of (value, index) pairs sorted best first, equal values by the lower index."""
    idx, pos = idx.sort(dim=1)
    vals, pos = vals.gather(1, pos).sort(dim=1, descending=largest, stable=True)
    return vals, idx.gather(1, pos)


def _candidate_columns(v: torch.Tensor, keep: int, largest: bool, bound: torch.Tensor | None) -> torch.Tensor:
    """Columns (q, m) of each row of v (q, t) that can hold one of its keep best values; padded with t.

    The columns are cut into groups of GROUP, strided (group g: g, g + G, g + 2G, ..., so that the group
    leaders, each group's best value, come out of one pass over contiguous rows), and the columns past
    GROUP x G always take part. The keep-th best leader is at least as good as the keep-th best value, so
    only groups whose leader reaches it (or the running bound, if better) take part."""
    q, t = v.shape
    n_groups = t // GROUP
    best = torch.amax if largest else torch.amin
    leaders = best(v[:, :n_groups * GROUP].unflatten(1, (GROUP, n_groups)), 1)  # (q, G)
    edge = leaders.topk(keep, dim=1, largest=largest, sorted=False)[0]
    edge = edge.amin(1, keepdim=True) if largest else edge.amax(1, keepdim=True)
    if bound is not None:
        edge = torch.maximum(edge, bound) if largest else torch.minimum(edge, bound)
    rows, groups = (leaders >= edge if largest else leaders <= edge).nonzero(as_tuple=True)
    counts = torch.bincount(rows, minlength=q)
    rank = torch.arange(len(rows), device=v.device) - (counts.cumsum(0) - counts)[rows]  # place within the row
    chosen = torch.full((q, int(counts.max()) if len(rows) else 0), -1, dtype=torch.long, device=v.device)
    chosen[rows, rank] = groups
    cols = (chosen[..., None] + n_groups * torch.arange(GROUP, device=v.device)).flatten(1)  # (q, m)
    cols = cols.masked_fill_((chosen < 0).repeat_interleave(GROUP, 1), t)
    tail = torch.arange(n_groups * GROUP, t, device=v.device).expand(q, -1)
    return torch.cat([cols, tail], 1)


def _select(v: torch.Tensor, keep: int, largest: bool,
            bound: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``keep`` best values of each row of v (q, t) and their columns, best first, equal values by the
    lower column (so the result does not depend on the blocks); rows may end in padding (the worst value)
    where fewer than keep reach ``bound`` (q, 1).

    A top-k of every row costs about as much as the product that made it: a pass over group leaders
    (:func:`_candidate_columns`) leaves a few groups per row, and only those are ranked."""
    worst = -math.inf if largest else math.inf
    if v.shape[1] < 2 * GROUP * keep:  # a narrow block: rank it whole
        cols, vals = torch.arange(v.shape[1], device=v.device).expand(len(v), -1), v
    else:
        cols = _candidate_columns(v, keep, largest, bound)
        vals = v.gather(1, cols.clamp(max=v.shape[1] - 1)).masked_fill_(cols == v.shape[1], worst)  # (q, m)
    keep = min(keep, vals.shape[1])
    top, pos = vals.topk(min(keep + 1, vals.shape[1]), dim=1, largest=largest, sorted=True)
    # topk leaves open which of several equal values at the cut it takes: rank such rows in full
    tied = (top[:, keep - 1] == top[:, -1]) & (top[:, -1] != worst) if top.shape[1] > keep else None
    top, top_cols = top[:, :keep], cols.gather(1, pos[:, :keep])
    if tied is not None and tied.any():
        rows = tied.nonzero()[:, 0]
        r_vals, r_cols = _in_order(vals[rows], cols[rows], largest)
        top[rows], top_cols[rows] = r_vals[:, :keep], r_cols[:, :keep]
    return _in_order(top, top_cols, largest)


def _merge(best_v: torch.Tensor, best_i: torch.Tensor, v: torch.Tensor, offset: int, keep: int, largest: bool):
    """Merge a block's values (q, t) into running top lists (q, m) -> (q, keep), with training indices.

    The running lists hold lower training indices than the block, so a stable sort of the two keeps
    equal values in index order."""
    full = best_v.shape[1] == keep  # then its last value bounds what the block can add
    vals, pos = _select(v, keep, largest, best_v[:, -1:] if full else None)  # (q, <= keep)
    if best_v.shape[1] == 0:
        return vals, pos + offset
    vals, order = torch.cat([best_v, vals], 1).sort(dim=1, descending=largest, stable=True)
    idx = torch.cat([best_i, pos + offset], 1).gather(1, order)
    return vals[:, :keep], idx[:, :keep]


@torch.no_grad()
def _tile_distances(qa: torch.Tensor, raw: torch.Tensor, sub: tuple[int, int],
                    scratch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """One query block (T, q, d + 2) against one training block as stored (t, T, d), on the device: the
    similarity score (q, t) and the largest squared tile distance (q, t).

    The score is 2 a.b - |a|^2 = |b|^2 - |a - b|^2: in each row it orders the training items as the cosine
    a.b does (|a|^2 is the row's constant), so :func:`_similarity` converts only the kept values. Sub-block
    by sub-block (``sub`` rows x columns): the training columns augmented once, then per row range all
    tiles in one batched product, and the largest and the sum over the tiles while the products are still
    in cache: written to memory and read back twice, the (T, q, t) products would cost as much again as
    the product. The results are views of the flat ``scratch`` buffers (products, training columns, score,
    distance), reused from block to block."""
    tiles, q, t = qa.shape[0], qa.shape[1], len(raw)
    total, d2 = scratch[2][:q * t].view(q, t), scratch[3][:q * t].view(q, t)
    for c in range(0, t, sub[1]):
        ta, tn = _augmented(raw[c:c + sub[1]], qa.device, tiles, query=False, buffer=scratch[1])
        tb, w = ta.transpose(1, 2), ta.shape[1]  # (T, d + 2, w)
        for r in range(0, q, sub[0]):
            rows = qa[:, r:r + sub[0]]
            x = scratch[0][:tiles * rows.shape[1] * w].view(tiles, rows.shape[1], w)
            torch.bmm(rows, tb, out=x)
            torch.amax(x, 0, out=d2[r:r + sub[0], c:c + w])
            torch.sum(x, 0, out=total[r:r + sub[0], c:c + w])
        # |b|^2 - |a - b|^2 (the sum over the tiles), in place
        torch.sub(tn.sum(0)[None], total[:, c:c + w], out=total[:, c:c + w])
    return total, d2


def _similarity(score: torch.Tensor, q_norm: torch.Tensor) -> torch.Tensor:
    """Cosine a.b from the score 2 a.b - |a|^2 of :func:`_tile_distances` (q, k) and |a|^2 (q, 1)."""
    return score.add(q_norm).mul_(0.5)


def _search_query_block(qa: torch.Tensor, qn: torch.Tensor, train: Features | np.ndarray | torch.Tensor, nt: int,
                        t_block: int, k: int, n: int, sub_bytes: int,
                        bar) -> tuple[tuple[torch.Tensor, ...], int]:
    """Stream every training block past one query block; returns the running lists (top-k similarities and
    their indices, n smallest largest-tile distances and theirs) and the largest working set in bytes."""
    tiles, q, device = qa.shape[0], qa.shape[1], qa.device
    q_norm = qn.sum(0)[:, None]  # (q, 1) |a|^2 of the whole vector
    best_s = qa.new_empty(q, 0)
    best_si = torch.empty(q, 0, dtype=torch.long, device=device)
    best_d, best_di = best_s.clone(), best_si.clone()
    t_max = min(t_block, nt)  # every block's large tensors in buffers allocated once
    sub = _sub_block(q, t_max, tiles, qa.shape[2], sub_bytes)
    scratch = (qa.new_empty(tiles * sub[0] * sub[1]), qa.new_empty(tiles * sub[1] * qa.shape[2]),
               qa.new_empty(q * t_max), qa.new_empty(q * t_max))
    peak = 0
    for ts in range(0, nt, t_block):
        raw = _rows(train, ts, ts + t_block)  # (t, T, d) as stored
        block = torch.as_tensor(raw).to(device, non_blocking=True)
        sim, d2 = _tile_distances(qa, block, sub, scratch)
        # the working set: the tensors alive in this step, the block as read and its device copy, and the
        # selections' candidates and bookkeeping (sizes as in block_bytes)
        live = [qa, qn, *scratch, best_s, best_si, best_d, best_di]
        held = sum(_nbytes(v) for v in live) + 2 * _nbytes(raw) + 2 * q * len(raw) + 64 * q * (k + n)
        peak = max(peak, held)
        best_s, best_si = _merge(best_s, best_si, sim, ts, k, largest=True)
        best_d, best_di = _merge(best_d, best_di, d2, ts, n, largest=False)
        del sim, d2, raw, block
        bar.update()
    return (_similarity(best_s, q_norm), best_si, best_d, best_di), peak


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
    sub_bytes = int(min(SUB_BYTES.get(device.type, SUB_BYTES["cuda"]), memory_gb * 2**30 / 8))
    q_block, t_block = plan_blocks(nq, nt, tiles, tiles * d, k, n, memory_gb * 2**30, sub_bytes)
    peak = 0
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        cuda_start = torch.cuda.memory_allocated(device)
    out_sim, out_idx, out_tl2, out_tidx = [], [], [], []
    bar = progress_bar(math.ceil(nq / q_block) * math.ceil(nt / t_block), "nearest-neighbour search", "block")
    for qs in range(0, nq, q_block):
        qa, qn = _augmented(_rows(queries, qs, qs + q_block), device, tiles, query=True)  # (T, q, d + 2), (T, q)
        (best_s, best_si, best_d, best_di), block_peak = _search_query_block(qa, qn, train, nt, t_block, k, n,
                                                                             sub_bytes, bar)
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
    s, si = sim.sort(dim=1, descending=True, stable=True)  # equal values: the lower index first
    dd, di = tiled.sort(dim=1, stable=True)
    return Neighbours(si[:, :k].numpy(), s[:, :k].float().numpy(), di[:, :n].numpy(), dd[:, :n].float().numpy())


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
