"""Stage 4: train a diffusion UNet on pre-embedded latents (noise prediction, EMA, class balance)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ldmflow.config.diffusion import DiffusionExperiment
from ldmflow.config.loading import resolve_experiment, resolved_config
from ldmflow.data.latent_store import LatentDataset, LatentStore, store_provenance
from ldmflow.devices import get_device, set_deterministic
from ldmflow.errors import ConfigError
from ldmflow.metadata import DiffusionMeta
from ldmflow.models.unet import build_unet, count_parameters
from ldmflow.tasks import DiffusionTask
from ldmflow.training.batching import balancing_weights
from ldmflow.training.finetune import initialise
from ldmflow.training.loop import FitConfig, fit

log = logging.getLogger(__name__)


def conditioning_classes(cfg: DiffusionExperiment, store: LatentStore) -> int | None:
    """The number of classes the UNet is conditioned on (None: unconditional)."""
    has_labels = store.classes is not None and bool((store.labels >= 0).any())
    return len(store.classes) if (cfg.model.class_conditional and has_labels) else None


def train_diffusion(config, latents: str | Path, out_dir: str | Path, *, overrides=(), device: str | None = None,
                    threads: int | None = None, progress: bool | None = None, init: str | Path | None = None) -> dict:
    """Train one diffusion experiment on a latent store into OUT_DIR; resumes from its latest checkpoint.

    A fresh run starts from the weights ``init`` (a checkpoint path) or the config's ``init.from`` names
    (:mod:`ldmflow.training.finetune`).

    Writes ``checkpoints/NAME_checkpoint_{best,latest}.pt`` (best = lowest EMA validation loss),
    ``NAME_metrics.csv`` and ``samples/epoch_NNN.png`` (EMA model, one row per class).
    """
    cfg, source = resolve_experiment(config, "diffusion", overrides)
    if threads:
        torch.set_num_threads(threads)
    store = LatentStore(latents)
    dev = get_device(device)
    train_set = LatentDataset(store, "train", kl_latents=cfg.data.kl_latents)
    val_set = LatentDataset(store, "val", kl_latents=cfg.data.kl_latents)
    if len(val_set) == 0:
        raise ConfigError(f"{latents}: the store has no validation rows; the diffusion stage needs some")
    num_classes = conditioning_classes(cfg, store)
    levels = len(cfg.model.channel_mult)
    if store.latent_shape[1] % 2 ** (levels - 1):
        raise ConfigError(f"{source}: key 'model.channel_mult' has {levels} levels; latents of side "
                          f"{store.latent_shape[1]} allow at most {store.latent_shape[1].bit_length()} "
                          "(the side must divide by 2 ** (levels - 1))")
    set_deterministic(cfg.seed)
    model = build_unet(cfg, store.latent_shape[0], num_classes)
    parent = initialise(model, cfg.init, init, source)
    weights = balancing_weights(train_set.labels, cfg.data.balance_power)
    log.info("%s: %d train / %d val latents %s, %.2fM parameters, %s", cfg.name, len(train_set), len(val_set),
             tuple(store.latent_shape), count_parameters(model) / 1e6,
             f"{num_classes} classes" if num_classes else "unconditional")
    fc = FitConfig(stage="diffusion", seed=cfg.seed, data=cfg.data, optim=cfg.optim, train=cfg.train,
                   resolved=resolved_config(cfg),
                   extra=DiffusionMeta(latents=store_provenance(store), num_classes=num_classes, init=parent).to_dict())
    task = DiffusionTask(cfg, model, store, num_classes, dev)
    return fit(task, train_set, val_set, fc, out_dir, cfg.name, device=dev, sample_weights=weights,
               workers=0, progress=progress)
