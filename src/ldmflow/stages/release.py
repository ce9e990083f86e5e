"""Release a synthetic set only through the memorization audit: ``results/release/NAME/``.

:func:`release` reads a synthetic set (:mod:`ldmflow.stages.synthesize`) and the calibrated memorization audit
of exactly its images (``ldmflow memorization`` with the set's ``manifest.csv`` as the samples, the real
train split as the training set and the held-out split as the reference). Images the calibrated test flags
are withheld and listed (``withheld.csv``); when the flagged fraction's lower 95% Wilson bound exceeds the
reference false-flag bound (the upper 95% Wilson bound of the rate at which the calibrated test flags held-out
real images, leave-one-out), the set flags more images than new real images would: the model memorizes, and
the release stops, publishing nothing. It stops too when every image is flagged. Otherwise it writes the kept
images and masks, their ``manifest.csv`` and a dataset card (``DATASET_CARD.md``, ``card.json``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from ldmflow import __version__
from ldmflow.artifacts import atomic_write_bytes, atomic_write_json, fsync_tree, publish_dir
from ldmflow.errors import DataError
from ldmflow.evaluation.verdict import wilson

log = logging.getLogger(__name__)

CARD_FORMAT = "ldmflow-dataset-card-v1"
INTENDED_USE = ("Training and testing image models where the real images may not be shared, or to add labelled "
                "images of rare classes. Not a substitute for real data in clinical or safety decisions; every "
                "image was generated, none was acquired.")


class ReleaseError(DataError):
    """The audit says the set is not fit to publish (or is not the audit of this set)."""


def _audit(audit_dir: Path, images: list[str]) -> tuple[dict, pd.DataFrame]:
    """The audit's summary and per-image rows, in the manifest's order; refuses an audit that is uncalibrated or
    of other images."""
    summary = json.loads((audit_dir / "summary.json").read_text())
    rows = pd.read_csv(audit_dir / "per_sample.csv", dtype=str, keep_default_na=False)
    if not summary["memorized"].get("calibrated"):
        raise ReleaseError(f"{audit_dir}: the audit is not calibrated ({summary['memorized'].get('uncalibrated')}); "
                           "a release needs held-out reference images to calibrate the threshold")
    by_sample = {str(Path(s).resolve()): i for i, s in enumerate(rows["sample"])}
    missing = [p for p in images if str(Path(p).resolve()) not in by_sample]
    if missing or len(by_sample) != len(images):
        raise ReleaseError(f"{audit_dir}: the audit covers {len(by_sample)} images, the set has {len(images)} "
                           f"({len(missing)} not audited, e.g. {missing[:1]}); audit exactly the images to release")
    return summary, rows.iloc[[by_sample[str(Path(p).resolve())] for p in images]].reset_index(drop=True)


def audit_figures(summary: dict, flagged: np.ndarray) -> dict:
    """The release test: the flagged fraction with its 95% Wilson interval against the reference false-flag
    bound, the upper 95% Wilson bound of the held-out images' leave-one-out flag rate (the two intervals apart:
    the set is flagged more often than new real images are). The calibration's guarantee m / (n + 1) on the
    expected false-flag rate is reported beside it."""
    calibrated = summary["tests"]["calibrated"]
    reference = calibrated["reference_false_flags"]
    count, total = int(flagged.sum()), len(flagged)
    low, high = wilson(count, total)
    bound = float(reference["ci_high"])
    return {"criterion": "calibrated", "feature": summary.get("feature"), "threshold": calibrated["threshold"],
            "score": calibrated.get("score"), "rule": calibrated.get("rule"), "rate": calibrated.get("rate"),
            "references": calibrated["references"], "guaranteed_rate": calibrated["guaranteed_rate"],
            "reference_false_flags": reference, "false_flag_bound": bound, "flagged": count, "audited": total,
            "flagged_fraction": count / total if total else None, "flagged_ci95": [low, high],
            "passed": bool(count < total and not (low is not None and low > bound)),
            "test": "release stops when the flagged fraction's lower 95% Wilson bound exceeds the reference "
                    "false-flag bound (upper 95% Wilson bound of the held-out images' flag rate), or when every "
                    "image is flagged"}


def _withheld(frame: pd.DataFrame, rows: pd.DataFrame, flagged: np.ndarray) -> bytes:
    """withheld.csv: each flagged image, its nearest training image and the score that flagged it."""
    out = frame.loc[flagged, [c for c in ("image", "mask", "label") if c in frame.columns]].copy()
    for col in ("nearest", "similarity", "shift_ratio"):
        out[col] = rows.loc[flagged, col].to_numpy()
    return out.to_csv(index=False).encode()


def _copy_kept(src: Path, tmp: Path, kept: pd.DataFrame) -> None:
    """The kept rows' image and mask files, at the same relative paths."""
    for col in ("image", "mask"):
        for rel in kept.get(col, []):
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / rel, tmp / rel)


def _counts(frame: pd.DataFrame) -> dict:
    return frame["label"].value_counts().sort_index().to_dict() if "label" in frame.columns else {"(none)": len(frame)}


def build_card(dataset: dict, audit: dict, frame: pd.DataFrame, kept: pd.DataFrame, utility: dict | None,
               intended_use: str) -> dict:
    """card.json: where the set comes from, what made it, what the audit found, what it is for."""
    return {
        "format": CARD_FORMAT, "name": dataset["name"], "ldmflow_version": __version__,
        "source_data": {"manifest": dataset.get("source_manifest"),
                        "manifest_sha256": dataset.get("source_manifest_sha256"),
                        "fingerprint": dataset.get("source_fingerprint"), "latents": dataset.get("latents")},
        "models": {"model": dataset["model"], "checkpoint": dataset["checkpoint"],
                   "checkpoint_sha256": dataset["checkpoint_sha256"], "config": dataset.get("experiment"),
                   "base_checkpoint": dataset.get("base_checkpoint"), "base_sha256": dataset.get("base_sha256"),
                   "autoencoder_checkpoint": dataset.get("autoencoder_checkpoint"),
                   "autoencoder_sha256": dataset.get("autoencoder_sha256")},
        "generation": {k: dataset.get(k) for k in ("seed", "sampler", "steps", "eta", "guidance", "options")},
        "controls": {k: v for k, v in (dataset.get("controls") or {}).items() if k in ("source", "scale", "augment")},
        "counts": {"generated": _counts(frame), "released": _counts(kept), "withheld": len(frame) - len(kept)},
        "audit": audit, "utility": utility if utility is not None else {"available": False, "reason":
                                                                         "no utility.json beside the set"},
        "intended_use": intended_use,
    }


def card_markdown(card: dict) -> str:
    """DATASET_CARD.md: the card for a reader."""
    a, m, s, c = card["audit"], card["models"], card["source_data"], card["counts"]
    ci = a["flagged_ci95"]
    lines = [f"# Synthetic data set `{card['name']}`", "", "## Intended use", "", card["intended_use"], "",
             "## Source data", "", f"- manifest: `{s['manifest']}` (sha256 `{s['manifest_sha256']}`)",
             f"- data fingerprint: `{s['fingerprint']}`", "", "## Models", "",
             f"- {m['model']}: `{m['checkpoint']}` (sha256 `{m['checkpoint_sha256']}`)",
             f"- autoencoder: `{m['autoencoder_checkpoint']}` (sha256 `{m['autoencoder_sha256']}`)"]
    if m["base_checkpoint"]:
        lines.append(f"- base diffusion model: `{m['base_checkpoint']}` (sha256 `{m['base_sha256']}`)")
    g = card["generation"]
    lines += ["", "## Generation", "", f"- seed {g['seed']}, sampler {g['sampler']}, {g['steps']} steps, guidance "
              f"{g['guidance']}", *([f"- controls: {card['controls']['source']}; augment "
                                     f"{card['controls']['augment'] or 'none'}"] if card["controls"] else []),
              "", "## Counts per class", "", "| class | generated | released |", "|---|---|---|",
              *[f"| {k} | {v} | {c['released'].get(k, 0)} |" for k, v in c["generated"].items()],
              f"| withheld (audit) | | {c['withheld']} |", "", "## Memorization audit", "",
              f"- {a['audited']} images audited against the real train split ({a['feature']} features); "
              f"{a['flagged']} flagged ({a['flagged_fraction']:.2%}, 95% CI {ci[0]:.2%}-{ci[1]:.2%}) and withheld",
              f"- calibrated threshold {a['threshold']:.4g} on {a['references']} held-out images (expected false-flag "
              f"rate at most {a['guaranteed_rate']:.2%}); held-out images flagged "
              f"{a['reference_false_flags']['count']} / {a['reference_false_flags']['total']}, "
              f"reference false-flag bound {a['false_flag_bound']:.2%}",
              f"- {a['test']}: **{'passed' if a['passed'] else 'failed'}**",
              "", "## Utility", ""]
    u = card["utility"]
    lines += utility_lines(u) if u.get("available", True) else [f"- not measured: {u['reason']}"]
    return "\n".join(lines) + "\n"


def _figure(entry: dict | None, key: str) -> str:
    if entry is None:
        return "n/a"
    ci = entry.get("ci95")
    text = f"{entry[key]:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")
    return text + (f" ({entry['reads']})" if "reads" in entry else "")


def utility_lines(u: dict) -> list[str]:
    """The card's utility section: each synthetic-only / real-only ratio and real + synthetic gain, per metric,
    with its 95% interval (train on synthetic, test on real val images)."""
    counts = u.get("counts", {})
    lines = [f"- real train {counts.get('real_train')}, real held-out {counts.get('real_held_out')}, synthetic "
             f"{counts.get('synthetic')}; seeds {u.get('seeds')}; intervals: {u.get('interval')}"]
    for title, key, rows in (("synthetic only / real only", "value", u.get("synthetic_only_over_real_only", [])),
                             ("real + synthetic gain over real only", "value", u.get("real_plus_synthetic_gain", []))):
        for row in rows:
            figures = ", ".join(f"{m} {_figure(row.get(m), key)}" for m in u.get("metrics", []))
            lines.append(f"- {title}, synthetic : real {row['ratio']:g}: {figures}")
    lines += [f"- ratio {s.get('ratio')}: {s.get('reason', 'skipped')}" for s in u.get("skipped", [])]
    return lines


def release(synthetic_dir: str | Path, audit_dir: str | Path, out_dir: str | Path, *,
            utility: str | Path | None = None, intended_use: str = INTENDED_USE) -> dict:
    """Publish the audited synthetic set of SYNTHETIC_DIR into OUT_DIR (replaced whole), withholding the images
    the calibrated audit in AUDIT_DIR flags; raises :class:`ReleaseError`, writing nothing, when the flagged
    fraction's lower 95% bound exceeds the false-flag bound. ``utility``: a utility.json whose figures go into
    the card when the file exists. Returns card.json's content."""
    src, out = Path(synthetic_dir), Path(out_dir)
    dataset = json.loads((src / "dataset.json").read_text())["synthesis"]
    frame = pd.read_csv(src / "manifest.csv", dtype=str, keep_default_na=False)
    summary, rows = _audit(Path(audit_dir), [str(src / p) for p in frame["image"]])
    flagged = (rows["memorized_calibrated"] == "true").to_numpy()
    audit = audit_figures(summary, flagged)
    if not audit["passed"]:
        low = audit["flagged_ci95"][0]
        raise ReleaseError(f"release of {dataset['name']} stopped, nothing published: {audit['flagged']} of "
                           f"{audit['audited']} images flagged as too close to training images (lower 95% bound "
                           f"{low:.2%}, reference false-flag bound {audit['false_flag_bound']:.2%}); the model "
                           f"memorizes: see {Path(audit_dir) / 'top_matches.png'}")
    kept = frame.loc[~flagged].reset_index(drop=True)
    found = Path(utility) if utility is not None and Path(utility).is_file() else None
    card = build_card(dataset, audit, frame, kept, json.loads(found.read_text()) if found else None, intended_use)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    _copy_kept(src, tmp, kept)
    atomic_write_bytes(tmp / "manifest.csv", kept.to_csv(index=False).encode())
    atomic_write_bytes(tmp / "withheld.csv", _withheld(frame, rows, flagged))
    atomic_write_json(tmp / "card.json", card)
    atomic_write_bytes(tmp / "DATASET_CARD.md", card_markdown(card).encode())
    shutil.copy2(src / "dataset.json", tmp / "dataset.json")
    fsync_tree(tmp)
    out.parent.mkdir(parents=True, exist_ok=True)
    publish_dir(tmp, out)
    log.info("released %s: %d of %d images (%d withheld by the audit) in %s", dataset["name"], len(kept), len(frame),
             audit["flagged"], out)
    return card
