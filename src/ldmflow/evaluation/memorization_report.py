"""Writers of the memorization stage's outputs: per-sample CSV, histogram, JSON-safe values."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd

from ldmflow.artifacts import atomic_write_bytes, atomic_write_figure
from ldmflow.evaluation.image_sets import ImageSet
from ldmflow.evaluation.search import Neighbours

log = logging.getLogger(__name__)
PERCENTILES = (50, 75, 90, 95, 99)


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


def _bool_text(mask: np.ndarray) -> list[str]:
    return ["true" if m else "false" for m in mask]


def write_per_sample(path: Path, samples: ImageSet, train: ImageSet, nb: Neighbours, tests: dict,
                     above_reference: np.ndarray | None, calibrated: np.ndarray | None = None) -> None:
    """per_sample.csv: one row per generated sample with its nearest training images and the tests
    (``memorized`` is the headline verdict; the calibrated and above_reference columns are empty without a
    reference)."""
    frame = pd.DataFrame({
        "sample": samples.names,
        "nearest": [train.names[i] for i in nb.index[:, 0]],
        "nearest_index": nb.index[:, 0],
        "similarity": tests["similarity"],
        "distance_ratio": tests["tiled_ratio"],
        "shift_ratio": tests["shift_ratio"],
        "tiled_l2": tests["tiled_l2"],
        "nn_ratio": tests["nn_ratio"],
        "memorized": _bool_text(tests["memorized"]),
        "memorized_calibrated": _bool_text(calibrated) if calibrated is not None else "",
        "memorized_tiled_l2": _bool_text(tests["memorized_tiled_l2"]),
        "memorized_nn_ratio": _bool_text(tests["memorized_nn_ratio"]),
        "above_reference": _bool_text(above_reference) if above_reference is not None else "",
    })
    for j in range(nb.index.shape[1]):
        frame[f"neighbour_{j + 1}"] = [train.names[i] for i in nb.index[:, j]]
        frame[f"similarity_{j + 1}"] = np.clip(nb.similarity[:, j], -1, 1)
    atomic_write_bytes(path, frame.to_csv(index=False, float_format="%.6g").encode())


def write_histogram(path: Path, tests: dict, ref_tests: dict | None, headline: dict, feature: str) -> None:
    """histogram.png: generated vs held-out images, by similarity to the nearest training image (left) and by
    the calibrated test's shift-tolerant tiled-L2 ratio with its threshold (right)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4), dpi=100)
    panels = (("similarity", f"cosine similarity to the nearest training image ({feature} space)"),
              ("shift_ratio", "shift-tolerant tiled-L2 ratio (lower: closer to a training image)"))
    for j, (key, label) in enumerate(panels):
        ax = fig.add_subplot(1, 2, j + 1)
        generated = tests[key]
        reference = ref_tests[key] if ref_tests is not None and len(ref_tests[key]) else None
        values = [generated] + ([reference] if reference is not None else [])
        lo, hi = min(float(v.min()) for v in values), max(float(v.max()) for v in values)
        bins = np.linspace(lo, hi + 1e-6, 41)
        ax.hist(generated, bins=bins, alpha=0.6, density=True, label=f"generated ({len(generated)})")
        if reference is not None:
            ax.hist(reference, bins=bins, alpha=0.6, density=True, label=f"held-out real ({len(reference)})")
            if key == "similarity":
                ax.axvline(float(reference.max()), color="k", linestyle="--", linewidth=1, label="held-out maximum")
        if key == "shift_ratio" and headline.get("calibrated"):
            ax.axvline(headline["threshold"], color="tab:red", linewidth=1.5,
                       label=f"calibrated threshold (flags {headline['fraction']:.1%})")
        ax.set_xlabel(label)
        ax.set_ylabel("density")
        ax.legend(loc="upper left" if key == "similarity" else "upper right", fontsize=8)
    verdict = (f"{headline['criterion']}: {headline['count']} of {headline['total']} flagged "
               f"({headline['fraction']:.1%}, 95% CI {headline['ci_low']:.1%}-{headline['ci_high']:.1%})")
    if not headline.get("calibrated"):
        verdict += " - UNCALIBRATED" + (" (no held-out reference)" if ref_tests is None else "")
    else:
        ref = headline["reference_false_flag_rate"]
        verdict += f"; held-out false flags {ref['fraction']:.1%} (CI {ref['ci_low']:.1%}-{ref['ci_high']:.1%})"
        if "warning" in headline:  # too few held-out images for the rate asked
            verdict += f"\nonly {headline['references']} held-out images: bound {headline['guaranteed_rate']:.1%}"
    fig.suptitle(verdict, fontsize=10)
    fig.tight_layout()
    atomic_write_figure(fig, path)
