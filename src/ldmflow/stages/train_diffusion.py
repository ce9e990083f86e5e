"""Stage 4: train a diffusion UNet on pre-embedded latents (noise prediction, EMA, class balance)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ldmflow.config.diffusion import DiffusionExperiment
from ldmflow.config.loading import resolve_experiment, resolved_config
from ldmflow.data.latent_store import LatentDataset, LatentStore, store_provenance
from ldmflow.devices import get_device, set_deterministic
from ldmflow.diffusion.generate import generate
from ldmflow.diffusion.schedules import NoiseSchedule, diffusion_loss
from ldmflow.errors import ConfigError
from ldmflow.models.unet import build_unet, count_parameters
from ldmflow.stages.embed import store_autoencoder
from ldmflow.training.batching import balancing_weights
from ldmflow.training.finetune import initialise
from ldmflow.training.loop import FitConfig, fit
from ldmflow.viz import grid, save_png, to_uint8

log = logging.getLogger(__name__)

QUARTILES = 4
VAL_SEED = 1234  # fixed noise and timesteps for the validation loss, so epochs compare like with like


def conditioning_classes(cfg: DiffusionExperiment, store: LatentStore) -> int | None:
    """The number of classes the UNet is conditioned on (None: unconditional)."""
    has_labels = store.classes is not None and bool((store.labels >= 0).any())
    return len(store.classes) if (cfg.model.class_conditional and has_labels) else None


class DiffusionTask:
    """Noise-prediction training on latents as a :class:`ldmflow.training.Task`."""

    def __init__(self, cfg: DiffusionExperiment, model, store: LatentStore, num_classes: int | None, device):
        self.cfg, self.model, self.store, self.num_classes = cfg, model, store, num_classes
        self.schedule = NoiseSchedule.from_config(cfg.diffusion).to(device)
        self.device = device
        self._decoder = None
        self.hflip = cfg.data.hflip
        self.aligned: tuple[str, ...] = ()  # batch entries that flip with the latent (a ControlNet's control)

    def _noised(self, batch, gen: torch.Generator | None):
        x0 = batch["latent"]  # (N, C, h, w), already scaled by the store's scale_factor
        if "logvar" in batch:  # resample the KL posterior: z = mean + std * eps (logvar in scaled units)
            eps = torch.randn(x0.shape, generator=gen, device=x0.device)
            x0 = x0 + torch.exp(0.5 * batch["logvar"]) * eps
        t = torch.randint(0, self.schedule.timesteps, (x0.shape[0],), generator=gen, device=x0.device)
        noise = torch.randn(x0.shape, generator=gen, device=x0.device)
        return x0, t, noise

    def _labels(self, batch, drop: float, gen: torch.Generator | None):
        if self.num_classes is None:
            return None
        y = batch["label"]
        if drop > 0:  # classifier-free guidance: sometimes train the unconditional model
            mask = torch.rand(y.shape, generator=gen, device=y.device) < drop
            y = torch.where(mask | (y < 0), self.num_classes, y)
        return y

    def predict(self, model, x_t, t, y, batch):
        """The network's output on noised latents x_t (N, C, h, w); a subclass adds its conditioning from the batch."""
        return model(x_t, t, y)

    def loss(self, model, batch, step):
        x0, t, noise = self._noised(batch, None)
        if self.hflip:
            flip = torch.rand(x0.shape[0], device=x0.device)[:, None, None, None] < 0.5
            x0 = torch.where(flip, x0.flip(-1), x0)
            batch = {**batch, **{k: torch.where(flip, batch[k].flip(-1), batch[k]) for k in self.aligned}}
        y = self._labels(batch, self.cfg.model.label_dropout, None)
        out = self.predict(model, self.schedule.add_noise(x0, noise, t), t, y, batch)
        per_sample = diffusion_loss(out, x0, noise, t, self.schedule, self.cfg.diffusion.prediction,
                                    self.cfg.loss.min_snr_gamma)
        return per_sample.mean(), {}

    def evaluate(self, model, loader) -> dict[str, float]:
        gen = torch.Generator(device=self.device).manual_seed(VAL_SEED)
        sums = torch.zeros(QUARTILES, dtype=torch.float64)
        counts = torch.zeros(QUARTILES, dtype=torch.float64)
        for batch in loader:
            batch = {k: v.to(self.device) for k, v in batch.items()}
            x0, t, noise = self._noised(batch, gen)
            y = self._labels(batch, 0.0, gen)
            out = self.predict(model, self.schedule.add_noise(x0, noise, t), t, y, batch)
            # the plain MSE (no min-SNR weights), comparable across experiments
            per_sample = diffusion_loss(out, x0, noise, t, self.schedule, self.cfg.diffusion.prediction).double().cpu()
            q = (t * QUARTILES // self.schedule.timesteps).cpu()
            sums.index_add_(0, q, per_sample)
            counts.index_add_(0, q, torch.ones_like(per_sample))
        metrics = {"val_loss": float(sums.sum() / counts.sum().clamp_min(1))}
        for i in range(QUARTILES):
            metrics[f"val_loss_q{i + 1}"] = float(sums[i] / counts[i]) if counts[i] else float("nan")
        return metrics

    def decoder(self):
        if self._decoder is None:
            self._decoder = store_autoencoder(self.store, self.device)[0]
        return self._decoder

    def write_samples(self, model, epoch, path):
        images = generate(model, self.cfg, self.schedule, self.decoder(), self.store.scale_factor,
                          self.store.latent_shape, self.num_classes, seed=self.cfg.seed, device=self.device)
        rows = self.num_classes or 1
        per_row = self.cfg.sampling.per_class
        tiles = to_uint8(images).reshape(rows, per_row, *images.shape[2:], 3)  # (rows, cols, H, W, 3)
        save_png(grid([tiles[:, c] for c in range(per_row)]), path, upscale=max(1, 64 // images.shape[-1]))


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
    if dev.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    weights = balancing_weights(train_set.labels, cfg.data.balance_power)
    log.info("%s: %d train / %d val latents %s, %.2fM parameters, %s", cfg.name, len(train_set), len(val_set),
             tuple(store.latent_shape), count_parameters(model) / 1e6,
             f"{num_classes} classes" if num_classes else "unconditional")
    fc = FitConfig(stage="diffusion", seed=cfg.seed, data=cfg.data, optim=cfg.optim, train=cfg.train,
                   resolved=resolved_config(cfg), extra={**store_provenance(store), "num_classes": num_classes,
                                                         **({"init": parent} if parent else {})})
    task = DiffusionTask(cfg, model, store, num_classes, dev)
    return fit(task, train_set, val_set, fc, out_dir, cfg.name, device=dev, sample_weights=weights,
               workers=0, progress=progress)
