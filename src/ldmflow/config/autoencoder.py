"""The autoencoder stage's experiment config."""

from __future__ import annotations

import dataclasses
from typing import Literal

from ldmflow.config.common import DataConfig, Experiment, OptimConfig, TrainConfig
from ldmflow.config.schema import param

# --------------------------------------------------------------------------------------------------
# Autoencoder stage
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class AutoencoderModelConfig:
    variant: Literal["plain", "kl"] = param("kl", "Plain autoencoder, or KL-regularised (VAE) latent.")
    downsample: Literal[4, 8] = param(4, "Spatial downsampling factor from image to latent.")
    latent_channels: int = param(4, "Channels of the latent.", minimum=1)
    base_channels: int = param(32, "Channels of the first level; later levels multiply it.", minimum=8)
    channel_mult: list[int] | None = param(
        None, "Channel multiplier per level (log2(downsample) + 1 entries); null: 1, 2, 2, ...",
    )
    num_res_blocks: int = param(1, "ResNet blocks per level.", minimum=1)
    dropout: float = param(0.0, "Dropout inside ResNet blocks.", minimum=0.0, maximum=0.9)
    norm: Literal["group", "none"] = param(
        "group", "Normalisation in the ResNet blocks: GroupNorm (latent diffusion's autoencoders), or none "
        "(narrow CPU models: faster, and sharper in a short training; keep a lower lr)."
    )
    checkpointing: bool = param(
        False, "Activation checkpointing: recompute each ResNet block's activations in the backward pass instead "
        "of keeping them (much less activation memory for one more forward pass of the blocks per step; same values).",
    )

    def __post_init__(self):
        levels = {4: 3, 8: 4}[self.downsample]
        if self.channel_mult is None:
            self.channel_mult = [1] + [2] * (levels - 1)
        if len(self.channel_mult) != levels or min(self.channel_mult) < 1:
            raise ValueError(
                f"key 'model.channel_mult' has {self.channel_mult}; allowed: {levels} positive integers "
                f"for downsample {self.downsample} (one per level)"
            )


@dataclasses.dataclass
class HeadLossConfig:
    enabled: bool = param(True, "Train this head.")
    weight: float = param(1.0, "Weight of this head's loss in the total.", minimum=0.0)


@dataclasses.dataclass
class ReconstructionLossConfig(HeadLossConfig):
    kind: Literal["l1", "mse"] = param("l1", "Per-pixel reconstruction loss.")


@dataclasses.dataclass
class SegmentationLossConfig(HeadLossConfig):
    weight: float = param(0.5, "Weight of this head's loss in the total.", minimum=0.0)
    dice: float = param(0.0, "Weight of the soft Dice loss added to the cross-entropy; 0 disables.", minimum=0.0)


@dataclasses.dataclass
class ClassificationLossConfig(HeadLossConfig):
    weight: float = param(0.1, "Weight of this head's loss in the total.", minimum=0.0)


@dataclasses.dataclass
class AutoencoderLossConfig:
    reconstruction: ReconstructionLossConfig = param(ReconstructionLossConfig, "RGB reconstruction head.")
    segmentation: SegmentationLossConfig = param(
        SegmentationLossConfig, "Segmentation head (a light decoder of its own, latent to mask logits); needs masks.",
    )
    classification: ClassificationLossConfig = param(
        ClassificationLossConfig, "Classification head (pooled latent to class logits); needs labels.",
    )
    kl_weight: float = param(1e-6, "Weight of the KL term (KL variant only).", minimum=0.0)
    heads_warmup_steps: int = param(
        0, "Optimizer steps over which the segmentation and classification weights ramp linearly from 0 to their "
        "values, so the latent first organises for reconstruction (as latent diffusion's autoencoders start "
        "their discriminator late); 0: full weights from the first step.", minimum=0,
    )


@dataclasses.dataclass
class AutoencoderTrainConfig(TrainConfig):
    epochs: int = param(20, "Maximum number of epochs.", minimum=1)


@dataclasses.dataclass
class AutoencoderExperiment(Experiment):
    data: DataConfig = param(DataConfig, "Data loading.")
    model: AutoencoderModelConfig = param(AutoencoderModelConfig, "Autoencoder architecture.")
    loss: AutoencoderLossConfig = param(AutoencoderLossConfig, "Heads and their weights.")
    optim: OptimConfig = param(OptimConfig, "Optimizer (AdamW) and learning-rate schedule.")
    train: AutoencoderTrainConfig = param(AutoencoderTrainConfig, "Training loop.")
