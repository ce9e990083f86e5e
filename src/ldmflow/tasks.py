"""The training tasks of the latent stages (:class:`ldmflow.training.loop.Task`): what a loss, a validation pass
and an epoch's samples mean for a diffusion UNet on latents. The ControlNet task extends this one."""

from __future__ import annotations

import torch

from ldmflow.checkpoints import store_autoencoder
from ldmflow.config.diffusion import DiffusionExperiment
from ldmflow.data.latent_store import LatentStore
from ldmflow.diffusion.generate import decode_chunked, generate, seeded_noise
from ldmflow.diffusion.schedules import NoiseSchedule, diffusion_loss
from ldmflow.viz import grid, save_png, to_uint8

QUARTILES = 4
VAL_SEED = 1234  # fixed noise and timesteps for the validation loss, so epochs compare like with like


class DiffusionTask:
    """Noise-prediction training on latents as a :class:`ldmflow.training.loop.Task`."""

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

    def validate(self, model, loader) -> dict[str, float]:
        return self.validation_metrics(model, self.validation_sums(model, enumerate(loader)))

    def validation_sums(self, model, batches) -> dict[str, torch.Tensor]:
        """Validation losses summed per timestep quartile over ``batches`` ((number, batch) pairs), with their
        counts; they add up over DDP ranks (:class:`ldmflow.training.distributed.ShardedValidation`)."""
        gen = torch.Generator(device=self.device)
        sums = torch.zeros(QUARTILES, dtype=torch.float64)
        counts = torch.zeros(QUARTILES, dtype=torch.float64)
        for number, batch in batches:
            gen.manual_seed(VAL_SEED + number)  # a batch's noise and timesteps do not depend on the rank scoring it
            batch = {k: v.to(self.device) for k, v in batch.items()}
            x0, t, noise = self._noised(batch, gen)
            y = self._labels(batch, 0.0, gen)
            out = self.predict(model, self.schedule.add_noise(x0, noise, t), t, y, batch)
            # the plain MSE (no min-SNR weights), comparable across experiments
            per_sample = diffusion_loss(out, x0, noise, t, self.schedule, self.cfg.diffusion.prediction).double().cpu()
            q = (t * QUARTILES // self.schedule.timesteps).cpu()
            sums.index_add_(0, q, per_sample)
            counts.index_add_(0, q, torch.ones_like(per_sample))
        return {"loss": sums, "count": counts}

    def validation_metrics(self, model, sums: dict[str, torch.Tensor]) -> dict[str, float]:
        losses, counts = sums["loss"], sums["count"]
        metrics = {"val_loss": float(losses.sum() / counts.sum().clamp_min(1))}
        for i in range(QUARTILES):
            metrics[f"val_loss_q{i + 1}"] = float(losses[i] / counts[i]) if counts[i] else float("nan")
        return metrics

    def decoder(self):
        if self._decoder is None:
            self._decoder = store_autoencoder(self.store, self.device).model
        return self._decoder

    @torch.no_grad()
    def write_samples(self, model, epoch, path):
        """The epoch grid: ``per_class`` samples of each class (one row unconditional), from the run's seed."""
        per_row = self.cfg.sampling.per_class
        rows = self.num_classes or 1
        labels = torch.arange(self.num_classes, device=self.device).repeat_interleave(per_row) \
            if self.num_classes else None
        noise, gen = seeded_noise(rows * per_row, self.store.latent_shape, seed=self.cfg.seed, device=self.device)
        z = generate(model, self.schedule, noise, labels=labels, sampling=self.cfg.sampling,
                     prediction=self.cfg.diffusion.prediction, generator=gen)
        images, _ = decode_chunked(self.decoder(), z / self.store.scale_factor)  # (N, I, H, W)
        tiles = to_uint8(images).reshape(rows, per_row, *images.shape[2:], 3)  # (rows, cols, H, W, 3)
        save_png(grid([tiles[:, c] for c in range(per_row)]), path, upscale=max(1, 64 // images.shape[-1]))
