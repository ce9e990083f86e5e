"""Offline sample quality: Fréchet distance and k-NN precision/recall on feature arrays, and the features.

The numbers take feature arrays (N, D) so they can be tested on their own. The default feature space
needs no download: the autoencoder's encoder features (the last hidden layer before the posterior,
global-average pooled), see :func:`autoencoder_features`. Inception FID (Heusel et al. 2017) is only
computed from a local TorchScript Inception file the user gives (:func:`inception_features`), such as
NVIDIA's ``inception-2015-12-05.pt``; nothing is ever downloaded.

Fréchet distances of different feature spaces are not comparable with each other, and all of them are
biased upwards for small sample counts: compare a model's number with the one held-out real images get
against the same training set (the evaluation reports both).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# --------------------------------------------------------------------------------------------------
# Fréchet distance
# --------------------------------------------------------------------------------------------------


def feature_stats(features: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and covariance (D, D) of features (N, D), in float64."""
    x = features.detach().cpu().numpy() if torch.is_tensor(features) else np.asarray(features)
    x = x.astype(np.float64).reshape(len(x), -1)
    if len(x) < 2:
        raise ValueError(f"the Fréchet distance needs at least 2 feature vectors; got {len(x)}")
    return x.mean(0), np.cov(x, rowvar=False).reshape(x.shape[1], x.shape[1])


def sqrtm_psd(matrix: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix via its eigendecomposition (no scipy)."""
    w, v = np.linalg.eigh((matrix + matrix.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance_from_stats(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance of two Gaussians (Dowson & Landau 1982), as in FID (Heusel et al. 2017).

    ``|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2)``; the cross term is written with the
    symmetric matrix ``S1^1/2 S2 S1^1/2`` so that a symmetric eigendecomposition gives its trace exactly
    (its eigenvalues are those of ``S1 S2``).
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (len(mu1), len(mu1)):
        raise ValueError(f"statistics do not match: means {mu1.shape} and {mu2.shape}, "
                         f"covariances {sigma1.shape} and {sigma2.shape}")
    root1 = sqrtm_psd(sigma1)
    middle = root1 @ sigma2 @ root1
    cross = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    value = float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * cross)
    return max(value, 0.0)  # rounding can leave -1e-12 for identical statistics


def frechet_distance(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    """Fréchet distance between the Gaussians fitted to two feature sets (N, D) and (M, D)."""
    return frechet_distance_from_stats(*feature_stats(a), *feature_stats(b))


# --------------------------------------------------------------------------------------------------
# Precision and recall
# --------------------------------------------------------------------------------------------------


def _as_tensor(x: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    x = x if torch.is_tensor(x) else torch.from_numpy(np.asarray(x))
    return x.reshape(len(x), -1).to(device=device, dtype=torch.float32)


def knn_radii(features: torch.Tensor, k: int, block: int = 1024) -> torch.Tensor:
    """Distance of each feature vector (N, D) to its k-th nearest other vector (N,), in row blocks."""
    n = len(features)
    if n <= k:
        raise ValueError(f"k-NN radii with k={k} need more than {k} feature vectors; got {n}")
    out = torch.empty(n, device=features.device)
    for s in range(0, n, block):
        d = torch.cdist(features[s:s + block], features)  # (b, N)
        out[s:s + block] = d.topk(k + 1, dim=1, largest=False).values[:, -1]  # +1: itself at distance 0
    return out


def _covered(queries: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, block: int) -> torch.Tensor:
    """Whether each query lies inside at least one ball (centre, radius): (Q,) bool."""
    inside = torch.zeros(len(queries), dtype=torch.bool, device=queries.device)
    for s in range(0, len(queries), block):
        d = torch.cdist(queries[s:s + block], centres)  # (b, M)
        inside[s:s + block] = (d <= radii[None]).any(1)
    return inside


def precision_recall(real: np.ndarray | torch.Tensor, fake: np.ndarray | torch.Tensor, k: int = 3, *,
                     device: str | torch.device = "cpu", block: int = 1024) -> dict[str, float]:
    """Improved precision and recall of Kynkäänniemi et al. (2019) with k-NN manifolds.

    Each set's manifold is the union of balls around its vectors with radius the distance to the k-th
    nearest neighbour in the same set. Precision is the fraction of ``fake`` inside the real manifold
    (are samples realistic?), recall the fraction of ``real`` inside the fake manifold (is the data's
    variety covered?). Distances are computed in row blocks, never as one N x M matrix.
    """
    device = torch.device(device)
    r, f = _as_tensor(real, device), _as_tensor(fake, device)
    if r.shape[1] != f.shape[1]:
        raise ValueError(f"feature sizes differ: real {tuple(r.shape)}, fake {tuple(f.shape)}")
    precision = _covered(f, r, knn_radii(r, k, block), block).float().mean()
    recall = _covered(r, f, knn_radii(f, k, block), block).float().mean()
    return {"precision": float(precision), "recall": float(recall), "k": k}


# --------------------------------------------------------------------------------------------------
# Feature extractors
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def autoencoder_features(model: nn.Module, images: torch.Tensor, batch_size: int = 64) -> np.ndarray:
    """Encoder features of images (N, C, H, W) in [-1, 1]: the last hidden layer, average-pooled -> (N, ch).

    This is the layer the posterior (mean, log-variance) is read from, so it is what the autoencoder
    learnt to find important in the lab's own images; pooling over positions makes it an image-level
    descriptor, in the spirit of Inception's pool3 features.
    """
    enc = model.encoder
    device = next(model.parameters()).device
    out = []
    for s in range(0, len(images), batch_size):
        x = images[s:s + batch_size].to(device, torch.float32)
        h = F.silu(enc.norm_out(enc.mid(enc.blocks(enc.conv_in(x)))))  # (B, ch, h, w)
        out.append(h.mean((2, 3)).cpu())
    return torch.cat(out).numpy().astype(np.float64)


def load_inception(path: str | Path, device: str | torch.device = "cpu") -> torch.jit.ScriptModule:
    """A local TorchScript Inception network (e.g. NVIDIA's inception-2015-12-05.pt); never downloads."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: Inception weights not found (option inception=PATH)")
    try:
        with warnings.catch_warnings():  # TorchScript is deprecated, but it is the format these weights ship in
            warnings.simplefilter("ignore", DeprecationWarning)
            return torch.jit.load(str(path), map_location=device).eval()
    except Exception as exc:  # torch raises several types for files that are not TorchScript
        raise ValueError(f"{path}: not a TorchScript Inception network ({type(exc).__name__}: {exc})") from None


@torch.no_grad()
def inception_features(net: torch.jit.ScriptModule, images: np.ndarray | torch.Tensor,
                       batch_size: int = 64) -> np.ndarray:
    """Inception pool features (N, 2048) of uint8 images (N, 3, H, W), NVIDIA's calling convention.

    NVIDIA's network takes uint8 images of any size, resizes them to 299 itself, and returns its pool3
    features when called with ``return_features=True``; a network without that argument is called plainly.
    """
    x = images if torch.is_tensor(images) else torch.from_numpy(np.asarray(images))
    device = next(iter(net.parameters()), torch.empty(0)).device
    out = []
    for s in range(0, len(x), batch_size):
        batch = x[s:s + batch_size].to(device)
        try:
            feats = net(batch, return_features=True)
        except (RuntimeError, TypeError):
            feats = net(batch)
        out.append(feats.reshape(len(batch), -1).double().cpu())
    return torch.cat(out).numpy()
