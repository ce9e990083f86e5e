"""Gather every experiment's memorization summary into one table (CSV) and one plot."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import pandas as pd

from ldmflow.artifacts import atomic_write_bytes, atomic_write_figure

log = logging.getLogger(__name__)


def summarize_control_fidelity(fidelity_files: list[str | Path], out_csv: str | Path) -> list[dict]:
    """One row per ControlNet run from its ``control_fidelity.json``: fusion, signal, base, the control mIoU of
    the best checkpoint and of the uncontrolled base, and the gain; written as CSV."""
    import csv
    import io

    columns = ["experiment", "fusion", "signal", "base", "epoch", "rows", "controlled_miou", "base_miou", "gain"]
    rows = []
    for path in fidelity_files:
        f = json.loads(Path(path).read_text())
        available = f.get("available", False)
        rows.append({"experiment": f["experiment"], "fusion": f["fusion"], "signal": f["signal"], "base": f["base"],
                     "epoch": f["epoch"], "rows": f.get("rows"),
                     "controlled_miou": f["controlled"]["miou"] if available else None,
                     "base_miou": f["uncontrolled_base"]["miou"] if available else None,
                     "gain": f["gain"] if available else None})
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    writer.writerows({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in row.items()} for row in rows)
    atomic_write_bytes(out_csv, buf.getvalue().encode())
    return rows


def _get(d: dict | None, *keys):
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def memorization_row(name: str, summary: dict) -> dict:
    """One experiment's memorization verdict, its components and quality figures, flat. ``memorized`` is
    the headline verdict; ``calibrated`` says whether its threshold was calibrated on held-out images."""
    gen = _get(summary, "similarity_percentiles", "generated") or {}
    ref = _get(summary, "similarity_percentiles", "reference") or {}
    quality = summary.get("quality") or {}
    headline = summary.get("memorized") or {}
    row = {
        "experiment": name,
        "feature": summary.get("feature"),
        "generated": _get(summary, "counts", "generated"),
        "training": _get(summary, "counts", "training"),
        "reference": _get(summary, "counts", "reference"),
        "criterion": headline.get("criterion"),
        "calibrated": bool(headline.get("calibrated", False)),
        "memorized": headline.get("count"),
        "memorized_fraction": headline.get("fraction"),
        "memorized_ci_low": headline.get("ci_low"),
        "memorized_ci_high": headline.get("ci_high"),
        "reference_false_flag_rate": _get(headline, "reference_false_flag_rate", "fraction"),
        "reference_false_flag_ci_high": _get(headline, "reference_false_flag_rate", "ci_high"),
    }
    for test in ("calibrated", "tiled_l2", "nn_ratio", "above_reference"):
        row[f"{test}_fraction"] = _get(summary, "tests", test, "fraction")
        row[f"{test}_reference_fraction"] = _get(summary, "tests", test, "reference_false_flags", "fraction")
    return {
        **row,
        "similarity_p50": gen.get("p50"), "similarity_p95": gen.get("p95"), "similarity_p99": gen.get("p99"),
        "reference_similarity_p50": ref.get("p50"), "reference_similarity_p95": ref.get("p95"),
        "frechet_distance": _get(quality, "generated", "frechet_distance"),
        "precision": _get(quality, "generated", "precision"),
        "recall": _get(quality, "generated", "recall"),
        "reference_frechet_distance": _get(quality, "reference", "frechet_distance"),
    }


def gather_memorization(summaries: list[str | Path], names: list[str], out_csv: str | Path,
                        out_png: str | Path) -> pd.DataFrame:
    """Write ``summary.csv`` (one row per experiment) and ``summary.png`` (the headline memorized fraction
    with its 95 % interval, uncalibrated verdicts marked, and similarity of generated vs held-out images)."""
    if len(summaries) != len(names):
        raise ValueError(f"{len(summaries)} summaries for {len(names)} names")
    rows = [memorization_row(name, json.loads(Path(path).read_text())) for name, path in zip(names, summaries)]
    table = pd.DataFrame(rows)
    atomic_write_bytes(out_csv, table.to_csv(index=False, float_format="%.6g").encode())

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.2 + 0.25 * len(rows)))
    y = list(range(len(rows)))
    frac = table["memorized_fraction"].astype(float).fillna(0)
    low = (frac - table["memorized_ci_low"].astype(float).fillna(frac)).clip(lower=0)
    high = (table["memorized_ci_high"].astype(float).fillna(frac) - frac).clip(lower=0)
    colours = ["tab:red" if c else "tab:gray" for c in table["calibrated"]]
    axes[0].barh(y, frac, xerr=[low, high], color=colours, capsize=3)
    labels = [f"{e}{'' if c else ' (uncalibrated)'}" for e, c in zip(table["experiment"], table["calibrated"])]
    axes[0].set_yticks(y, labels)
    axes[0].set_xlabel("fraction flagged as memorized (headline verdict, 95% CI)")
    axes[0].set_xlim(0, min(1.0, max(0.05, float((frac + high).max()) * 1.2)))
    for col, label, colour in (("similarity_p95", "generated p95", "tab:blue"),
                               ("reference_similarity_p95", "held-out p95", "tab:gray")):
        axes[1].scatter(table[col], y, label=label, color=colour)
    axes[1].set_yticks(y, [""] * len(rows))
    axes[1].set_xlabel("similarity to the nearest training image")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    atomic_write_figure(fig, out_png, dpi=110)
    plt.close(fig)
    return table


def plot_training_curves(metrics_csv: str | Path, out_png: str | Path) -> None:
    """One figure of a run's metrics by epoch: losses (train and validation) and the other val_ metrics."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = pd.read_csv(metrics_csv)
    losses = [c for c in table.columns if c.endswith("loss") or c.startswith("val_loss_q")]
    others = [c for c in table.columns if c.startswith("val_") and c not in losses and table[c].notna().any()]
    panels = [losses] + [[c] for c in others]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2), squeeze=False)
    for ax, cols in zip(axes[0], panels):
        for col in cols:
            ax.plot(table["epoch"], table[col], marker=".", label=col)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if len(cols) > 1:
            ax.legend(fontsize=7)
        else:
            ax.set_title(cols[0])
    fig.suptitle(Path(metrics_csv).stem.removesuffix("_metrics"))
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(out_png, buf.getvalue())
