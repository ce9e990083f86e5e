"""Config sections shared by every stage: data, optimisation, EMA, early stopping, training."""

from __future__ import annotations

import dataclasses
import typing
from typing import Literal

from ldmflow.config.schema import param

# The training stages, in the order the workflow runs them: the one list that experiment files, run folders
# (results/STAGE/NAME), ``init.from: STAGE/NAME`` and the workflow's wildcards use.
Stage = Literal["autoencoder", "diffusion", "controlnet"]
STAGE_NAMES: tuple[str, ...] = typing.get_args(Stage)
# The workflow config's lists of experiments (list key -> the stage of its experiments), in the order the
# workflow runs them: a --configfile that sets one must set all of them.
EXPERIMENT_LISTS: dict[str, str] = dict(zip(("autoencoders", "diffusion", "controlnets"), STAGE_NAMES, strict=True))

# --------------------------------------------------------------------------------------------------
# Sections shared by every stage
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class IntensityConfig:
    """How pixel values of images deeper than 8 bits map to [-1, 1] (8-bit images always map 0..255)."""

    mode: Literal["percentile", "bit_depth"] = param(
        "percentile", "Scaling of 16-bit and 32-bit images (16-bit PNG/TIFF, integer or float TIFF): 'percentile' "
        "maps each channel's low..high percentile, computed once over the train split, to -1..1 and clips "
        "beyond (contrast survives a dark offset or a 12-bit camera in a 16-bit file); 'bit_depth' maps "
        "0..2^bit_depth - 1 to -1..1. 8-bit images always map 0..255 to -1..1.",
    )
    low: float = param(0.5, "Mode percentile: the percentile mapped to -1.", minimum=0.0, maximum=100.0)
    high: float = param(99.5, "Mode percentile: the percentile mapped to 1.", minimum=0.0, maximum=100.0)
    bit_depth: int = param(16, "Mode bit_depth: the data's real bit depth (e.g. 12 for a 12-bit camera).",
                           minimum=1, maximum=32)
    range: list[list[float]] | None = param(
        None, "Per-channel [low, high] raw values mapped to -1 and 1. null: computed by the rule above when a "
        "run starts, then kept in the run's resolved config, its checkpoints and the latent store, so every "
        "later stage scales (and writes back) the data the same way.",
    )
    source_bits: int | None = param(
        None, "Bit depth of the image files (8, 16 or 32); null: read from the files when a run starts.",
        minimum=1, maximum=32,
    )


@dataclasses.dataclass
class DataConfig:
    image_size: int = param(32, "Side of the square training images: resize the short side, centre-crop.", minimum=8)
    batch_size: int = param(
        16, "Images per micro-batch (per process): an optimizer step takes optim.accumulate micro-batches, and DDP "
        "multiplies it by the processes. The micro-batch is what GPU memory holds (`ldmflow memory`).", minimum=1,
    )
    val_fraction: float = param(
        0.15, "Fraction of rows held out for validation when the manifest has no split column.",
        minimum=0.0, maximum=0.9,
    )
    mask_classes: int | None = param(
        None, "Number of segmentation classes (mask ids 0..K-1); null infers max id + 1 from the masks.",
        minimum=2,
    )
    mask_values: dict[str, int] | list[int] | None = param(
        None, "How raw mask values map to class ids: a mapping such as {0: 0, 255: 1}, or the raw values in class "
        "order such as [0, 128, 255]. null: values are class ids, except masks holding only 0 and one other value "
        "k (0/255 from an image editor), which are read as binary (k -> 1); inferring more than 32 classes is an "
        "error naming the values found.",
    )
    mask_palette: dict[str, int] | list[list[int]] | None = param(
        None, "Colour-coded RGB masks: a mapping such as {'#ff0000': 1, '#00ff00': 2} (colour -> class id), or "
        "the [r, g, b] colours in class order. null: an RGB mask is an error (unless R = G = B).",
    )
    max_upscale: float | None = param(
        None, "The largest upscaling of an image (image_size / its short side) allowed; an image needing more is "
        "an error naming its row (or is skipped with skip_bad_rows). null: allowed, and images upscaled more than "
        "x2 are reported once per dataset (how many, the smallest size).", minimum=1.0,
    )
    classes: list[str] | None = param(
        None, "Class names; integer labels index into this list. null infers the sorted unique labels.",
    )
    channels: int | None = param(
        None, "Image channels: 1 (grayscale), 3 (RGB) or N (an N-page TIFF per image, one page per channel, "
        "e.g. microscopy stains). null infers 1 when every image is grayscale (L, I;16, I, F), else 3. "
        "Grayscale files given channels 3 are repeated, RGB files given channels 1 become luma (BT.601); "
        "RGBA and LA files are composited on black (alpha multiplies the colour); palette files are expanded.",
        minimum=1,
    )
    intensity: IntensityConfig = param(IntensityConfig, "How 16- and 32-bit pixel values map to [-1, 1].")
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
    grad_clip: float | None = param(1.0, "Clip the global gradient norm to this value; null disables.",
                                    exclusiveMinimum=0.0)
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
    precision: Literal["auto", "fp32", "bf16", "fp16"] = param(
        "auto", "Autocast precision on any device (fp16 adds a grad scaler); auto: bf16 on GPUs of compute "
        "capability 8.0 or later (A100, H100), fp16 on older ones (V100, T4: no cuDNN bf16 convolutions), fp32 on "
        "CPU (most CPUs run bf16 slower than fp32).",
    )
    deterministic: bool | None = param(
        None, "Deterministic kernels: the same seed gives the same run. null: on for the CPU; off on CUDA, where "
        "cuDNN then times its algorithms and keeps the fastest (cudnn.benchmark) and some kernels stay "
        "nondeterministic anyway. A run may resume across a change of this key.",
    )
    fp16_init_scale: float = param(
        65536.0, "fp16: the grad scaler's first loss scale (torch's default 2**16); it halves on every overflowing "
        "step, which is skipped, and doubles after 2000 clean steps.", exclusiveMinimum=0.0,
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
        30.0, "Also save the latest checkpoint once this many minutes have passed since the last one (mid-epoch "
        "or at an epoch's end); 0 disables.", minimum=0.0,
    )
    checkpoint_every_epochs: int = param(
        1, "Save the latest checkpoint (the whole state, about 16 bytes per parameter) at the end of every this "
        "many epochs; it is also saved at the last epoch, on early stopping, on a signal and by "
        "checkpoint_every_minutes / checkpoint_every_steps. 0: only those. Raise it (or set 0) where epochs take "
        "seconds and a save is as long as an epoch (large UNets on a GPU); a resume trains the epochs since the "
        "last save again, to the same weights.", minimum=0,
    )
    max_bad_steps: int = param(
        0, "Optimizer steps with a NaN or inf loss to skip before stopping with an error.", minimum=0,
    )


@dataclasses.dataclass
class InitConfig:
    """Fine-tuning: start from another run's weights instead of a fresh initialisation."""

    from_: str | None = param(
        None, "The run whose weights this experiment starts from: 'autoencoder/NAME', 'diffusion/NAME' or "
        "'controlnet/NAME' (an experiment of the workflow, trained first), or a checkpoint path. null: a fresh "
        "initialisation. The optimizer state always starts fresh.", key="from",
    )
    checkpoint: Literal["best", "latest"] = param(
        "best", "Which checkpoint of the named run to start from (a path names its own).",
    )
    partial: bool = param(
        False, "Tensors whose shape does not fit (a new class count, new latent channels) keep their fresh "
        "initialisation and are listed in the log; false: such a tensor stops the run with an error naming it.",
    )


@dataclasses.dataclass
class Experiment:
    """What every stage's experiment file starts with: its name, its seed and where its weights start."""

    name: str = param(dataclasses.MISSING, "Run name: names the outputs NAME_checkpoint_best.pt etc.",
                      pattern=r"^[A-Za-z0-9_.-]+$")
    seed: int = param(42, "Seed of every random choice (initialisation, split, shuffling, noise).", minimum=0)
    init: InitConfig = param(InitConfig, "Fine-tuning: the checkpoint whose weights this experiment starts from.")
