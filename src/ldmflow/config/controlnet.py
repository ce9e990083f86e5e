"""The ControlNet stage's experiment config."""

from __future__ import annotations

import dataclasses
from typing import Literal

from ldmflow.config.common import EarlyStoppingConfig, Experiment, OptimConfig
from ldmflow.config.diffusion import DiffusionDataConfig, DiffusionTrainConfig, SamplingConfig
from ldmflow.config.schema import param

# --------------------------------------------------------------------------------------------------
# ControlNet stage
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ControlConfig:
    signal: Literal["mask", "edges", "image"] = param(
        "mask", "The control signal: 'mask' the one-hot segmentation mask from the latent store, 'edges' a "
        "Sobel edge map of the grayscale image, 'image' the image in the manifest's 'control' column.",
    )
    manifest: str | None = param(
        None, "Manifest with the 'control' column (signal 'image' only); null: the manifest the latent store "
        "was embedded from, as the store records it.",
    )


@dataclasses.dataclass
class ControlNetModelConfig:
    fusion: Literal["add", "concat", "film"] = param(
        "add", "How the control enters the base UNet: 'add' a trainable copy of its encoder whose outputs are "
        "added to the skips and middle block (ControlNet, Zhang et al. 2023); 'concat' the control at latent "
        "resolution concatenated to the input, the whole UNet fine-tuned; 'film' a per-level scale and shift "
        "of the base UNet's encoder outputs and middle block from a small control encoder.",
    )
    hint_channels: int = param(
        32, "Width of the convolutions that bring the control from image to latent resolution (add, film).",
        minimum=4,
    )
    train_base_decoder: bool = param(
        False, "add and film: also fine-tune the base UNet's decoder; its encoder stays frozen. (concat always "
        "fine-tunes the whole UNet.)",
    )
    checkpointing: bool = param(
        False, "Activation checkpointing of the base UNet's blocks and of the trainable copy's (the base "
        "UNet's own model.checkpointing is not used): less activation memory for one more forward pass of the "
        "blocks per step.",
    )


@dataclasses.dataclass
class ControlSamplingConfig:
    sampler: Literal["ddpm", "ddim", "dpmpp_2m"] = param(
        "ddim", "Sampler for the epoch grid, control fidelity and `ldmflow sample`.",
    )
    steps: int = param(25, "Sampling steps.", minimum=1)
    eta: float = param(0.0, "DDIM eta: 0 deterministic, 1 DDPM-like noise.", minimum=0.0, maximum=1.0)
    guidance: float = param(1.0, "Classifier-free guidance scale of the class label (1 disables).", minimum=0.0)
    scale: float | list[float] = param(
        1.0, "Conditioning scale: one number, or one per UNet level (add and film; the middle block takes the "
        "last level's). 0 is the base model (add, film).", minimum=0.0, items={"type": "number", "minimum": 0.0},
    )
    grid_rows: int = param(8, "Validation controls in the epoch grid (control | generated | ground truth).", minimum=1)

    def __post_init__(self):
        if isinstance(self.scale, list):
            if not self.scale:
                raise ValueError("key 'sampling.scale' is an empty list; allowed: a number >= 0 or one per UNet level")
            self.scale = [float(s) for s in self.scale]
        else:
            self.scale = float(self.scale)

    def base(self) -> SamplingConfig:
        """The diffusion sampling settings (what :func:`ldmflow.diffusion.samplers.sample` reads)."""
        return SamplingConfig(sampler=self.sampler, steps=self.steps, eta=self.eta, guidance=self.guidance)


@dataclasses.dataclass
class ControlEvaluationConfig:
    fidelity_samples: int = param(
        32, "Validation rows (the first N) sampled each epoch to measure control fidelity: the mIoU of the "
        "autoencoder's segmentation head on the decoded samples against the rows' masks (val_control_miou). "
        "0 disables it; it needs a store with masks and an autoencoder with a segmentation head.", minimum=0,
    )
    steps: int | None = param(None, "Sampling steps for the fidelity measurement; null: sampling.steps.", minimum=1)


@dataclasses.dataclass
class ControlNetTrainConfig(DiffusionTrainConfig):
    epochs: int = param(50, "Maximum number of epochs.", minimum=1)
    early_stopping: EarlyStoppingConfig = param(
        lambda: EarlyStoppingConfig(metric="val_loss", patience=0), "What 'best' means (EMA validation loss, or "
        "val_control_miou with mode max); patience 0 trains all epochs.",
    )


@dataclasses.dataclass
class ControlNetExperiment(Experiment):
    base: str | None = param(
        None, "Name of the base diffusion experiment; the workflow trains on its best checkpoint, and "
        "`ldmflow train-controlnet --base` refuses a checkpoint of another experiment. null: any (CLI only).",
        pattern=r"^[A-Za-z0-9_.-]+$",
    )
    control: ControlConfig = param(ControlConfig, "The control signal.")
    data: DiffusionDataConfig = param(DiffusionDataConfig,
                                      "Latent batches and class balance (hflip flips the control too).")
    model: ControlNetModelConfig = param(ControlNetModelConfig, "Fusion mode and control encoder.")
    sampling: ControlSamplingConfig = param(ControlSamplingConfig, "Sampler, guidance and conditioning scale.")
    evaluation: ControlEvaluationConfig = param(ControlEvaluationConfig, "Control fidelity measurement.")
    optim: OptimConfig = param(OptimConfig, "Optimizer (AdamW) and learning-rate schedule.")
    train: ControlNetTrainConfig = param(ControlNetTrainConfig, "Training loop.")
