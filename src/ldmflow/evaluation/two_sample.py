"""Scores of generated images in a judge's feature space: a classifier two-sample test (Lopez-Paz & Oquab 2017),
Fréchet distance and precision/recall, and binomial confidence intervals for the fractions."""

from __future__ import annotations

import numpy as np
import torch

from ldmflow.evaluation.quality import frechet_distance, precision_recall
from ldmflow.evaluation.verdict import wilson


def wilson_interval(successes: int, n: int) -> list[float] | None:
    """The 95% Wilson score interval [low, high] of a binomial fraction successes / n (None for n = 0)."""
    return list(wilson(successes, n)) if n > 0 else None


def _fit_logistic(x: torch.Tensor, y: torch.Tensor, l2: float) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-regularised logistic regression by L-BFGS: weights (D,), bias () of float64 features (N, D)."""
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ w + b, y) + 0.5 * l2 * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def two_sample_test(real: np.ndarray, generated: np.ndarray, *, folds: int = 5, l2: float = 0.1,
                    seed: int = 0) -> dict:
    """Classifier two-sample test: can a logistic regression on the features tell real from generated?

    Both sets are cut to the same size n (a seeded draw from the larger), so chance is exactly 0.5; the
    accuracy is that of k-fold cross-validated predictions on all 2n images (features standardised on each
    training fold), with a 95% Wilson interval. 0.5: indistinguishable; 1.0: every image told apart.
    """
    rng = np.random.default_rng(seed)
    n = min(len(real), len(generated))
    if n < folds:
        return {"available": False, "reason": f"{n} image(s) in the smaller set; the test needs at least {folds}",
                "n_real": len(real), "n_generated": len(generated)}
    a = np.asarray(real, np.float64)[np.sort(rng.permutation(len(real))[:n])]
    b = np.asarray(generated, np.float64)[np.sort(rng.permutation(len(generated))[:n])]
    x = torch.from_numpy(np.concatenate([a, b]))
    y = torch.cat([torch.ones(n), torch.zeros(n)]).double()
    # stratified folds: each fold takes the same count of real and generated images
    fold_of = np.empty(2 * n, np.int64)
    for half in (np.arange(n), np.arange(n, 2 * n)):
        fold_of[half[rng.permutation(n)]] = np.arange(n) % folds
    correct = 0
    for k in range(folds):
        test, train = torch.from_numpy(fold_of == k), torch.from_numpy(fold_of != k)
        mean, std = x[train].mean(0), x[train].std(0).clamp_min(1e-8)
        w, bias = _fit_logistic((x[train] - mean) / std, y[train], l2)
        pred = (((x[test] - mean) / std) @ w + bias) > 0
        correct += int((pred.double() == y[test]).sum())
    return {"available": True, "accuracy": correct / (2 * n), "accuracy_ci95": wilson_interval(correct, 2 * n),
            "n_per_set": n, "n_real": len(real), "n_generated": len(generated), "folds": folds,
            "classifier": f"logistic regression (L2 {l2:g}) on standardised judge features",
            "meaning": "0.5: real held-out and generated images are indistinguishable to the classifier; 1.0: "
                       "every image is told apart"}


def feature_scores(train: np.ndarray, held_out: np.ndarray, generated: np.ndarray, k: int = 3) -> dict:
    """Fréchet distance and precision/recall of generated features against the real train features, each next
    to what real held-out images get (the reference: a model as good as new real data would get about that)."""
    out: dict = {"n_train": len(train), "n_held_out": len(held_out), "n_generated": len(generated)}
    for name, feats in (("generated", generated), ("held_out", held_out)):
        if len(feats) < 2:
            out[name] = {"available": False, "reason": f"{len(feats)} image(s)"}
            continue
        scores: dict = {"fd": frechet_distance(train, feats)}
        if len(feats) > k and len(train) > k:
            scores.update({m: v for m, v in precision_recall(train, feats, k).items() if m != "k"})
        out[name] = scores
    out["pr_k"] = k
    return out
