"""Stage 2: pick the best autoencoder run by a metric, and plot every run's validation curve."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

import pandas as pd

from ldmflow.artifacts import RunPaths, atomic_write_figure, atomic_write_json
from ldmflow.errors import SelectionError


def read_run(run_dir: str | Path) -> tuple[str, pd.DataFrame, Path]:
    """A run folder's name, metrics table and best checkpoint path."""
    found = RunPaths.find(run_dir)
    if len(found) != 1:
        raise SelectionError(f"{run_dir}: expected one NAME_metrics.csv, found {len(found)}")
    run = found[0]
    if not run.best.is_file():
        raise SelectionError(f"{run_dir}: best checkpoint {run.best} is missing")
    return run.name, pd.read_csv(run.metrics), run.best


def select_autoencoder(runs: list[str | Path], out: str | Path, metric: str = "val_loss",
                       mode: Literal["min", "max"] = "min", plot: bool = True) -> dict:
    """Write ``selected.json`` (the winner and the table of all candidates) and ``validation_curves.png``."""
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
        values = table[metric].astype(float)
        idx = values.idxmin() if mode == "min" else values.idxmax()
        row = table.loc[idx]
        summary = {k: (None if isinstance(v, float) and math.isnan(v) else v)
                   for k, v in row.items() if k.startswith("val_")}
        candidates.append({"name": name, "checkpoint": str(best), "run_dir": str(run), "value": float(row[metric]),
                           "epoch": int(row["epoch"]), "epochs_trained": int(table["epoch"].max()), **summary})
        curves[name] = table
    finite = [c for c in candidates if math.isfinite(c["value"])]
    if not finite:
        raise SelectionError(f"no run has a finite {metric}")
    winner = (min if mode == "min" else max)(finite, key=lambda c: c["value"])
    result = {"name": winner["name"], "checkpoint": winner["checkpoint"], "metric": metric, "mode": mode,
              "value": winner["value"], "candidates": candidates}
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
