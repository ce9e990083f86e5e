"""Image metrics shared by the stages: PSNR, confusion matrices and mean IoU."""

from __future__ import annotations

import logging
import math

import torch


def psnr(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of images in [-1, 1] (compared in [0, 1]): (N, ...) -> (N,)."""
    mse = ((pred.float().clamp(-1, 1) - target.float()) / 2).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-10))


def border_mask(height: int, width: int, ring: int = 2) -> torch.Tensor:
    """(H, W) bool, true on the outer ``ring`` pixels: where zero-padded convolutions leave a visible frame."""
    mask = torch.ones(height, width, dtype=torch.bool)
    mask[ring:height - ring, ring:width - ring] = False
    return mask


def region_squared_errors(pred: torch.Tensor, target: torch.Tensor, ring: int = 2,
                          keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed squared errors (in [0, 1] units) of (N, C, H, W) images on the border ring and on the interior,
    and their pixel counts: ``(sums (2,), counts (2,))``, to pool over batches before :func:`psnr_of_mse`.
    ``keep`` (N, H, W) bool: count only those pixels (see :func:`background_pixels`)."""
    err = ((pred.float().clamp(-1, 1) - target.float()) / 2).pow(2)  # (N, C, H, W)
    ring_px = border_mask(*err.shape[-2:], ring).to(err.device).expand(err.shape[0], -1, -1)
    keep = torch.ones_like(ring_px) if keep is None else keep.to(err.device)
    regions = (ring_px & keep, ~ring_px & keep)
    sums = torch.stack([(err * r[:, None]).sum() for r in regions])
    counts = torch.tensor([err.shape[1] * int(r.sum()) for r in regions], dtype=torch.float64)
    return sums.double().cpu(), counts


def background_pixels(mask: torch.Tensor, margin: int = 2) -> torch.Tensor:
    """(N, H, W) bool: pixels of class 0 at least ``margin`` pixels (Chebyshev) from any other class, where a
    reconstruction's error is the autoencoder's alone, not an object edge's. A border frame shows there as
    ring < interior; over all pixels the ring of images whose objects sit inside can look better than it is."""
    objects = (mask > 0).float()[:, None]
    near = torch.nn.functional.max_pool2d(objects, 2 * margin + 1, stride=1, padding=margin)[:, 0] > 0
    return ~near


def psnr_of_mse(mse: float) -> float:
    """PSNR in dB of a mean squared error of [0, 1] images."""
    return 10 * math.log10(1.0 / max(mse, 1e-10))


def confusion(pred: torch.Tensor, target: torch.Tensor, k: int) -> torch.Tensor:
    """Confusion counts (K, K) of integer predictions against targets, rows = target."""
    return torch.bincount(target.flatten() * k + pred.flatten(), minlength=k * k).reshape(k, k)


def miou(conf: torch.Tensor) -> float:
    """Mean IoU over the classes that occur in target or prediction, from a confusion matrix."""
    conf = conf.double()
    inter = conf.diag()
    union = conf.sum(0) + conf.sum(1) - inter
    present = union > 0
    return float((inter[present] / union[present]).mean()) if present.any() else math.nan


log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------
# Control fidelity
# --------------------------------------------------------------------------------------------------


def segmentation_scores(pred: torch.Tensor, target: torch.Tensor, k: int) -> dict:
    """mIoU, pixel accuracy and per-class IoU (null for classes absent from both) of (N, H, W) class ids."""
    return confusion_scores(confusion(pred.cpu(), target.cpu(), k))


def confusion_scores(conf: torch.Tensor) -> dict:
    """:func:`segmentation_scores` from the confusion counts (K, K) of all the images, e.g. summed over batches."""
    conf = conf.double()
    inter, union = conf.diag(), conf.sum(0) + conf.sum(1) - conf.diag()
    return {"miou": miou(conf), "pixel_accuracy": float(inter.sum() / conf.sum()),
            "per_class_iou": [float(i / u) if u > 0 else None for i, u in zip(inter, union)]}
