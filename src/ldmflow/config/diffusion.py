"""The diffusion stage's experiment config, with the named UNet presets."""

from __future__ import annotations

import dataclasses
from typing import Literal

from ldmflow.config.common import EarlyStoppingConfig, EmaConfig, Experiment, OptimConfig, TrainConfig
from ldmflow.config.schema import param

# --------------------------------------------------------------------------------------------------
# Diffusion stage
# --------------------------------------------------------------------------------------------------

# Named UNet presets: an ablation grid over capacity (base width x levels) and attention placement, after
# the original research code's capacity_unet128_d4 and attention ablations. A preset fills the model keys
# an experiment file leaves out; keys the file sets win.
UNET_PRESETS: dict[str, dict] = {
    "demo_tiny": {"base_channels": 32, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_levels": [1]},
    "capacity_unet32_d2": {"base_channels": 32, "channel_mult": [1, 2], "num_res_blocks": 2, "attention_levels": [1]},
    "capacity_unet64_d3": {"base_channels": 64, "channel_mult": [1, 2, 2], "num_res_blocks": 2,
                           "attention_levels": [1, 2]},
    "capacity_unet128_d3": {"base_channels": 128, "channel_mult": [1, 2, 2], "num_res_blocks": 2,
                            "attention_levels": [1, 2]},
    "capacity_unet128_d4": {"base_channels": 128, "channel_mult": [1, 2, 2, 4], "num_res_blocks": 2,
                            "attention_levels": [2, 3]},
    "capacity_unet192_d4": {"base_channels": 192, "channel_mult": [1, 2, 2, 4], "num_res_blocks": 2,
                            "attention_levels": [2, 3]},
    "attn_none_unet128_d4": {"base_channels": 128, "channel_mult": [1, 2, 2, 4], "num_res_blocks": 2,
                             "attention_levels": []},
    "attn_lowest_unet128_d4": {"base_channels": 128, "channel_mult": [1, 2, 2, 4], "num_res_blocks": 2,
                               "attention_levels": [3]},
    "attn_all_unet128_d4": {"base_channels": 128, "channel_mult": [1, 2, 2, 4], "num_res_blocks": 2,
                            "attention_levels": [0, 1, 2, 3]},
}


@dataclasses.dataclass
class UNetConfig:
    preset: str | None = param(None,
                               "Named architecture preset (ldmflow.config.diffusion.UNET_PRESETS); keys set here win.")
    base_channels: int = param(64, "Channels of the first level; later levels multiply it.", minimum=8)
    channel_mult: list[int] = param([1, 2, 2], "Channel multiplier per level (the number of levels).", minItems=1)
    num_res_blocks: int = param(2, "ResNet blocks per level.", minimum=1)
    attention_levels: list[int] = param([1, 2], "Level indices (0 = full latent resolution) with self-attention.")
    head_channels: int = param(32, "Channels per attention head.", minimum=8)
    dropout: float = param(0.0, "Dropout inside ResNet blocks.", minimum=0.0, maximum=0.9)
    class_conditional: bool = param(True, "Condition on class labels (when the data has labels).")
    label_dropout: float = param(
        0.1, "Probability of dropping the label during training (classifier-free guidance).", minimum=0.0, maximum=1.0,
    )
    checkpointing: bool = param(
        False, "Activation checkpointing: recompute each block's activations (ResNet block and its attention) in "
        "the backward pass instead of keeping them (much less activation memory for one more forward "
        "pass of the blocks per step; same values).",
    )

    def __post_init__(self):
        levels = len(self.channel_mult)
        bad = [i for i in self.attention_levels if not 0 <= i < levels]
        if bad:
            raise ValueError(f"key 'model.attention_levels' has {self.attention_levels}; allowed: level indices "
                             f"0..{levels - 1} (one per entry of model.channel_mult)")


# (beta_start, beta_end) when a file leaves them null: DDPM (Ho et al. 2020) and latent diffusion (Rombach et al.).
DEFAULT_BETAS: dict[str, tuple[float, float]] = {"linear": (1e-4, 0.02), "scaled_linear": (0.00085, 0.012)}


@dataclasses.dataclass
class NoiseConfig:
    timesteps: int = param(1000, "Number of diffusion timesteps T.", minimum=2)
    schedule: Literal["linear", "scaled_linear", "cosine"] = param(
        "scaled_linear", "Noise schedule: linear (DDPM), scaled_linear (latent diffusion), cosine (Nichol & Dhariwal).",
    )
    beta_start: float | None = param(None, "First beta; null: 1e-4 (linear) or 0.00085 (scaled_linear).",
                                     exclusiveMinimum=0.0)
    beta_end: float | None = param(None, "Last beta; null: 0.02 (linear) or 0.012 (scaled_linear).",
                                   exclusiveMinimum=0.0)
    prediction: Literal["epsilon", "v"] = param("epsilon", "What the network predicts: the noise or v (Salimans & Ho).")

    def __post_init__(self):
        if self.schedule == "cosine" and (self.beta_start is not None or self.beta_end is not None):
            raise ValueError("keys 'diffusion.beta_start' and 'diffusion.beta_end' apply to the linear and "
                             "scaled_linear schedules only; allowed with cosine: null")
        defaults = DEFAULT_BETAS.get(self.schedule)
        if defaults:
            start = defaults[0] if self.beta_start is None else self.beta_start
            end = defaults[1] if self.beta_end is None else self.beta_end
            if not start <= end < 1:
                raise ValueError(f"keys 'diffusion.beta_start' and 'diffusion.beta_end' give {start} and {end}; "
                                 "allowed: beta_start <= beta_end < 1")


@dataclasses.dataclass
class DiffusionLossConfig:
    min_snr_gamma: float | None = param(
        None, "Min-SNR-gamma loss weighting (Hang et al. 2023), e.g. 5; null weights every timestep equally.",
        exclusiveMinimum=0.0,
    )


@dataclasses.dataclass
class SamplingConfig:
    sampler: Literal["ddpm", "ddim", "dpmpp_2m"] = param("ddim", "Sampler for the epoch samples and `ldmflow sample`.")
    steps: int = param(50, "Sampling steps.", minimum=1)
    eta: float = param(0.0, "DDIM eta: 0 deterministic, 1 DDPM-like noise.", minimum=0.0, maximum=1.0)
    guidance: float = param(1.0, "Classifier-free guidance scale; 1 disables guidance.", minimum=0.0)
    per_class: int = param(4, "Samples per class in the epoch grid (per row when unconditional).", minimum=1)


@dataclasses.dataclass
class DiffusionDataConfig:
    batch_size: int = param(
        32, "Latents per micro-batch (per process): an optimizer step takes optim.accumulate micro-batches, and DDP "
        "multiplies it by the processes. The micro-batch is what GPU memory holds (`ldmflow memory`).", minimum=1,
    )
    balance_power: float = param(
        0.0, "Weighted sampling for class balance: weight ~ (1 / class frequency) ** power; 0 uniform, 1 balanced.",
        minimum=0.0, maximum=1.0,
    )
    kl_latents: Literal["mean", "sample"] = param(
        "mean", "For a KL autoencoder: train on the posterior mean, or resample from the posterior each step.",
    )
    hflip: bool = param(False, "Random horizontal flips of the latents (seeded per step).")


@dataclasses.dataclass
class DiffusionOptimConfig(OptimConfig):
    weight_decay: float = param(0.1, "AdamW decoupled weight decay.", minimum=0.0)
    warmup_steps: int = param(500, "Linear learning-rate warm-up, in optimizer steps.", minimum=0)
    schedule: Literal["constant", "cosine"] = param("cosine", "Learning-rate decay after warm-up.")


@dataclasses.dataclass
class DiffusionTrainConfig(TrainConfig):
    epochs: int = param(100, "Maximum number of epochs.", minimum=1)
    ema: EmaConfig = param(lambda: EmaConfig(decay=0.999), "Exponential moving average of the weights.")
    early_stopping: EarlyStoppingConfig = param(
        lambda: EarlyStoppingConfig(metric="val_loss", patience=0), "What 'best' means (EMA validation loss); "
        "patience 0 trains all epochs.",
    )
    sample_every: int = param(10, "Write samples/epoch_NNN.png every this many epochs.", minimum=1)


@dataclasses.dataclass
class DiffusionExperiment(Experiment):
    data: DiffusionDataConfig = param(DiffusionDataConfig, "Latent batches and class balance.")
    model: UNetConfig = param(UNetConfig, "UNet architecture.")
    diffusion: NoiseConfig = param(NoiseConfig, "Noise schedule and prediction target.")
    loss: DiffusionLossConfig = param(DiffusionLossConfig, "Loss weighting.")
    sampling: SamplingConfig = param(SamplingConfig, "Sampler for epoch samples and evaluation.")
    optim: DiffusionOptimConfig = param(DiffusionOptimConfig, "Optimizer (AdamW) and learning-rate schedule.")
    train: DiffusionTrainConfig = param(DiffusionTrainConfig, "Training loop.")
