"""The judge: train the pixel-space evaluation network on the real train split of a latent store's images, check
it on the real val split, save and load it, and run it on images.

The judge sees images as the data pipeline decodes them (:func:`ldmflow.data.images.load_row`, then
:func:`~ldmflow.data.images.to_unit_range` with the store's intensity range): (N, C, H, W) in [-1, 1] with the
data's channels, at the store's image size. Generated samples decoded by the autoencoder come out in the same
range and channels, so real and generated images reach the judge alike. It never sees a generated image while
it trains: its real-val figures say how far its scores can be trusted.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ldmflow import __version__
from ldmflow.artifacts import CHECKPOINT_FORMAT, save_checkpoint
from ldmflow.config.judge import AugmentConfig, JudgeConfig
from ldmflow.config.schema import to_dict
from ldmflow.data.latent_store import LatentStore
from ldmflow.devices import set_deterministic
from ldmflow.errors import DataError
from ldmflow.evaluation.image_files import DecodedLatents, ImageFiles, Rows, read_images
from ldmflow.evaluation.metrics import confusion, confusion_scores
from ldmflow.evaluation.two_sample import wilson_interval
from ldmflow.metadata import JudgeMeta
from ldmflow.models.judge import Judge

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------
# Real images
# --------------------------------------------------------------------------------------------------


@dataclass
class RealImages:
    """A latent store's images, decoded from their files as the data pipeline decodes them."""

    images: torch.Tensor  # (N, C, H, W) float in [-1, 1]
    labels: torch.Tensor | None  # (N,) int64, -1 where a row has no label; None: no labels at all
    masks: torch.Tensor | None  # (N, H, W) int64; None without masks
    split: np.ndarray  # (N,) "train" / "val" / "test"
    classes: list[str] | None
    mask_classes: int | None
    value_range: list[list[float]] | None  # the store's intensity range (None: 8-bit data)
    source: str
    rows: np.ndarray | None = None  # the store rows read (all when None)

    def indices(self, *splits: str) -> np.ndarray:
        return np.flatnonzero(np.isin(self.split, splits))


def real_images(source: str | Path, threads: int = 4, image_size: int = 32, max_per_split: int | None = None,
                seed: int = 0) -> RealImages:
    """Every row of a latent store (``*.zarr``: its split, labels and masks, the workflow's case) or of a manifest
    (split as the training stages split it, at ``image_size``) as the judge sees it: the image file decoded at
    the data's size and channels, scaled by the data's intensity range. ``max_per_split``: of a store, a
    seeded draw of at most that many rows of each split, stratified by class, is read (scores need no more;
    memory stays bounded)."""
    source = Path(source)
    if not (source / "zarr.json").is_file():
        from ldmflow.config.common import DataConfig
        from ldmflow.data.dataset import ImageDataset, prepare_data

        data = prepare_data(source, DataConfig(image_size=image_size), threads=threads)
        batch = ImageDataset(data, None).__getitems__(list(range(len(data.paths))))
        labels = torch.from_numpy(data.labels.astype(np.int64)) if data.labels is not None else None
        return RealImages(batch["image"], labels, batch.get("mask"), data.split, data.classes, data.mask_classes,
                          data.value_range, str(source))
    store = LatentStore(source)
    value_range = (store.info.intensity or {}).get("range")
    split = store.split
    rows = np.arange(store.n)
    if max_per_split is not None:
        from ldmflow.data.draws import stratified_rows

        each = [np.flatnonzero(split == s) for s in np.unique(split)]
        labels = store.labels
        rows = np.sort(np.concatenate([idx[stratified_rows(labels[idx], min(max_per_split, len(idx)), seed)]
                                       for idx in each]))
    paths = store.paths
    images = read_images([paths[i] for i in rows], store.info.image_size, store.info.channels,
                         value_range, str(store.path), threads)
    labels = None
    if store.classes and (store.labels >= 0).any():
        labels = torch.from_numpy(store.labels[rows].astype(np.int64))
    masks = (torch.from_numpy(store.masks.get_orthogonal_selection((rows,)).astype(np.int64))
             if store.masks is not None else None)
    out = RealImages(images, labels, masks, split[rows], store.classes, store.mask_classes, value_range,
                     str(store.path))
    out.rows = rows  # the store rows read, in order (their latents, for reconstructions)
    return out


# --------------------------------------------------------------------------------------------------
# Augmentation
# --------------------------------------------------------------------------------------------------


def _uniform(n: int, lo: float, hi: float, gen: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=gen)


def augment(x: torch.Tensor, masks: torch.Tensor | None, cfg: AugmentConfig, gen: torch.Generator
            ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Random flips and shifts (image and mask together), colour jitter, blur and noise of images (N, C, H, W)
    in [-1, 1] and masks (N, H, W); every draw comes from ``gen``."""
    n, c, h, w = x.shape
    x = x.clone()
    m = masks.clone() if masks is not None else None
    for flag, dim in ((cfg.hflip, -1), (cfg.vflip, -2)):
        if flag:
            sel = torch.rand(n, generator=gen) < 0.5
            x[sel] = x[sel].flip(dim)
            if m is not None:
                m[sel] = m[sel].flip(dim)
    s = min(cfg.shift, h - 1, w - 1)
    if s > 0:
        xp = F.pad(x, (s, s, s, s), mode="reflect")
        mp = F.pad(m[:, None].float(), (s, s, s, s), mode="reflect")[:, 0].long() if m is not None else None
        dy, dx = (torch.randint(0, 2 * s + 1, (n,), generator=gen) for _ in range(2))
        x = torch.stack([xp[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])
        if mp is not None:
            m = torch.stack([mp[i, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])
    j = cfg.jitter
    if j > 0:
        mean = x.mean((1, 2, 3), keepdim=True)
        contrast = _uniform(n, 1 - j, 1 + j, gen)[:, None, None, None]
        gain = (1 + j * (2 * torch.rand(n, c, 1, 1, generator=gen) - 1))
        offset = _uniform(n, -j, j, gen)[:, None, None, None]
        x = (x - mean) * contrast * gain + mean + offset
    if cfg.blur > 0:
        sel = torch.rand(n, generator=gen) < cfg.blur
        if sel.any():
            sigma = _uniform(int(sel.sum()), 0.3, 1.0, gen)
            k1 = torch.exp(-torch.tensor([1.0, 0.0, 1.0])[None] / (2 * sigma[:, None] ** 2))  # (b, 3)
            k1 = k1 / k1.sum(1, keepdim=True)
            kernels = (k1[:, :, None] * k1[:, None, :])  # (b, 3, 3)
            xb = F.pad(x[sel], (1, 1, 1, 1), mode="replicate")
            b = len(kernels)
            weight = kernels.repeat_interleave(c, 0)[:, None]  # (b * C, 1, 3, 3)
            x[sel] = F.conv2d(xb.reshape(1, b * c, h + 2, w + 2), weight, groups=b * c).reshape(b, c, h, w)
    if cfg.noise > 0:
        x = x + _uniform(n, 0, cfg.noise, gen)[:, None, None, None] * torch.randn(x.shape, generator=gen)
    return x.clamp(-1, 1), m


# --------------------------------------------------------------------------------------------------
# Running the judge
# --------------------------------------------------------------------------------------------------


def _flip_dims(cfg: AugmentConfig) -> tuple[int, ...]:
    return tuple(d for flag, d in ((cfg.hflip, -1), (cfg.vflip, -2)) if flag)


Images = torch.Tensor | ImageFiles | Rows | DecodedLatents  # (N, C, H, W) in [-1, 1]: ``len()`` and ``[lo:hi]`` slices
SegKeep = Callable[[torch.Tensor, slice], torch.Tensor]  # (b, H, W) class ids of rows lo:hi -> (b, ...) kept


@torch.no_grad()
def judge_batches(model: Judge, images: Images, batch_size: int = 128
                  ) -> Iterator[tuple[slice, dict[str, torch.Tensor | None]]]:
    """:func:`judge_outputs` a batch at a time: ``(rows, outputs)`` of images ``rows`` (on the CPU), reading
    ``images`` (a tensor, :class:`ImageFiles`, :class:`Rows` or :class:`DecodedLatents`) one batch at a time."""
    model.eval()
    device = next(model.parameters()).device
    size = model.image_size
    for lo in range(0, len(images), batch_size):
        x = images[lo:lo + batch_size].to(device, torch.float32)
        h, w = x.shape[-2:]
        if (h, w) != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        views = [model(x)] + [model(x.flip(d)) for d in model.flips]
        out = {"features": torch.stack([v["features"] for v in views]).mean(0).double().cpu(), "probs": None,
               "seg": None}
        if views[0]["logits"] is not None:
            out["probs"] = torch.stack([v["logits"].softmax(1) for v in views]).mean(0).cpu()
        if views[0]["seg"] is not None:
            out["seg"] = _segmentation(model, views, (h, w)).cpu()
        yield slice(lo, lo + len(x)), out


def _segmentation(model: Judge, views: list[dict], shape: tuple[int, int]) -> torch.Tensor:
    """(b, H, W) class ids at the images' own size: the views' softmax summed, each flipped back."""
    seg = views[0]["seg"].softmax(1)
    for v, d in zip(views[1:], model.flips):
        seg = seg + v["seg"].softmax(1).flip(d)
    if tuple(seg.shape[-2:]) != shape:
        seg = F.interpolate(seg, size=shape, mode="bilinear")
    return seg.argmax(1)


def _keep(out: dict[str, torch.Tensor | None], batch: dict[str, torch.Tensor | None], rows: slice, n: int) -> None:
    """A batch's per-image outputs written into ``out``'s (N, ...) tensors, each made at the first batch: pieces
    kept alive between the batches' large activations would fragment the heap, and memory grow with N."""
    for key, value in batch.items():
        if value is not None:
            out[key] = value.new_empty((n, *value.shape[1:])) if out[key] is None else out[key]
            out[key][rows] = value


def judge_outputs(model: Judge, images: Images, batch_size: int = 128, seg: SegKeep | None = None
                  ) -> dict[str, torch.Tensor | None]:
    """The judge on images (N, C, H, W) in [-1, 1] of any size: ``features`` (N, D), ``probs`` (N, K) or None,
    ``seg`` (N, H, W) class ids at the images' own size, or None. Images of another size than the judge's
    are resized to it first (and the segmentation back). Each image is read as it is and flipped the ways the
    judge trained on (test-time augmentation: probabilities and features averaged over the views).

    ``images`` is read a batch at a time (:func:`judge_batches`); ``seg`` says what to keep of each image's
    segmentation (e.g. its pixels of each class), so that scoring N images never holds N images at once."""
    out: dict[str, torch.Tensor | None] = {"features": None, "probs": None, "seg": None}
    for rows, batch in judge_batches(model, images, batch_size):
        if batch["seg"] is not None and seg is not None:
            batch["seg"] = seg(batch["seg"], rows)
        _keep(out, batch, rows, len(images))
    return out


def ensemble_outputs(judges: list[Judge], images: Images, batch_size: int = 128
                     ) -> list[dict[str, torch.Tensor | None]]:
    """:func:`judge_outputs` of several judges (e.g. an ensemble's :func:`members`), reading each batch of images
    once for all of them: images decoded on the fly (:class:`ImageFiles`, :class:`DecodedLatents`) are decoded
    once, not once per judge."""
    outs: list[dict[str, torch.Tensor | None]] = [dict.fromkeys(("features", "probs", "seg")) for _ in judges]
    for lo in range(0, len(images), batch_size):
        x = images[lo:lo + batch_size]
        rows = slice(lo, lo + len(x))
        for judge, out in zip(judges, outs):
            for _, batch in judge_batches(judge, x, len(x)):
                _keep(out, batch, rows, len(images))
    return outs


def _scores(model: Judge, images: Images, masks: torch.Tensor | None, k: int | None
            ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The judge's class probabilities (N, K) of ``images`` and the confusion counts (K, K) of its segmentation
    against ``masks`` (None without a class head, or without masks or a segmentation head), a batch at a time."""
    out: dict[str, torch.Tensor | None] = {"probs": None}
    conf = None
    for rows, batch in judge_batches(model, images):
        _keep(out, {"probs": batch["probs"]}, rows, len(images))
        if batch["seg"] is not None and masks is not None:
            counts = confusion(batch["seg"], masks[rows].cpu(), k)
            conf = counts if conf is None else conf.add_(counts)
    return out["probs"], conf


def segmentation_of(model: Judge, images: Images, masks: torch.Tensor, k: int) -> dict:
    """:func:`~ldmflow.evaluation.metrics.segmentation_scores` of the judge's segmentation of ``images`` against
    ``masks`` (N, H, W), counted a batch at a time."""
    return confusion_scores(_scores(model, images, masks, k)[1])


def validity(model: Judge, images: Images, labels: torch.Tensor | None, masks: torch.Tensor | None,
             mask_classes: int | None, classes: list[str] | None) -> dict:
    """How good the judge is on real images it never trained on: accuracy (with a 95% Wilson interval),
    balanced and per-class accuracy, mIoU and per-class IoU."""
    probs, conf = _scores(model, images, masks, mask_classes)
    result: dict = {"n": len(images)}
    if probs is not None and labels is not None:
        known = labels >= 0
        pred, truth = probs.argmax(1)[known], labels[known]
        correct = int((pred == truth).sum())
        per_class = {}
        for k, name in enumerate(classes or []):
            sel = truth == k
            per_class[name] = float((pred[sel] == k).float().mean()) if sel.any() else None
        present = [v for v in per_class.values() if v is not None]
        result.update(accuracy=correct / max(len(truth), 1), accuracy_ci95=wilson_interval(correct, len(truth)),
                      balanced_accuracy=float(np.mean(present)) if present else math.nan,
                      per_class_accuracy=per_class, labelled=len(truth))
    if conf is not None:
        result.update(confusion_scores(conf))
    return result


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------


def soft_dice_loss(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """1 - the soft Dice coefficient (Milletari et al. 2016) averaged over the classes present in the batch:
    a small shape's pixels count as much as the background's, which cross-entropy alone lets dominate."""
    k = logits.shape[1]
    probs = logits.softmax(1)  # (N, K, H, W)
    onehot = F.one_hot(masks, k).permute(0, 3, 1, 2).float()
    inter, total = (probs * onehot).sum((0, 2, 3)), (probs + onehot).sum((0, 2, 3))  # (K,) each
    present = onehot.sum((0, 2, 3)) > 0
    return 1 - (2 * inter[present] / total[present].clamp_min(1e-6)).mean()


def _class_weights(labels: torch.Tensor, k: int, balance: bool) -> torch.Tensor | None:
    if not balance:
        return None
    counts = torch.bincount(labels[labels >= 0], minlength=k).float()
    weights = counts.sum() / (k * counts.clamp_min(1))
    return weights / weights[counts > 0].mean()


def _held_out(real: RealImages, source: str | Path) -> tuple[np.ndarray, np.ndarray, str]:
    """The train rows, the held-out rows and the held-out split's name (val, or test when there is no val)."""
    train = real.indices("train")
    held_split = "val" if len(real.indices("val")) else "test"
    held = real.indices(held_split)
    if not len(train) or not len(held):
        raise DataError(f"{source}: the judge needs train rows and val (or test) rows; the store has "
                        f"{len(train)} train and {len(held)} val/test rows")
    return train, held, held_split


def _validity_on(model: Judge, real: RealImages, rows: np.ndarray) -> dict:
    """:func:`validity` on some rows of the real images."""
    return validity(model, Rows(real.images, rows), None if real.labels is None else real.labels[rows],
                    None if real.masks is None else real.masks[rows], real.mask_classes, real.classes)


def _batch_loss(model: Judge, real: RealImages, rows: torch.Tensor, cfg: JudgeConfig,
                weights: torch.Tensor | None, gen: torch.Generator, device: str | torch.device) -> torch.Tensor:
    """One augmented batch's loss: weighted cross-entropy on the labelled rows, plus ``seg_weight`` times
    cross-entropy and soft Dice on the masks."""
    x, m = augment(real.images[rows], None if real.masks is None else real.masks[rows], cfg.augment, gen)
    out = model(x.to(device))
    loss = torch.zeros((), device=device)
    if out["logits"] is not None:
        y = real.labels[rows].to(device)
        if (y >= 0).any():
            loss = loss + F.cross_entropy(out["logits"], y, weight=None if weights is None
                                          else weights.to(device), ignore_index=-1)
    if out["seg"] is not None:
        m = m.to(device)
        loss = loss + cfg.seg_weight * (F.cross_entropy(out["seg"], m) + soft_dice_loss(out["seg"], m))
    return loss


def _train_epoch(model: Judge, real: RealImages, train: np.ndarray, cfg: JudgeConfig, opt: torch.optim.Optimizer,
                 sched: torch.optim.lr_scheduler.LRScheduler, weights: torch.Tensor | None, gen: torch.Generator,
                 device: str | torch.device) -> float:
    """One pass over the train rows in a shuffled order; returns the mean loss per image."""
    model.train()
    order = torch.from_numpy(train)[torch.randperm(len(train), generator=gen)]
    total = 0.0
    for lo in range(0, len(order), cfg.batch_size):
        rows = order[lo:lo + cfg.batch_size]
        loss = _batch_loss(model, real, rows, cfg, weights, gen, device)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        total += float(loss.detach()) * len(rows)
    return total / len(train)


def _judge_info(source: str | Path, real: RealImages, num_classes: int | None, cfg: JudgeConfig) -> dict:
    """What a saved judge carries besides its weights: its data, classes, image shape and config."""
    return {"latents": str(Path(source).resolve()), "classes": real.classes, "num_classes": num_classes,
            "mask_classes": real.mask_classes, "channels": int(real.images.shape[1]),
            "image_size": int(real.images.shape[-1]), "value_range": real.value_range, "config": to_dict(cfg)}


def fit_judge(real: RealImages, train: np.ndarray, held: np.ndarray, cfg: JudgeConfig,
              device: str | torch.device = "cpu") -> tuple[Judge, list[dict]]:
    """One judge of ``cfg``'s recipe and seed trained on rows ``train`` of ``real`` (its heads: the labels and
    masks ``real`` has), checked on rows ``held`` every ``eval_every`` epochs. Returns the model (eval mode)
    and its training curve. Same seed, same judge (on CPU)."""
    num_classes = len(real.classes) if real.labels is not None else None
    set_deterministic(cfg.seed)
    model = Judge(real.images.shape[1], num_classes, real.mask_classes if real.masks is not None else None,
                  cfg.width, cfg.levels, image_size=real.images.shape[-1], flips=_flip_dims(cfg.augment)).to(device)
    steps = cfg.epochs * math.ceil(len(train) / cfg.batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=steps, pct_start=0.15)
    weights = _class_weights(real.labels[train], num_classes, cfg.balance) if num_classes else None
    gen = torch.Generator().manual_seed(cfg.seed)
    curve = []
    for epoch in range(1, cfg.epochs + 1):
        loss = _train_epoch(model, real, train, cfg, opt, sched, weights, gen, device)
        if epoch % cfg.eval_every == 0 or epoch == cfg.epochs:
            v = _validity_on(model, real, held)
            curve.append({"epoch": epoch, "train_loss": loss, "val_accuracy": v.get("accuracy"),
                          "val_miou": v.get("miou")})
            log.info("judge (seed %d) epoch %d/%d: train loss %.4f, real-val accuracy %s, mIoU %s", cfg.seed, epoch,
                     cfg.epochs, loss, _fmt(v.get("accuracy")), _fmt(v.get("miou")))
    return model.eval(), curve


def train_judge(latents: str | Path, cfg: JudgeConfig | None = None, *, device: str | torch.device = "cpu",
                threads: int = 4, image_size: int = 32) -> tuple[Judge, dict]:
    """Train the judge ensemble (``cfg.members`` judges, seeds ``cfg.seed``, ``cfg.seed + 1``, ...) on the real
    train split of a latent store's images (or a manifest's, at ``image_size``) and check each on the val split
    (the test split when there is no val split). Returns the first member, holding the whole ensemble in
    ``model.members``, and its record: real-val figures of the first member and of every member, the training
    curve, the counts. Same seed, same judges (on CPU)."""
    cfg = cfg or JudgeConfig()
    start = time.monotonic()
    real = real_images(latents, threads, image_size)
    train, held, held_split = _held_out(real, latents)
    members, curves = [], []
    for i in range(cfg.members):
        model, curve = fit_judge(real, train, held, dataclasses.replace(cfg, seed=cfg.seed + i), device)
        members.append(model)
        curves.append(curve)
    model = members[0]
    counts = {s: int((real.split == s).sum()) for s in ("train", "val", "test")}
    per_member = [{"seed": cfg.seed + i, "real_val": _validity_on(m, real, held)} for i, m in enumerate(members)]
    record = {
        "real_val": per_member[0]["real_val"], "real_train": _validity_on(model, real, train),
        "held_out_split": held_split, "counts": counts, "curve": curves[0], "seconds": time.monotonic() - start,
        "heads": {"class": model.classifier is not None, "segmentation": model.segmenter is not None},
        "members": per_member, "ensemble": {key: spread([m["real_val"].get(key) for m in per_member])
                                            for key in ("accuracy", "miou")},
    }
    for m, r in zip(members, per_member):
        m.info = _judge_info(latents, real, len(real.classes) if real.labels is not None else None, cfg)
        m.validity = {"real_val": r["real_val"], "held_out_split": held_split, "counts": counts}
        m.members = members
    return model, record


# --------------------------------------------------------------------------------------------------
# The ensemble
# --------------------------------------------------------------------------------------------------


def members(model: Judge) -> list[Judge]:
    """The judges of the ensemble ``model`` heads (trained or loaded; a single old judge: itself alone)."""
    return list(getattr(model, "members", None) or [model])


def spread(values: list[float | None]) -> dict | None:
    """One score as every judge of the ensemble gives it: the median, the range (``min``..``max``) and each
    member's value. A target counts as met only at ``min`` (:func:`meets`). None when no judge gives it."""
    known = [float(v) for v in values if v is not None and not math.isnan(v)]
    if not known:
        return None
    return {"median": float(np.median(known)), "min": min(known), "max": max(known), "members": known,
            "n": len(known)}


def meets(scores: dict | None, target: float) -> bool:
    """Whether an ensemble's score (a :func:`spread`) meets ``target``: at the range's low end, so every judge
    agrees that it does."""
    return scores is not None and scores["min"] >= target


def ensemble_score(model: Judge, score) -> dict | None:
    """``score(judge) -> float | None`` for every judge of the ensemble, as a :func:`spread`."""
    return spread([score(m) for m in members(model)])


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


# --------------------------------------------------------------------------------------------------
# Saving and loading
# --------------------------------------------------------------------------------------------------


def save_judge(model: Judge, record: dict, path: str | Path) -> None:
    """Write ``judge.pt`` atomically: the first member's weights, config and data facts (read back by
    :func:`ldmflow.checkpoints.load_judge`, which reads a file without further members as a one-judge
    ensemble), its real-val figures, and each further member's seed, weights and real-val figures."""
    meta, config = JudgeMeta.of_judge(model)
    weights = [{k: v.cpu() for k, v in m.state_dict().items()} for m in members(model)]
    per_member = record.get("members") or [{"seed": config["seed"], "real_val": record["real_val"]}]
    state = {"format": CHECKPOINT_FORMAT, "stage": "judge", "name": "judge", "config": config,
             "extra": meta.to_dict(), "model": weights[0],
             "validity": {k: record[k] for k in ("real_val", "held_out_split", "counts")},
             "members": [{"seed": r["seed"], "model": w, "real_val": r["real_val"]}
                         for r, w in zip(per_member[1:], weights[1:])],
             "ldmflow_version": __version__}
    save_checkpoint(state, path)
