"""The utility of a synthetic set (:mod:`ldmflow.evaluation.utility`): downstream models of the judge's recipe
trained on real, synthetic and real + synthetic images, scored on the real held-out images.

:func:`utility_stage` writes ``utility.json`` (every training set's scores with intervals, the synthetic-only /
real-only ratios, the real + synthetic gains, every run), ``utility.csv`` (one row per training set and metric)
and ``utility.png`` (score against the synthetic : real ratio).
"""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path

import numpy as np

from ldmflow.artifacts import atomic_write_bytes, atomic_write_json
from ldmflow.config.judge import JudgeConfig, UtilityConfig, judge_config, utility_config
from ldmflow.config.schema import to_dict
from ldmflow.devices import get_device
from ldmflow.evaluation.utility import measure_utility

log = logging.getLogger(__name__)

CSV_COLUMNS = ["train_on", "ratio", "n_train", "metric", "mean", "ci_low", "ci_high", "against_real",
               "against_real_ci_low", "against_real_ci_high", "reads"]


def synthetic_image_size(manifest: str | Path) -> int:
    """The side of a synthetic manifest's first image: the size its model generates, the real data's."""
    from PIL import Image

    from ldmflow.data.manifest import read_manifest

    with Image.open(read_manifest(manifest)["image"].iloc[0]) as image:
        return max(image.size)


def utility_stage(real: str | Path, synthetic: str | Path, out_dir: str | Path,
                  options: UtilityConfig | dict | None = None, judge_options: JudgeConfig | dict | None = None, *,
                  device: str | None = None, threads: int = 4, image_size: int | None = None) -> dict:
    """Measure the utility of the synthetic manifest ``synthetic`` against the real data ``real`` (a manifest or
    latent store) and write ``OUT/utility.json``, ``OUT/utility.csv`` and ``OUT/utility.png``. ``image_size``:
    None reads the synthetic images' own size."""
    cfg, judge = utility_config(options), judge_config(judge_options)
    size = image_size or synthetic_image_size(synthetic)
    report = measure_utility(real, synthetic, cfg, judge, device=get_device(device), threads=threads,
                             image_size=size)
    report["config"], report["judge_config"] = to_dict(cfg), to_dict(judge)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "utility.json", report)
    atomic_write_bytes(out / "utility.csv", utility_csv(report).encode())
    utility_plot(report, out / "utility.png")
    for r in report["synthetic_only_over_real_only"]:
        log.info("utility: synthetic-only / real-only at x%g: %s", r["ratio"],
                 {m: _with_ci(r[m]) for m in report["metrics"]})
    for r in report["real_plus_synthetic_gain"]:
        log.info("utility: real + synthetic gain at x%g: %s", r["ratio"],
                 {m: f"{_with_ci(r[m])} ({r[m]['reads']})" for m in report["metrics"]})
    return report


def _with_ci(entry: dict | None) -> str:
    if entry is None:
        return "n/a"
    ci = entry["ci95"]
    return f"{entry['value']:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def utility_csv(report: dict) -> str:
    """One row per training set and metric: its score with interval, and its ratio to (synthetic only) or gain
    over (real + synthetic) the real-only score, with interval and what the gain's interval reads."""
    against = {("synthetic", r["ratio"]): r for r in report["synthetic_only_over_real_only"]}
    against.update({("real+synthetic", r["ratio"]): r for r in report["real_plus_synthetic_gain"]})
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS)
    writer.writeheader()
    for c in report["conditions"]:
        for m in report["metrics"]:
            score = c[m]
            vs = (against.get((c["train_on"], c["ratio"])) or {}).get(m) or {}
            ci, vs_ci = score["ci95"] or [None, None], vs.get("ci95") or [None, None]
            writer.writerow({"train_on": c["train_on"], "ratio": c["ratio"], "n_train": c["n_train"], "metric": m,
                             "mean": score["mean"], "ci_low": ci[0], "ci_high": ci[1],
                             "against_real": vs.get("value"), "against_real_ci_low": vs_ci[0],
                             "against_real_ci_high": vs_ci[1], "reads": vs.get("reads")})
    return buf.getvalue()


def utility_plot(report: dict, path: Path) -> None:
    """Score against the synthetic : real ratio, one panel per metric: synthetic only and real + synthetic with
    their 95% intervals, the real-only score as a line with its interval as a band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ldmflow.artifacts import atomic_write_figure

    metrics = report["metrics"]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.8 * len(metrics), 3.8), squeeze=False)
    real = next(c for c in report["conditions"] if c["train_on"] == "real")
    for ax, m in zip(axes[0], metrics):
        ax.axhline(real[m]["mean"], color="black", lw=1,
                   label=f"real only ({real['n_train']} images): {real[m]['mean']:.2f}")
        if real[m]["ci95"]:
            ax.axhspan(*real[m]["ci95"], color="black", alpha=0.1)
        for kind, colour, shift in (("synthetic", "tab:orange", 0.97), ("real+synthetic", "tab:blue", 1.03)):
            rows = [c for c in report["conditions"] if c["train_on"] == kind]
            if not rows:
                continue
            x = np.array([c["ratio"] for c in rows]) * shift
            y = np.array([c[m]["mean"] for c in rows])
            ci = np.array([c[m]["ci95"] or [c[m]["mean"]] * 2 for c in rows])
            ax.errorbar(x, y, yerr=[y - ci[:, 0], ci[:, 1] - y], fmt="o-", color=colour, capsize=3,
                        label=kind.replace("+", " + ") + (" only" if kind == "synthetic" else ""))
        ratios = sorted({c["ratio"] for c in report["conditions"] if c["train_on"] != "real"})
        ax.set_xscale("log")
        ratios = ratios or [1.0]
        ax.set_xlim(min(ratios) / 1.6, max(ratios) * 1.6)
        ax.set_xticks(ratios, [f"{r:g}:1" for r in ratios])
        ax.minorticks_off()
        ax.set_xlabel("synthetic : real-train images")
        ax.set_ylabel(f"real {report['held_out_split']} {'accuracy' if m == 'accuracy' else 'mIoU'}")
        ax.set_ylim(0, 1.02)
        ax.legend(fontsize=7, loc="lower right")
    skipped = ", ".join(f"{s['ratio']:g}:1" for s in report["skipped"])
    fig.suptitle("Train on synthetic, test on real (95% intervals: bootstrap over images x seeds)"
                 + (f"\nskipped (too few synthetic images): {skipped}" if skipped else ""), fontsize=8)
    fig.tight_layout()
    atomic_write_figure(fig, path, dpi=110)
    plt.close(fig)
