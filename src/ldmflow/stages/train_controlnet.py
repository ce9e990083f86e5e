"""Stage 5: train a ControlNet (add, concat or film fusion) on a trained diffusion UNet and pre-embedded latents.

The diffusion task does the noising, the class labels (with the base experiment's label dropout) and
the validation loss, with the base experiment's noise schedule, prediction target and loss weighting;
this stage adds the control to every batch and measures control fidelity: it samples the EMA model on
a fixed set of validation controls, decodes the latents, runs the autoencoder's segmentation head on the
images and reports the mIoU against the rows' masks (``val_control_miou``), next to the uncontrolled
base model sampled from the same noise and labels.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch

from ldmflow.artifacts import RunPaths, atomic_write_json, file_sha256, inference_weights, load_checkpoint
from ldmflow.checkpoints import load_diffusion, verified_autoencoder
from ldmflow.config.controlnet import ControlNetExperiment
from ldmflow.config.diffusion import DiffusionExperiment
from ldmflow.config.loading import resolve_experiment, resolved_config
from ldmflow.data.controls import ControlDataset, control_channels, control_preview, edge_controls, manifest_controls
from ldmflow.data.latent_store import LatentDataset, LatentStore, store_provenance
from ldmflow.devices import get_device, set_deterministic
from ldmflow.diffusion.generate import decode_chunked, generate, seeded_noise
from ldmflow.errors import ConfigError
from ldmflow.evaluation.metrics import segmentation_scores
from ldmflow.metadata import ControlNetMeta, DiffusionMeta, LatentsInfo
from ldmflow.models.controlnet import ControlledUNet, build_controlnet
from ldmflow.models.unet import count_parameters
from ldmflow.tasks import DiffusionTask
from ldmflow.training.batching import balancing_weights
from ldmflow.training.distributed import rank
from ldmflow.training.finetune import initialise
from ldmflow.training.loop import FitConfig, fit
from ldmflow.viz import grid, save_png, to_uint8

log = logging.getLogger(__name__)

FIDELITY_FILE = "control_fidelity.json"
FIDELITY_BATCH = 64  # samples per sampler call when measuring fidelity


# --------------------------------------------------------------------------------------------------
# The task
# --------------------------------------------------------------------------------------------------


class ControlNetTask(DiffusionTask):
    """ControlNet training as a :class:`ldmflow.training.loop.Task`.

    ``self.cfg`` is the base diffusion experiment (noise schedule, prediction, loss, label dropout: the
    inherited noising and validation loss use it unchanged); ``self.experiment`` the ControlNet one.
    ``base`` is the untouched base UNet, sampled for the uncontrolled comparison.
    """

    def __init__(self, cfg: ControlNetExperiment, base_cfg: DiffusionExperiment, model: ControlledUNet, base,
                 store: LatentStore, num_classes: int | None, device, val_set: ControlDataset,
                 provenance: LatentsInfo):
        super().__init__(base_cfg, model, store, num_classes, device)
        self.experiment = cfg
        self.hflip, self.aligned = cfg.data.hflip, ("control",)  # flip latent and control together
        self.base = base.to(device).eval().requires_grad_(False)
        self.val_set = val_set
        self.provenance = provenance
        self.mask_classes = store.mask_classes
        self._fixed: dict | None = None
        self.base_scores: dict | None = None

    # ---- training --------------------------------------------------------------------------------

    def predict(self, model, x_t, t, y, batch):
        # the control arrives as stored (uint8); its one-hot or scaled form is made here, on the model's device
        return model(x_t, t, y, control=self.val_set.model_input(batch["control"]))

    # ---- evaluation ------------------------------------------------------------------------------

    def decoder(self):
        if self._decoder is None:
            self._decoder = verified_autoencoder(self.provenance, self.device).model
        return self._decoder

    def fidelity_available(self) -> str | None:
        """None when control fidelity can be measured, else the reason it cannot."""
        if self.experiment.evaluation.fidelity_samples == 0:
            return "evaluation.fidelity_samples is 0"
        if self.mask_classes is None:
            return "the latent store has no masks"
        if self.decoder().segmenter is None:
            return "the autoencoder has no segmentation head"
        return None

    def fixed_rows(self) -> dict:
        """Validation rows drawn seeded and stratified by class (fidelity and grid), on the device: control, mask,
        label, latent."""
        if self._fixed is None:
            from ldmflow.data.draws import stratified_rows

            n = min(len(self.val_set), max(self.experiment.evaluation.fidelity_samples,
                                           self.experiment.sampling.grid_rows))
            labels = None if self.val_set.labels is None else self.val_set.labels.numpy()
            picks = stratified_rows(labels, n, self.experiment.seed, length=len(self.val_set))
            batch = self.val_set.__getitems__(picks.tolist())
            self._fixed = {k: v.to(self.device) for k, v in batch.items()}
            self._fixed["control"] = self.val_set.model_input(self._fixed["control"])
        return self._fixed

    def _sampling(self, steps: int | None = None):
        sampling = self.experiment.sampling.base()
        if steps is not None:
            sampling.steps = steps
        return sampling

    def _labels_of(self, rows: dict, n: int) -> torch.Tensor | None:
        if self.num_classes is None:
            return None
        y = rows["label"][:n]
        return torch.where(y < 0, self.num_classes, y)  # unlabelled rows take the null label

    @torch.no_grad()
    def sample_rows(self, model, rows: dict, n: int, sampling, controlled: bool = True):
        """Samples of the first n fixed rows, decoded: images (N, I, H, W) and the segmentation head's class ids
        (N, H, W), or None without a head. The noise comes from the experiment's seed, so the controlled
        model and the uncontrolled base (``controlled`` false: ``self.base``, no control) start from the same."""
        noise, gen = seeded_noise(n, self.store.latent_shape, seed=self.experiment.seed, device=self.device)
        z = generate(model if controlled else self.base, self.schedule, noise, labels=self._labels_of(rows, n),
                     controls=rows["control"][:n] if controlled else None, control_scale=self.experiment.sampling.scale,
                     sampling=sampling, prediction=self.cfg.diffusion.prediction, generator=gen,
                     batch_size=FIDELITY_BATCH)
        images, seg = decode_chunked(self.decoder(), z / self.store.scale_factor, with_seg=True)
        return images, (None if seg is None else seg.argmax(1))

    def scores(self, model, *, controlled: bool = True) -> dict:
        """Control fidelity of the (EMA) model, or of the uncontrolled base when ``controlled`` is false."""
        rows = self.fixed_rows()
        n = min(self.experiment.evaluation.fidelity_samples, len(rows["mask"]))
        _, seg = self.sample_rows(model, rows, n, self._sampling(self.experiment.evaluation.steps), controlled)
        return {"rows": n, **segmentation_scores(seg, rows["mask"][:n], self.mask_classes)}

    def validation_metrics(self, model, sums) -> dict[str, float]:
        metrics = super().validation_metrics(model, sums)
        # sampled on rank 0 alone: under DDP its metrics row is the one every rank records
        if rank() == 0 and self.fidelity_available() is None:
            if self.base_scores is None:
                self.base_scores = self.scores(self.base, controlled=False)
                log.info("uncontrolled base model: control mIoU %.4f", self.base_scores["miou"])
            metrics["val_control_miou"] = self.scores(model)["miou"]
        return metrics

    def write_samples(self, model, epoch, path):
        rows = self.fixed_rows()
        n = min(self.experiment.sampling.grid_rows, len(rows["control"]))
        images, _ = self.sample_rows(model, rows, n, self._sampling())
        # the autoencoder's reconstruction of the ground truth
        truth, _ = decode_chunked(self.decoder(), rows["latent"][:n] / self.store.scale_factor)
        columns = [control_preview(self.experiment.control.signal, rows["control"][:n]), to_uint8(images),
                   to_uint8(truth)]
        save_png(grid(columns), path, upscale=max(1, 64 // images.shape[-1]))


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def check_base(cfg: ControlNetExperiment, base_cfg: DiffusionExperiment, base_meta: DiffusionMeta,
               provenance: LatentsInfo, base_path: Path, source: str) -> None:
    """Refuse a base checkpoint of another experiment, or one trained on other latents."""
    if cfg.base is not None and cfg.base != base_cfg.name:
        raise ConfigError(f"{source}: key 'base' names the diffusion experiment {cfg.base!r}, but {base_path} is "
                          f"a checkpoint of {base_cfg.name!r}")
    base = base_meta.latents
    if base.autoencoder_sha256 != provenance.autoencoder_sha256 or base.latent_shape != provenance.latent_shape:
        raise ConfigError(f"{base_path} was trained on latents of {base.autoencoder_checkpoint} "
                          f"({base.latent_channels} x {base.latent_size}^2); the latent store "
                          f"{provenance.latents} holds latents of {provenance.autoencoder_checkpoint} "
                          f"({provenance.latent_channels} x {provenance.latent_size}^2): embed with the "
                          "base model's autoencoder")


def stored_controls(cfg: ControlNetExperiment, store: LatentStore, image_size: int):
    """Edge maps or manifest control images of every store row (N, K, H, W) uint8; None for masks."""
    signal = cfg.control.signal
    if signal == "edges":
        log.info("computing Sobel edge maps of %d images (%d px)", store.n, image_size)
        return edge_controls(store.paths, image_size, str(store.path), store.info.channels)
    if signal == "image":
        manifest = cfg.control.manifest or store.info.manifest.path
        if not manifest:
            raise ConfigError(f"{store.path}: the latent store records no manifest; set control.manifest to the "
                              "manifest with the 'control' column")
        log.info("reading %d control images from the 'control' column of %s", store.n, manifest)
        return manifest_controls(manifest, store.paths, image_size)
    return None


def control_geometry(cfg: ControlNetExperiment, store: LatentStore) -> tuple[int, int]:
    """A ControlNet's control channels and the factor from image to latent resolution, from its latent store."""
    return control_channels(cfg.control.signal, store.mask_classes), store.info.image_size // store.latent_shape[1]


def control_dataset(cfg: ControlNetExperiment, store: LatentStore, split: str | None, stored,
                    raw: bool = False) -> ControlDataset:
    """One split's latents with their controls (``stored``: the store's control images, see :func:`stored_controls`;
    ``raw``: controls as stored, uint8, for the training task to convert on the device). Masks are read for a
    mask control, and for the rows control fidelity draws from (every split but train)."""
    return ControlDataset(LatentDataset(store, split, kl_latents=cfg.data.kl_latents), cfg.control.signal,
                          store.mask_classes, stored, raw=raw, masks=split != "train")


def train_controlnet(config, latents: str | Path, base: str | Path, out_dir: str | Path, *, overrides=(),
                     device: str | None = None, threads: int | None = None, progress: bool | None = None,
                     init: str | Path | None = None) -> dict:
    """Train one ControlNet experiment on a latent store and a base diffusion checkpoint into OUT_DIR.

    Resumes from OUT_DIR's latest checkpoint. Writes ``checkpoints/NAME_checkpoint_{best,latest}.pt``
    (self-contained: the base UNet's weights and config are inside), ``NAME_metrics.csv`` (with
    ``val_control_miou``), ``samples/epoch_NNN.png`` (control | generated | ground truth, EMA model) and
    ``control_fidelity.json`` (the best checkpoint's control mIoU against the uncontrolled base's). A fresh
    run starts from the weights ``init`` (a ControlNet checkpoint path) or the config's ``init.from`` names.
    """
    cfg, source = resolve_experiment(config, "controlnet", overrides)
    if threads:
        torch.set_num_threads(threads)
    dev = get_device(device)
    store = LatentStore(latents)
    provenance = store_provenance(store)
    base_path = Path(base)
    loaded = load_diffusion(base_path, dev)
    base_model, base_cfg = loaded.model, loaded.config
    check_base(cfg, base_cfg, loaded.meta, provenance, base_path, source)
    num_classes = loaded.meta.num_classes
    k, factor = control_geometry(cfg, store)
    image_size = store.info.image_size
    stored = stored_controls(cfg, store, image_size)
    train_set, val_set = (control_dataset(cfg, store, split, stored, raw=True) for split in ("train", "val"))
    if len(val_set) == 0:
        raise ConfigError(f"{latents}: the store has no validation rows; the ControlNet stage needs some")

    set_deterministic(cfg.seed)  # the control branch's initialisation
    model = build_controlnet(cfg.model, copy.deepcopy(base_model).train(), k, factor)
    parent = initialise(model, cfg.init, init, source)
    weights = balancing_weights(train_set.labels, cfg.data.balance_power)
    log.info("%s: %s fusion, %s control (%d channels at %d px) on %s; %d train / %d val latents; %.2fM of %.2fM "
             "parameters train", cfg.name, cfg.model.fusion, cfg.control.signal, k, image_size, base_cfg.name,
             len(train_set), len(val_set), count_parameters(model, trainable_only=True) / 1e6,
             count_parameters(model) / 1e6)
    meta = ControlNetMeta(latents=provenance, num_classes=num_classes, init=parent, base_checkpoint=str(base_path),
                          base_sha256=file_sha256(base_path), base_config=resolved_config(base_cfg),
                          signal=cfg.control.signal, control_channels=k, downsample=factor, image_size=image_size)
    fc = FitConfig(stage="controlnet", seed=cfg.seed, data=cfg.data, optim=cfg.optim, train=cfg.train,
                   resolved=resolved_config(cfg), extra=meta.to_dict())
    task = ControlNetTask(cfg, base_cfg, model, base_model, store, num_classes, dev, val_set, provenance)
    result = fit(task, train_set, val_set, fc, out_dir, cfg.name, device=dev, sample_weights=weights, workers=0,
                 progress=progress)
    if rank() == 0:  # under DDP the other processes only trained
        result["control_fidelity"] = write_control_fidelity(task, Path(out_dir), cfg.name, result)
    else:
        result["control_fidelity"] = {"available": False, "reason": f"measured by rank 0, not rank {rank()}"}
    return result


def write_control_fidelity(task: ControlNetTask, out_dir: Path, name: str, result: dict) -> dict:
    """``control_fidelity.json``: the best checkpoint's control mIoU against the uncontrolled base's."""
    cfg = task.experiment
    best = RunPaths(out_dir, name).best
    summary = {"experiment": name, "fusion": cfg.model.fusion, "signal": cfg.control.signal, "base": cfg.base,
               "checkpoint": str(best), "epoch": result["best"]["epoch"]}
    reason = task.fidelity_available()
    if reason is not None:
        summary.update(available=False, reason=reason)
    else:
        model = copy.deepcopy(task.model)
        model.load_state_dict(inference_weights(load_checkpoint(best, map_location=task.device)))
        model.to(task.device).eval()
        controlled = task.scores(model)
        base = task.base_scores or task.scores(task.base, controlled=False)
        sampling = task._sampling(cfg.evaluation.steps)
        summary.update(
            available=True, measure="mIoU of the autoencoder's segmentation head on the decoded samples against the "
            "masks of the first validation rows (the uncontrolled base: same noise and labels, no control)",
            rows=controlled.pop("rows"), sampler=sampling.sampler, steps=sampling.steps, guidance=sampling.guidance,
            scale=cfg.sampling.scale, seed=cfg.seed, controlled=controlled,
            uncontrolled_base={k: v for k, v in base.items() if k != "rows"},
            gain=controlled["miou"] - base["miou"])
        log.info("%s control mIoU %.4f, uncontrolled base %.4f (gain %+.4f)", name, controlled["miou"], base["miou"],
                 summary["gain"])
    atomic_write_json(out_dir / FIDELITY_FILE, summary)
    return summary
