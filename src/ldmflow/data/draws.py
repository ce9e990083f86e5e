"""Seeded draws of rows, stratified by class: every subset of real rows an evaluation or a synthetic set uses.

A manifest laid out as a lab lays it out (class folders, sorted) puts each class in one run of rows, so the
first N rows of a split hold one or two classes. These draws take rows of every class in proportion to its
share (or to given counts), in a seeded order: same seed, same rows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np


def allocate(n: int, weights: Sequence[float]) -> np.ndarray:
    """N split into whole counts (K,) in proportion to ``weights`` (K,) by largest remainder (Hamilton's
    method); every class of positive weight gets at least one when N allows it."""
    w = np.asarray(weights, np.float64)
    if n < 0 or not len(w) or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"allocate: n={n} over weights {list(w)}: need n >= 0 and non-negative weights, not all 0")
    share = n * w / w.sum()
    counts = np.floor(share).astype(np.int64)
    positive = np.flatnonzero(w > 0)
    if n >= len(positive):  # an empty class would vanish from the draw: each gets one first
        counts[positive] = np.maximum(counts[positive], 1)
    while counts.sum() > n:  # the floor-ups above overshot: take back from a class that keeps one or more
        counts[np.argmax(np.where(counts > 1, counts - share, -np.inf))] -= 1
    order = np.argsort(-(share - counts), kind="stable")
    counts[order[: n - counts.sum()]] += 1
    return counts


def rows_for_counts(labels: np.ndarray, counts: Mapping[int, int], seed: int) -> np.ndarray:
    """Positions into ``labels`` (N,): ``counts[c]`` rows of each class c, each class's rows in a seeded order
    (a class with fewer rows than asked is gone through again, in a new order), all shuffled together."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    picks = []
    for cls, count in counts.items():
        pool = np.flatnonzero(labels == cls)
        if count and not len(pool):
            raise ValueError(f"class {cls}: {count} rows asked, none to draw from")
        rounds = -(-count // max(len(pool), 1))
        picks.append(np.concatenate([rng.permutation(pool) for _ in range(rounds)] or [np.zeros(0, np.int64)])[:count])
    out = np.concatenate(picks) if picks else np.zeros(0, np.int64)
    return out[rng.permutation(len(out))].astype(np.int64)


def stratified_rows(labels: np.ndarray | None, n: int, seed: int, *, length: int | None = None) -> np.ndarray:
    """N positions into ``labels`` (M,), drawn seeded and stratified by class: each class in proportion to its
    share of the M rows, every class present when N >= the number of classes; N > M goes through the rows
    again. ``labels`` None (unlabelled rows): a seeded draw of N of ``length`` rows."""
    if labels is None:
        labels = np.zeros(length or 0, np.int64)
    labels = np.asarray(labels)
    if not len(labels):
        raise ValueError("stratified_rows: no rows to draw from")
    classes, sizes = np.unique(labels, return_counts=True)
    return rows_for_counts(labels, dict(zip(classes.tolist(), allocate(n, sizes).tolist())), seed)
