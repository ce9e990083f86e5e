"""The utility of a synthetic labelled set, measured by training on it: train on synthetic, test on real (the
Classification Accuracy Score of Ravuri & Vinyals 2019).

Networks of the judge's architecture and recipe (:func:`ldmflow.evaluation.judge.fit_judge`) train, once per
seed, on the real train split, on synthetic images only (as many as the real train split, and each further
ratio the synthetic set is large enough for) and on real + synthetic; each is scored on the real held-out
images (val, else test): class accuracy and, where both sets have masks, mIoU. Intervals come from a
bootstrap over the real held-out images (one draw shared by every training set, so that comparisons are
paired) and over the seeds (drawn within each training set).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ldmflow.config.judge import JudgeConfig, UtilityConfig
from ldmflow.errors import DataError
from ldmflow.evaluation.judge import RealImages, Rows, fit_judge, judge_outputs, real_images

log = logging.getLogger(__name__)

METRICS = ("accuracy", "miou")
INTERVAL = ("95% percentile bootstrap over the real held-out images (one resample shared by every training set, "
            "so comparisons are paired) and over the seeds (resampled within each training set)")


@dataclass
class UtilitySets:
    """Real and synthetic images on one footing: ``images`` holds every real row, then every synthetic row,
    with labels in the real data's class order (None unless both sets have labels) and masks (None unless
    both have masks)."""

    images: RealImages
    real_train: np.ndarray  # rows of ``images``
    held: np.ndarray
    held_split: str
    synthetic: np.ndarray


def _synthetic_labels(real: RealImages, syn: RealImages, source: str | Path) -> torch.Tensor:
    """The synthetic set's labels as indices of the real data's classes (matched by name)."""
    unknown = sorted(set(syn.classes) - set(real.classes))
    if unknown:
        raise DataError(f"{source}: classes {unknown} are not classes of the real data {real.classes}")
    to_real = torch.tensor([real.classes.index(c) for c in syn.classes])
    return torch.where(syn.labels >= 0, to_real[syn.labels.clamp_min(0)], syn.labels)


def load_sets(real_source: str | Path, synthetic: str | Path, image_size: int, threads: int = 4) -> UtilitySets:
    """The real data (a manifest or latent store: its split) and a synthetic manifest (every row, whatever its
    split) as images the judge's kind reads, at ``image_size``."""
    real = real_images(real_source, threads, image_size)
    syn = real_images(synthetic, threads, image_size)
    if syn.images.shape[1:] != real.images.shape[1:]:
        raise DataError(f"{synthetic}: images {tuple(syn.images.shape[1:])} where the real data has "
                        f"{tuple(real.images.shape[1:])} (channels, height, width)")
    labels = masks = None
    if real.labels is not None and syn.labels is not None:
        labels = torch.cat([real.labels, _synthetic_labels(real, syn, synthetic)])
    if real.masks is not None and syn.masks is not None:
        if int(syn.masks.max()) >= real.mask_classes:
            raise DataError(f"{synthetic}: mask class {int(syn.masks.max())} is not a class of the real masks "
                            f"(0..{real.mask_classes - 1})")
        masks = torch.cat([real.masks, syn.masks])
    if labels is None and masks is None:
        raise DataError(f"{synthetic}: the real and synthetic sets share neither labels nor masks: nothing to "
                        "train a downstream model on")
    n = len(real.images)
    split = np.concatenate([real.split, np.full(len(syn.images), "synthetic")])
    images = RealImages(torch.cat([real.images, syn.images]), labels, masks, split, real.classes,
                        real.mask_classes if masks is not None else None, real.value_range, str(real_source))
    held_split = "val" if len(real.indices("val")) else "test"
    sets = UtilitySets(images, real.indices("train"), real.indices(held_split), held_split,
                       n + np.arange(len(syn.images)))
    if not len(sets.real_train) or not len(sets.held):
        raise DataError(f"{real_source}: utility needs real train rows and val (or test) rows")
    return sets


@dataclass
class Condition:
    """One training set: what it holds (``train_on``: real / synthetic / real+synthetic), its synthetic : real
    ratio, and per seed the rows of :class:`UtilitySets` it trains on."""

    train_on: str
    ratio: float
    rows: dict[int, np.ndarray]

    @property
    def n_train(self) -> int:
        return len(next(iter(self.rows.values())))


def conditions(sets: UtilitySets, cfg: UtilityConfig) -> tuple[list[Condition], list[dict]]:
    """The training sets of a utility run, and the ratios skipped because the synthetic set is too small. The
    synthetic rows of a seed are a draw seeded by it, so the intervals cover which images were drawn too."""
    n_real, n_syn = len(sets.real_train), len(sets.synthetic)
    out = [Condition("real", 0.0, {s: sets.real_train for s in cfg.seeds})]
    skipped = []
    for ratio in cfg.ratios:
        need = int(round(ratio * n_real))
        if need > n_syn:
            skipped.append({"ratio": ratio, "needs": need, "has": n_syn,
                            "reason": f"skipped: {need} synthetic images needed, the set has {n_syn}"})
            continue
        draw = {s: np.sort(np.random.default_rng(s).permutation(sets.synthetic)[:need]) for s in cfg.seeds}
        out.append(Condition("synthetic", ratio, draw))
        out.append(Condition("real+synthetic", ratio, {s: np.concatenate([sets.real_train, d])
                                                       for s, d in draw.items()}))
    return out, skipped


@torch.no_grad()
def per_image(model, sets: UtilitySets) -> dict[str, np.ndarray]:
    """A downstream model on each real held-out image: ``correct`` (n,) 1/0 (NaN where unlabelled) and the
    per-class pixel ``inter``section and ``union`` (n, K) of its segmentation with the true mask, counted a batch
    of images at a time."""
    images = sets.images
    masks, k = images.masks, images.mask_classes

    def overlap(seg: torch.Tensor, rows: slice) -> torch.Tensor:  # (b, H, W) -> (b, 2, K): inter, union
        classes = torch.arange(k)[None, :, None, None]  # (1, K, 1, 1)
        p, t = seg[:, None] == classes, masks[sets.held[rows]][:, None] == classes  # (b, K, H, W)
        return torch.stack([(p & t).sum((2, 3)), (p | t).sum((2, 3))], 1)

    out = judge_outputs(model, Rows(images.images, sets.held), seg=overlap if masks is not None else None)
    result = {}
    if out["probs"] is not None:
        truth = images.labels[sets.held]
        correct = (out["probs"].argmax(1) == truth).double()
        result["correct"] = torch.where(truth >= 0, correct, torch.nan).numpy()
    if out["seg"] is not None:
        result["inter"] = out["seg"][:, 0].double().numpy()
        result["union"] = out["seg"][:, 1].double().numpy()
    return result


def train_condition(sets: UtilitySets, condition: Condition, judge: JudgeConfig, cfg: UtilityConfig,
                    device: str | torch.device = "cpu") -> list[dict]:
    """One training set, once per seed: each a downstream model of the judge's recipe, scored per held-out
    image. Every model takes about the steps of ``cfg.epochs`` over the real train split."""
    epochs = max(1, round(cfg.epochs * len(sets.real_train) / condition.n_train))
    runs = []
    for seed in cfg.seeds:
        recipe = dataclasses.replace(judge, seed=seed, epochs=epochs, eval_every=epochs, members=1)
        model, _ = fit_judge(sets.images, condition.rows[seed], sets.held, recipe, device)
        runs.append({"seed": seed, "epochs": epochs, **per_image(model, sets)})
        log.info("utility: %s x%g (%d images), seed %d: %s", condition.train_on, condition.ratio,
                 condition.n_train, seed, {m: _fmt(score(runs[-1:], m)) for m in METRICS})
    return runs


def _fmt(value: float | None) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.3f}"


def score(runs: list[dict], metric: str, images: np.ndarray | None = None) -> float | None:
    """The mean over ``runs`` (seeds) of accuracy or mIoU on the held-out images ``images`` (all when None);
    None when the models have no such head."""
    key = "correct" if metric == "accuracy" else "inter"
    if key not in runs[0]:
        return None
    values = []
    for run in runs:
        if metric == "accuracy":
            c = run["correct"] if images is None else run["correct"][images]
            values.append(np.nanmean(c) if np.isfinite(c).any() else np.nan)
        else:
            inter, union = ((run["inter"], run["union"]) if images is None
                            else (run["inter"][images], run["union"][images]))
            i, u = inter.sum(0), union.sum(0)
            values.append(float((i[u > 0] / u[u > 0]).mean()) if (u > 0).any() else np.nan)
    return float(np.mean(values))


# --------------------------------------------------------------------------------------------------
# Intervals and the report
# --------------------------------------------------------------------------------------------------


def bootstrap(results: list[list[dict]], n_held: int, draws: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Per training set and metric, the bootstrap distribution (draws,) of its score: each draw resamples the
    held-out images once for every training set and the seeds within each."""
    rng = np.random.default_rng(seed)
    out = [{m: np.full(draws, np.nan) for m in METRICS} for _ in results]
    for b in range(draws):
        images = rng.integers(n_held, size=n_held)
        for dist, runs in zip(out, results):
            seeds = rng.integers(len(runs), size=len(runs))
            for m in METRICS:
                value = score([runs[s] for s in seeds], m, images)
                if value is not None:
                    dist[m][b] = value
    return out


def _ci(values: np.ndarray) -> list[float] | None:
    values = values[np.isfinite(values)]
    return [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))] if len(values) else None


def reads(ci: list[float] | None) -> str:
    """What a real + synthetic gain's interval says: a gain, a loss, or no measurable gain (0 inside it)."""
    if ci is None:
        return "not available"
    return "gain" if ci[0] > 0 else "loss" if ci[1] < 0 else "no measurable gain"


def _condition_entry(condition: Condition, runs: list[dict], dist: dict[str, np.ndarray]) -> dict:
    entry: dict = {"train_on": condition.train_on, "ratio": condition.ratio, "n_train": condition.n_train,
                   "epochs": runs[0]["epochs"]}
    for m in METRICS:
        value = score(runs, m)
        entry[m] = None if value is None else {"mean": value, "ci95": _ci(dist[m]),
                                               "per_seed": [score([r], m) for r in runs]}
    return entry


def _against_real(kind: str, runs: list[dict], dist: dict, real_runs: list[dict], real_dist: dict) -> dict:
    """A synthetic-only set's ratio to the real-only score, or a real + synthetic set's gain over it."""
    out = {}
    for m in METRICS:
        value, real = score(runs, m), score(real_runs, m)
        if value is None or real is None:
            out[m] = None
        elif kind == "synthetic":
            out[m] = {"value": value / real if real else math.nan, "ci95": _ci(dist[m] / real_dist[m])}
        else:
            ci = _ci(dist[m] - real_dist[m])
            out[m] = {"value": value - real, "ci95": ci, "reads": reads(ci)}
    return out


def summarize(sets: UtilitySets, conds: list[Condition], results: list[list[dict]], skipped: list[dict],
              cfg: UtilityConfig) -> dict:
    """The utility report: every training set's scores with intervals, the synthetic-only / real-only ratios
    and the real + synthetic gains (with what each gain's interval reads), every run, the skipped ratios."""
    dists = bootstrap(results, len(sets.held), cfg.bootstrap)
    real_runs, real_dist = results[0], dists[0]
    ratios, gains = [], []
    for c, runs, dist in zip(conds[1:], results[1:], dists[1:]):
        n_synthetic = c.n_train if c.train_on == "synthetic" else c.n_train - len(sets.real_train)
        entry = {"ratio": c.ratio, "n_synthetic": n_synthetic,
                 **_against_real(c.train_on, runs, dist, real_runs, real_dist)}
        (ratios if c.train_on == "synthetic" else gains).append(entry)
    return {
        "counts": {"real_train": len(sets.real_train), "real_held_out": len(sets.held),
                   "synthetic": len(sets.synthetic)},
        "held_out_split": sets.held_split, "seeds": list(cfg.seeds), "interval": INTERVAL, "draws": cfg.bootstrap,
        "metrics": [m for m in METRICS if score(real_runs, m) is not None],
        "conditions": [_condition_entry(c, r, d) for c, r, d in zip(conds, results, dists)],
        "synthetic_only_over_real_only": ratios, "real_plus_synthetic_gain": gains, "skipped": skipped,
        "runs": [{"train_on": c.train_on, "ratio": c.ratio, "n_train": c.n_train, "seed": r["seed"],
                  "epochs": r["epochs"], **{m: score([r], m) for m in METRICS}}
                 for c, runs in zip(conds, results) for r in runs],
    }


def measure_utility(real: str | Path, synthetic: str | Path, cfg: UtilityConfig, judge: JudgeConfig, *,
                    device: str | torch.device = "cpu", threads: int = 4, image_size: int = 32) -> dict:
    """Train downstream models of the judge's recipe on real, synthetic and real + synthetic images, score them
    on the real held-out images, and report (:func:`summarize`)."""
    sets = load_sets(real, synthetic, image_size, threads)
    conds, skipped = conditions(sets, cfg)
    for s in skipped:
        log.warning("utility: ratio %g %s", s["ratio"], s["reason"])
    results = [train_condition(sets, c, judge, cfg, device) for c in conds]
    return {"real": str(real), "synthetic": str(synthetic), "image_size": image_size,
            **summarize(sets, conds, results, skipped, cfg)}
