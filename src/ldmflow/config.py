"""Typed experiment configs, validated early against JSON schemas generated from the dataclasses.

Each experiment file (autoencoder, diffusion, ControlNet) is a YAML mapping with the sections
``name``, ``seed``, ``data``, ``model``, ``loss``, ``optim``, ``train``. The dataclasses below are the one
source of truth: their fields give each key's type, default and description, and their metadata its
range. :func:`json_schema` turns a dataclass into a JSON schema (written to ``config/schemas/`` for
readers and editors), and :func:`load_config` validates a file against it with ``jsonschema`` before
building the typed object, so an unknown key, a wrong type or an out-of-range value stops with an error
that names the file, the key and what is allowed.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar

import jsonschema
import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the file, the key and what is allowed."""


def param(default: Any = dataclasses.MISSING, doc: str = "", **constraints: Any) -> Any:
    """A dataclass field with a description and JSON-schema constraints (minimum, maximum, ...)."""
    meta = {"doc": doc, **constraints}
    if isinstance(default, (list, dict)):
        value = copy.deepcopy(default)
        return dataclasses.field(default_factory=lambda: copy.deepcopy(value), metadata=meta)
    if (dataclasses.is_dataclass(default) and isinstance(default, type)) or callable(default):
        return dataclasses.field(default_factory=default, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


# --------------------------------------------------------------------------------------------------
# Sections shared by every stage
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class DataConfig:
    image_size: int = param(32, "Side of the square training images: resize the short side, centre-crop.", minimum=8)
    batch_size: int = param(16, "Images per optimizer step (per process; DDP multiplies it).", minimum=1)
    val_fraction: float = param(
        0.15, "Fraction of rows held out for validation when the manifest has no split column.",
        minimum=0.0, maximum=0.9,
    )
    mask_classes: int | None = param(
        None, "Number of segmentation classes (mask ids 0..K-1); null infers max id + 1 from the masks.",
        minimum=2,
    )
    classes: list[str] | None = param(
        None, "Class names; integer labels index into this list. null infers the sorted unique labels.",
    )
    hflip: bool = param(False, "Random horizontal flips of training images (seeded per epoch and image).")
    skip_bad_rows: bool = param(
        False, "Skip manifest rows with missing or corrupt files instead of stopping; the count is logged "
        "and written to skipped_rows.json next to the outputs.",
    )
    cache_max_gb: float = param(
        4.0, "Hold the decoded dataset in memory when it is smaller than this; else decode per batch.",
        minimum=0.0,
    )


@dataclasses.dataclass
class EarlyStoppingConfig:
    metric: str = param("val_loss", "Metrics column that decides 'best' and early stopping.")
    mode: Literal["min", "max"] = param("min", "Whether lower or higher values of the metric are better.")
    patience: int = param(5, "Epochs without improvement before stopping; 0 disables early stopping.", minimum=0)
    min_delta: float = param(0.0, "Smallest change of the metric that counts as an improvement.", minimum=0.0)


@dataclasses.dataclass
class OptimConfig:
    lr: float = param(1e-4, "Peak learning rate of AdamW.", exclusiveMinimum=0.0)
    weight_decay: float = param(0.01, "AdamW decoupled weight decay.", minimum=0.0)
    betas: list[float] = param([0.9, 0.999], "AdamW betas.", minItems=2, maxItems=2)
    warmup_steps: int = param(0, "Linear learning-rate warm-up, in optimizer steps.", minimum=0)
    schedule: Literal["constant", "cosine"] = param("constant", "Learning-rate decay after warm-up.")
    min_lr_ratio: float = param(0.1, "Cosine decay floor, as a fraction of lr.", minimum=0.0, maximum=1.0)
    grad_clip: float | None = param(1.0, "Clip the global gradient norm to this value; null disables.", exclusiveMinimum=0.0)
    accumulate: int = param(1, "Micro-batches per optimizer step (gradient accumulation).", minimum=1)


@dataclasses.dataclass
class EmaConfig:
    decay: float = param(0.0, "EMA decay of the weights; 0 disables EMA.", minimum=0.0, maximum=1.0)
    warmup: int = param(
        100, "EMA warm-up: the decay used at step s is min(decay, (1 + s) / (10 + s)) until it reaches "
        "decay, so early averages are not dominated by random initial weights.", minimum=0,
    )


@dataclasses.dataclass
class TrainConfig:
    epochs: int = param(10, "Maximum number of epochs.", minimum=1)
    early_stopping: EarlyStoppingConfig = param(EarlyStoppingConfig, "When to stop and what 'best' means.")
    precision: Literal["fp32", "bf16", "fp16"] = param(
        "bf16", "Mixed precision on CUDA (fp16 uses a grad scaler). CPU always runs fp32.",
    )
    ema: EmaConfig = param(EmaConfig, "Exponential moving average of the weights.")
    compile: bool = param(False, "torch.compile the model (CUDA only; ignored on CPU).")
    cuda_graphs: bool = param(
        False, "With compile: capture forward and backward in CUDA graphs (mode reduce-overhead); needs static "
        "shapes, so the last short batch of an epoch is dropped (it always is).",
    )
    sample_every: int = param(1, "Write samples/epoch_NNN.png every this many epochs.", minimum=1)
    log_every: int = param(50, "Steps between progress updates (each one syncs the host).", minimum=1)
    checkpoint_every_steps: int = param(
        0, "Also save the latest checkpoint every this many optimizer steps; 0: only at epoch ends.", minimum=0,
    )
    checkpoint_every_minutes: float = param(
        30.0, "Also save the latest checkpoint after this many minutes of training; 0 disables.", minimum=0.0,
    )
    max_bad_steps: int = param(
        0, "Optimizer steps with a NaN or inf loss to skip before stopping with an error.", minimum=0,
    )


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


@dataclasses.dataclass
class AutoencoderTrainConfig(TrainConfig):
    epochs: int = param(20, "Maximum number of epochs.", minimum=1)


@dataclasses.dataclass
class AutoencoderExperiment:
    name: str = param(dataclasses.MISSING, "Run name: names the outputs NAME_checkpoint_best.pt etc.", pattern=r"^[A-Za-z0-9_.-]+$")
    seed: int = param(42, "Seed of every random choice (initialisation, split, shuffling).", minimum=0)
    data: DataConfig = param(DataConfig, "Data loading.")
    model: AutoencoderModelConfig = param(AutoencoderModelConfig, "Autoencoder architecture.")
    loss: AutoencoderLossConfig = param(AutoencoderLossConfig, "Heads and their weights.")
    optim: OptimConfig = param(OptimConfig, "Optimizer (AdamW) and learning-rate schedule.")
    train: AutoencoderTrainConfig = param(AutoencoderTrainConfig, "Training loop.")


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
    preset: str | None = param(None, "Named architecture preset (ldmflow.config.UNET_PRESETS); keys set here win.")
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
    beta_start: float | None = param(None, "First beta; null: 1e-4 (linear) or 0.00085 (scaled_linear).", exclusiveMinimum=0.0)
    beta_end: float | None = param(None, "Last beta; null: 0.02 (linear) or 0.012 (scaled_linear).", exclusiveMinimum=0.0)
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
    batch_size: int = param(32, "Latents per optimizer step (per process; DDP multiplies it).", minimum=1)
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
class DiffusionExperiment:
    name: str = param(dataclasses.MISSING, "Run name: names the outputs NAME_checkpoint_best.pt etc.", pattern=r"^[A-Za-z0-9_.-]+$")
    seed: int = param(42, "Seed of every random choice.", minimum=0)
    data: DiffusionDataConfig = param(DiffusionDataConfig, "Latent batches and class balance.")
    model: UNetConfig = param(UNetConfig, "UNet architecture.")
    diffusion: NoiseConfig = param(NoiseConfig, "Noise schedule and prediction target.")
    loss: DiffusionLossConfig = param(DiffusionLossConfig, "Loss weighting.")
    sampling: SamplingConfig = param(SamplingConfig, "Sampler for epoch samples and evaluation.")
    optim: DiffusionOptimConfig = param(DiffusionOptimConfig, "Optimizer (AdamW) and learning-rate schedule.")
    train: DiffusionTrainConfig = param(DiffusionTrainConfig, "Training loop.")


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


@dataclasses.dataclass
class ControlSamplingConfig:
    sampler: Literal["ddpm", "ddim", "dpmpp_2m"] = param("ddim", "Sampler for the epoch grid, control fidelity and `ldmflow sample`.")
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
        """The diffusion sampling settings (what :func:`ldmflow.samplers.sample` reads)."""
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
class ControlNetTrainConfig(TrainConfig):
    epochs: int = param(50, "Maximum number of epochs.", minimum=1)
    ema: EmaConfig = param(lambda: EmaConfig(decay=0.999), "Exponential moving average of the weights.")
    early_stopping: EarlyStoppingConfig = param(
        lambda: EarlyStoppingConfig(metric="val_loss", patience=0), "What 'best' means (EMA validation loss, or "
        "val_control_miou with mode max); patience 0 trains all epochs.",
    )
    sample_every: int = param(10, "Write samples/epoch_NNN.png every this many epochs.", minimum=1)


@dataclasses.dataclass
class ControlNetExperiment:
    name: str = param(dataclasses.MISSING, "Run name: names the outputs NAME_checkpoint_best.pt etc.", pattern=r"^[A-Za-z0-9_.-]+$")
    base: str | None = param(
        None, "Name of the base diffusion experiment; the workflow trains on its best checkpoint, and "
        "`ldmflow train-controlnet --base` refuses a checkpoint of another experiment. null: any (CLI only).",
        pattern=r"^[A-Za-z0-9_.-]+$",
    )
    seed: int = param(42, "Seed of every random choice.", minimum=0)
    control: ControlConfig = param(ControlConfig, "The control signal.")
    data: DiffusionDataConfig = param(DiffusionDataConfig, "Latent batches and class balance (hflip flips the control too).")
    model: ControlNetModelConfig = param(ControlNetModelConfig, "Fusion mode and control encoder.")
    sampling: ControlSamplingConfig = param(ControlSamplingConfig, "Sampler, guidance and conditioning scale.")
    evaluation: ControlEvaluationConfig = param(ControlEvaluationConfig, "Control fidelity measurement.")
    optim: OptimConfig = param(OptimConfig, "Optimizer (AdamW) and learning-rate schedule.")
    train: ControlNetTrainConfig = param(ControlNetTrainConfig, "Training loop.")


STAGES: dict[str, type] = {"autoencoder": AutoencoderExperiment, "diffusion": DiffusionExperiment,
                           "controlnet": ControlNetExperiment}


def apply_presets(data: dict, stage: str, source: str) -> dict:
    """Fill a diffusion experiment's model keys from its named preset (keys the file sets win)."""
    model = data.get("model") if isinstance(data, dict) else None
    if stage != "diffusion" or not isinstance(model, dict) or model.get("preset") is None:
        return data
    preset = model["preset"]
    if preset not in UNET_PRESETS:
        raise ConfigError(f"{source}: key 'model.preset' has value {preset!r}; allowed: {', '.join(UNET_PRESETS)}")
    return {**data, "model": {**UNET_PRESETS[preset], **model}}


# --------------------------------------------------------------------------------------------------
# Schema generation
# --------------------------------------------------------------------------------------------------


def _type_schema(tp: Any) -> dict:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        non_null = [a for a in args if a is not type(None)]
        inner = _type_schema(non_null[0]) if len(non_null) == 1 else {"anyOf": [_type_schema(a) for a in non_null]}
        return {"anyOf": [inner, {"type": "null"}]} if len(non_null) < len(args) else inner
    if origin is Literal:
        return {"enum": list(args)}
    if origin in (list, tuple):
        return {"type": "array", "items": _type_schema(args[0])} if args else {"type": "array"}
    if origin is dict:
        return {"type": "object"}
    if dataclasses.is_dataclass(tp):
        return json_schema(tp)
    simple = {bool: "boolean", int: "integer", float: "number", str: "string"}
    if tp in simple:
        return {"type": simple[tp]}
    if tp is Any:
        return {}
    raise TypeError(f"no JSON schema for type {tp!r}")


def json_schema(cls: type) -> dict:
    """The JSON schema of a config dataclass: types, defaults, descriptions, ranges, no unknown keys."""
    hints = typing.get_type_hints(cls)
    properties: dict[str, dict] = {}
    required: list[str] = []
    for f in dataclasses.fields(cls):
        schema = _type_schema(hints[f.name])
        meta = dict(f.metadata)
        doc = meta.pop("doc", "")
        if meta:
            target = schema["anyOf"][0] if "anyOf" in schema and {"type": "null"} in schema["anyOf"] else schema
            target.update(meta)
        if doc:
            schema["description"] = doc
        if f.default is not dataclasses.MISSING:
            schema["default"] = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            value = f.default_factory()  # type: ignore[misc]
            schema["default"] = to_dict(value) if dataclasses.is_dataclass(value) else value
        else:
            required.append(f.name)
        properties[f.name] = schema
    out = {"type": "object", "properties": properties, "additionalProperties": False}
    if required:
        out["required"] = required
    return out


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def _describe_allowed(schema: dict) -> str:
    if "enum" in schema:
        return "one of " + ", ".join(repr(v) for v in schema["enum"])
    if "anyOf" in schema:
        # range keys beside an anyOf (e.g. a number or a list of numbers) bound its numeric alternatives
        bounds = {k: v for k, v in schema.items() if k in ("minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum")}
        return " or ".join(_describe_allowed({**bounds, **s} if s.get("type") in ("number", "integer") else s)
                           for s in schema["anyOf"])
    parts = [schema.get("type", "any value")]
    for key, word in (("minimum", ">="), ("exclusiveMinimum", ">"), ("maximum", "<="), ("exclusiveMaximum", "<")):
        if key in schema:
            parts.append(f"{word} {schema[key]}")
    if "pattern" in schema:
        parts.append(f"matching {schema['pattern']}")
    return " ".join(str(p) for p in parts)


def _format_error(err: jsonschema.ValidationError, source: str) -> str:
    key = ".".join(str(p) for p in err.absolute_path) or "(top level)"
    if err.validator == "additionalProperties":
        allowed = sorted(err.schema.get("properties", {}))
        extra = sorted(set(err.instance) - set(allowed))
        where = f"{key}." if err.absolute_path else ""
        return (
            f"{source}: unknown key {', '.join(repr(where + e) for e in extra)}; "
            f"allowed keys{' under ' + key if err.absolute_path else ''}: {', '.join(allowed)}"
        )
    if err.validator == "required":
        return f"{source}: {err.message} (under {key})"
    return f"{source}: key '{key}' has value {err.instance!r}; allowed: {_describe_allowed(err.schema)}"


def validate(data: dict, cls: type, source: str = "<config>") -> None:
    """Raise ConfigError naming the source, the key and what is allowed, for the first problems found."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of keys to values, got {type(data).__name__}")
    validator = jsonschema.Draft202012Validator(json_schema(cls))
    errors = sorted(validator.iter_errors(data), key=lambda e: list(map(str, e.absolute_path)))
    if errors:
        raise ConfigError("\n".join(_format_error(e, source) for e in errors[:5]))


def from_dict(cls: type[T], data: dict) -> T:
    """Build a (validated) config dataclass from a plain mapping, recursively."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name not in data:
            continue
        value, tp = data[f.name], hints[f.name]
        if dataclasses.is_dataclass(tp) and isinstance(value, dict):
            value = from_dict(tp, value)
        elif tp is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        kwargs[f.name] = copy.deepcopy(value)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    """A config dataclass as a plain, YAML- and checkpoint-safe mapping (the resolved config)."""
    return dataclasses.asdict(cfg)


def apply_overrides(data: dict, overrides: list[str] | tuple[str, ...], source: str = "--set") -> dict:
    """Apply ``dotted.key=value`` overrides (values parsed as YAML) to a raw config mapping."""
    data = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"{source}: override {item!r} must look like dotted.key=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{source}: cannot set {key!r}: {part!r} is not a section")
        node[parts[-1]] = yaml.safe_load(raw)
    return data


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    return {} if data is None else data


def load_config(path_or_dict: str | Path | dict, stage: str = "autoencoder", overrides: list[str] | tuple[str, ...] = ()):
    """Load, override and validate an experiment config; returns the typed experiment dataclass."""
    if stage not in STAGES:
        raise ConfigError(f"unknown stage {stage!r}; allowed: {', '.join(STAGES)}")
    if isinstance(path_or_dict, dict):
        data, source = path_or_dict, "<config>"
    else:
        data, source = read_yaml(path_or_dict), str(path_or_dict)
    data = apply_presets(apply_overrides(data, overrides), stage, source)
    cls = STAGES[stage]
    validate(data, cls, source)
    try:
        return from_dict(cls, data)
    except ValueError as exc:  # cross-field checks in __post_init__
        raise ConfigError(f"{source}: {exc}") from None


def schema_documents() -> dict[str, str]:
    """The JSON schema of each stage's experiment files, as written to ``config/schemas/<stage>.schema.json``."""
    import json

    docs = {}
    for stage, cls in STAGES.items():
        schema = {"$schema": "https://json-schema.org/draft/2020-12/schema",
                  "title": f"ldmflow {stage} experiment", **json_schema(cls)}
        docs[f"{stage}.schema.json"] = json.dumps(schema, indent=2) + "\n"
    return docs


def resolve_experiment(config, stage: str, overrides=()) -> tuple[object, str]:
    """A stage's experiment: an experiment object as given, or a file/mapping loaded and validated.
    Returns it and the name errors cite (the file, or the experiment's name)."""
    cls = STAGES[stage]
    if isinstance(config, cls):
        return config, config.name
    return load_config(config, stage, overrides), str(config)

