"""Stage 1: train one autoencoder experiment (reconstruction, segmentation and classification heads)."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch

from ldmflow.artifacts import file_sha256
from ldmflow.config.autoencoder import AutoencoderExperiment
from ldmflow.config.loading import resolve_experiment, resolved_config
from ldmflow.data.dataset import ImageDataset, PreparedData, prepare_data
from ldmflow.devices import get_device, set_deterministic
from ldmflow.errors import ConfigError
from ldmflow.evaluation.metrics import background_pixels, confusion, miou, psnr, psnr_of_mse, region_squared_errors
from ldmflow.metadata import AutoencoderMeta
from ldmflow.models.autoencoder import AutoencoderLoss, build_autoencoder
from ldmflow.training.finetune import initialise
from ldmflow.training.loop import FitConfig, fit
from ldmflow.viz import colorize, grid, save_png, to_uint8

log = logging.getLogger(__name__)


def resolve_data_fields(cfg: AutoencoderExperiment, data: PreparedData, source: str) -> None:
    """Fill the config's data-derived fields (mask classes, class names, channels, intensity range and bit
    depth: what later stages rebuild the data scaling from) and check the image size."""
    cfg.data.mask_classes = data.mask_classes
    cfg.data.classes = data.classes
    cfg.data.channels = data.channels
    cfg.data.intensity.range = data.value_range
    cfg.data.intensity.source_bits = data.source_bits
    if cfg.data.image_size % cfg.model.downsample:
        raise ConfigError(
            f"{source}: key 'data.image_size' has {cfg.data.image_size}; allowed: a multiple of "
            f"model.downsample={cfg.model.downsample}"
        )


class AutoencoderTask:
    """The autoencoder stage as a :class:`ldmflow.training.loop.Task`."""

    def __init__(self, cfg: AutoencoderExperiment, model, val_set: ImageDataset):
        self.cfg, self.model = cfg, model
        self.criterion = AutoencoderLoss(cfg.loss)
        self.preview = val_set.__getitems__(list(range(min(8, len(val_set)))))

    def loss(self, model, batch, step):
        image = batch["image"]
        if self.cfg.data.hflip:
            # flips seeded by (seed, step): the same on a resumed run; drawn on the image's device, so a step
            # does not wait for a copy from the host
            gen = torch.Generator(device=image.device).manual_seed(self.cfg.seed * 7919 + step)
            flip = torch.rand(image.shape[0], generator=gen, device=image.device) < 0.5
            image = torch.where(flip[:, None, None, None], image.flip(-1), image)
            batch = {**batch, "image": image}
            if "mask" in batch:
                batch["mask"] = torch.where(flip[:, None, None], batch["mask"].flip(-1), batch["mask"])
        out = model(image)
        total, parts = self.criterion(out, batch, step)
        return total, parts

    def validate(self, model, loader) -> dict[str, float]:
        return self.validation_metrics(model, self.validation_sums(model, enumerate(loader)))

    def validation_sums(self, model, batches) -> dict[str, torch.Tensor]:
        """Sums and counts of the validation metrics over ``batches`` ((number, batch) pairs); they add up over
        DDP ranks (:class:`ldmflow.training.distributed.ShardedValidation`)."""
        k = self.cfg.data.mask_classes or 0
        sums = {"images": torch.zeros((), dtype=torch.float64), "psnr": torch.zeros((), dtype=torch.float64),
                "correct": torch.zeros((), dtype=torch.float64), "conf": torch.zeros((k, k), dtype=torch.long),
                "region": torch.zeros(2, 2, dtype=torch.float64),  # (squared errors, pixels) x (border, interior)
                "region_bg": torch.zeros(2, 2, dtype=torch.float64)}
        for _, batch in batches:
            device = next(model.parameters()).device
            batch = {key: v.to(device) for key, v in batch.items()}
            out = model(batch["image"], sample=False)
            total, parts = self.criterion(out, batch)
            size = batch["image"].shape[0]
            for key, v in {"loss": total, **parts}.items():  # batch means, weighted by batch size
                sums[f"loss_{key}"] = sums.get(f"loss_{key}", torch.zeros((), dtype=torch.float64)) + float(v) * size
            sums["images"] += size
            sums["psnr"] += float(psnr(out["recon"], batch["image"]).sum())
            sums["region"] += torch.stack(region_squared_errors(out["recon"], batch["image"]))
            if "mask" in batch:
                sums["region_bg"] += torch.stack(region_squared_errors(out["recon"], batch["image"],
                                                                       keep=background_pixels(batch["mask"])))
            if out["seg"] is not None and "mask" in batch:
                sums["conf"] += confusion(out["seg"].argmax(1).cpu(), batch["mask"].cpu(), k)
            if out["logits"] is not None and "label" in batch:
                sums["correct"] += int((out["logits"].argmax(1) == batch["label"]).sum())
        return sums

    def validation_metrics(self, model, sums: dict[str, torch.Tensor]) -> dict[str, float]:
        n_images, conf = float(sums["images"]), sums["conf"]
        metrics = {f"val_{key[5:]}": float(v) / n_images for key, v in sums.items() if key.startswith("loss_")}
        metrics["val_psnr"] = float(sums["psnr"]) / n_images
        # pooled PSNR of the outer 2-pixel ring and of the rest: a border frame shows as border < interior
        metrics["val_psnr_border"], metrics["val_psnr_interior"] = (
            psnr_of_mse(float(total / count)) for total, count in zip(*sums["region"]))
        # the same on background pixels 2+ px from any mask object: objects inside the image flatter the ring
        metrics["val_psnr_border_bg"], metrics["val_psnr_interior_bg"] = (
            psnr_of_mse(float(total / count)) if count else math.nan for total, count in zip(*sums["region_bg"]))
        metrics["val_miou"] = miou(conf) if conf.numel() and conf.sum() else math.nan
        metrics["val_acc"] = float(sums["correct"]) / n_images if model.classifier is not None else math.nan
        return metrics

    def write_samples(self, model, epoch, path):
        device = next(model.parameters()).device
        image = self.preview["image"].to(device)
        out = model(image, sample=False)
        columns = [to_uint8(image), to_uint8(out["recon"])]
        if out["seg"] is not None:
            columns.append(colorize(out["seg"].argmax(1)))
            if "mask" in self.preview:
                columns.append(colorize(self.preview["mask"]))
        save_png(grid(columns), path, upscale=max(1, 128 // image.shape[-1]))


def train_autoencoder(config, manifest: str | Path, out_dir: str | Path, *, overrides=(), device: str | None = None,
                      threads: int | None = None, progress: bool | None = None, init: str | Path | None = None) -> dict:
    """Train one autoencoder experiment on a manifest into OUT_DIR; resumes from its latest checkpoint.

    A fresh run starts from the weights ``init`` (a checkpoint path) or the config's ``init.from`` names
    (:mod:`ldmflow.training.finetune`).

    Writes ``checkpoints/NAME_checkpoint_{best,latest}.pt``, ``NAME_metrics.csv`` and
    ``samples/epoch_NNN.png``; returns the run summary (best metric, history, resume point).
    """
    cfg, source = resolve_experiment(config, "autoencoder", overrides)
    if threads:
        torch.set_num_threads(threads)
    data = prepare_data(manifest, cfg.data, cfg.seed, threads)
    data.write_skipped(out_dir)
    resolve_data_fields(cfg, data, source)
    train_set, val_set = ImageDataset(data, "train"), ImageDataset(data, "val")
    if len(val_set) == 0:
        raise ConfigError(f"{source}: no validation rows; add split=val rows or raise data.val_fraction")
    set_deterministic(cfg.seed)
    model = build_autoencoder(cfg)
    parent = initialise(model, cfg.init, init, source)
    dev = get_device(device)
    if dev.type == "cpu":
        # NHWC convolutions: faster training steps on a CPU (benchmarks/autoencoder_step.py compares the two).
        # Not on CUDA until measured there: its GroupNorm returns NCHW, so every block would convert back and forth.
        model = model.to(memory_format=torch.channels_last)
    log.info("%s: %d train / %d val images, %.2fM parameters", cfg.name, len(train_set), len(val_set),
             sum(p.numel() for p in model.parameters()) / 1e6)
    fc = FitConfig(stage="autoencoder", seed=cfg.seed, data=cfg.data, optim=cfg.optim, train=cfg.train,
                   resolved=resolved_config(cfg),
                   extra=AutoencoderMeta(manifest=str(manifest), data_fingerprint_sha256=data.fingerprint, init=parent,
                                         manifest_sha256=file_sha256(manifest) if Path(manifest).is_file() else None
                                         ).to_dict())
    task = AutoencoderTask(cfg, model, val_set)
    uncached = data.images is None
    return fit(task, train_set, val_set, fc, out_dir, cfg.name, device=dev,
               workers=min(4, threads or 1) if uncached else 0, progress=progress)
