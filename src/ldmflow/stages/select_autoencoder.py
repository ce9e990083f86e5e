"""Stage 2: pick the best autoencoder run by a metric, and plot every run's validation curve."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Literal

import pandas as pd

from ldmflow.artifacts import RunPaths, atomic_write_figure, atomic_write_json, load_checkpoint
from ldmflow.errors import SelectionError

log = logging.getLogger(__name__)


def read_run(run_dir: str | Path) -> tuple[str, pd.DataFrame, Path]:
    """A run folder's name, metrics table and best checkpoint path."""
    found = RunPaths.find(run_dir)
    if len(found) != 1:
        raise SelectionError(f"{run_dir}: expected one NAME_metrics.csv, found {len(found)}")
    run = found[0]
    if not run.best.is_file():
        raise SelectionError(f"{run_dir}: best checkpoint {run.best} is missing")
    return run.name, pd.read_csv(run.metrics), run.best


def checkpoint_record(best: Path) -> tuple[dict, str | None]:
    """The metrics row of the epoch a best checkpoint holds (its own ``best_epoch`` in its own ``history``),
    and the metric that kept it (``train.early_stopping.metric`` of its config)."""
    state = load_checkpoint(best)
    epoch = state.get("best_epoch")
    rows = [r for r in state.get("history") or [] if r.get("epoch") == epoch]
    if epoch is None or not rows:
        raise SelectionError(f"{best}: the checkpoint records no metrics row for its best epoch ({epoch})")
    kept_by = (state.get("config") or {}).get("train", {}).get("early_stopping", {}).get("metric")
    return rows[-1], kept_by


def _number(value) -> float | None:
    value = None if value is None else float(value)
    return None if value is None or math.isnan(value) else value


def select_autoencoder(runs: list[str | Path], out: str | Path, metric: str = "val_loss",
                       mode: Literal["min", "max"] = "min", plot: bool = True) -> dict:
    """Write ``selected.json`` (the winner and the table of all candidates) and ``validation_curves.png``.

    Each run is ranked by ``metric`` *at the epoch its best checkpoint holds* (read from the checkpoint's own
    record), so the winner's ``epoch`` and ``value`` describe the checkpoint ``selected.json`` names. That
    checkpoint was kept by the run's ``train.early_stopping.metric``; when ``metric`` is another column (the
    demo ranks on ``val_rgb``, kept by ``val_loss``), a run is ranked at its best-``val_loss`` epoch, not at its
    best-``metric`` epoch; the candidates' ``kept_by`` says which metric kept each checkpoint.
    """
    if mode not in ("min", "max"):
        raise SelectionError(f"selection mode {mode!r}; allowed: min, max")
    if not runs:
        raise SelectionError("no autoencoder runs to select from")
    candidates, curves = [], {}
    for run in runs:
        name, table, best = read_run(run)
        if metric not in table.columns:
            raise SelectionError(f"{run}: metric {metric!r} is not a metrics column; allowed: "
                                 f"{', '.join(c for c in table.columns if c not in ('epoch', 'step'))}")
        row, kept_by = checkpoint_record(best)
        if kept_by is not None and kept_by != metric:
            log.warning("%s: its best checkpoint was kept by %s (epoch %d); ranking it on %s at that epoch",
                        name, kept_by, row["epoch"], metric)
        summary = {k: _number(v) for k, v in row.items() if k.startswith("val_")}
        value = _number(row.get(metric))
        candidates.append({"name": name, "checkpoint": str(best), "run_dir": str(run),
                           "value": math.nan if value is None else value, "epoch": int(row["epoch"]),
                           "kept_by": kept_by, "epochs_trained": int(table["epoch"].max()), **summary})
        curves[name] = table
    finite = [c for c in candidates if math.isfinite(c["value"])]
    if not finite:
        raise SelectionError(f"no run's best checkpoint has a finite {metric}")
    winner = (min if mode == "min" else max)(finite, key=lambda c: c["value"])
    for c in candidates:
        if not math.isfinite(c["value"]):
            c["value"] = None  # JSON has no NaN
    result = {"name": winner["name"], "checkpoint": winner["checkpoint"], "metric": metric, "mode": mode,
              "value": winner["value"], "epoch": winner["epoch"], "kept_by": winner["kept_by"],
              "candidates": candidates}
    out = Path(out)
    atomic_write_json(out, result)
    if plot:
        plot_curves(curves, metric, out.with_name("validation_curves.png"), winner["name"])
    return result


def plot_curves(curves: dict[str, pd.DataFrame], metric: str, path: Path, winner: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = [metric] + [m for m in ("val_psnr", "val_miou", "val_acc") if m != metric]
    cols = [c for c in cols if any(c in t.columns and t[c].notna().any() for t in curves.values())]
    fig, axes = plt.subplots(1, len(cols), figsize=(4.2 * len(cols), 3.4), squeeze=False)
    for ax, col in zip(axes[0], cols):
        for name, table in curves.items():
            if col in table.columns:
                ax.plot(table["epoch"], table[col], marker=".", lw=2.5 if name == winner else 1.2,
                        label=name + (" (selected)" if name == winner else ""))
        ax.set_xlabel("epoch")
        ax.set_title(col)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    atomic_write_figure(fig, path, dpi=110)
    plt.close(fig)
