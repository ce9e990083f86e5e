"""The judge's options (workflow config section ``judge``): how the pixel-space evaluation networks train on the
real train split, and how they score samples; and the options of the utility of a synthetic set (section
``utility``), measured by training networks of the judge's kind on it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ldmflow.config.schema import from_dict, param, to_dict, validate


@dataclass
class AugmentConfig:
    """Augmentation of the real training images, so that the judge reads shapes rather than memorising pixels,
    and reads decoded samples (smoother, with shifted colours) as well as files."""

    hflip: bool = param(True, "Random horizontal flips (image and mask together).")
    vflip: bool = param(False, "Random vertical flips; off for data with an up and down (the demo's triangles).")
    shift: int = param(2, "Random translation by up to this many pixels (reflect-padded).", minimum=0)
    jitter: float = param(0.15, "Colour jitter: random brightness offset, contrast and per-channel gain of up to "
                          "this much (in units of the [-1, 1] range).", minimum=0.0, maximum=1.0)
    noise: float = param(0.06, "Gaussian pixel noise of a random standard deviation up to this ([-1, 1] units).",
                         minimum=0.0)
    blur: float = param(0.5, "Probability of a random 3x3 Gaussian blur (sigma 0.3..1): decoded images are smoother "
                        "than files.", minimum=0.0, maximum=1.0)


@dataclass
class JudgeConfig:
    epochs: int = param(60, "Training epochs over the real train split.", minimum=1)
    batch_size: int = param(32, "Images per optimizer step.", minimum=1)
    lr: float = param(3e-3, "Peak learning rate of AdamW (one-cycle: warm-up then cosine decay).", exclusiveMinimum=0.0)
    weight_decay: float = param(1e-4, "AdamW decoupled weight decay.", minimum=0.0)
    width: int = param(16, "Channels of the first stage (doubled at each further stage).", minimum=1)
    levels: int = param(3, "Encoder stages (each after the first halves the resolution).", minimum=1)
    seg_weight: float = param(2.0, "Weight of the segmentation loss against the class loss.", minimum=0.0)
    balance: bool = param(True, "Weight the class loss by inverse class frequency, so a rare class is learnt too.")
    augment: AugmentConfig = param(AugmentConfig, "Augmentation of the training images.")
    seed: int = param(42, "Seed of initialisation, batches and augmentation of the first member (same seed, same "
                      "judge on CPU); member i trains with seed + i.", minimum=0)
    members: int = param(3, "Judges in the ensemble, each trained alike from its own seed: every score is reported "
                         "as the median and the range (min..max) across them, so a score no single judge decides.",
                         minimum=1)
    eval_every: int = param(5, "Epochs between the real-val figures of judge.json's training curve.", minimum=1)
    folds: int = param(5, "Folds of the cross-validated two-sample classifier (real held-out vs generated).",
                       minimum=2)
    pr_k: int = param(3, "k of the k-NN manifolds of precision/recall in the judge's features.", minimum=1)
    controlnet_n: int | None = param(
        None, "Paired samples (ControlNet and its uncontrolled base, same noise) per ControlNet evaluation, on the "
        "val-split masks in turn; null: sampling.n.", minimum=1)


@dataclass
class UtilityConfig:
    """How the utility of a synthetic set is measured (train on synthetic, test on real; Ravuri & Vinyals 2019):
    networks of the judge's architecture and recipe trained on real train, on synthetic only and on both."""

    seeds: list[int] = param([0, 1, 2], "Seeds of the downstream models: each training set is trained once per "
                             "seed (at least 3, so the intervals cover the training's own spread).", minItems=3)
    ratios: list[float] = param([1.0, 3.0, 10.0], "Synthetic : real-train image ratios to train at; a ratio the "
                                "synthetic set is too small for is reported as skipped.", minItems=1,
                                items={"type": "number", "exclusiveMinimum": 0})
    epochs: int = param(12, "Epochs of the real-only model; a larger training set gets proportionally fewer, so "
                        "every model takes about the same number of optimizer steps.", minimum=1)
    bootstrap: int = param(2000, "Bootstrap draws (real val images x seeds) of the intervals.", minimum=100)


def utility_config(config: UtilityConfig | dict | None = None, **options: Any) -> UtilityConfig:
    """Validate options (a mapping and/or keywords) into a :class:`UtilityConfig`; errors name the key."""
    data = to_dict(config) if isinstance(config, UtilityConfig) else dict(config or {})
    data.update(options)
    validate(data, UtilityConfig, "utility options")
    return from_dict(UtilityConfig, data)


def utility_options(config: dict) -> dict:
    """The workflow config's ``utility`` section, validated now, so that a typo stops ``snakemake -n``."""
    options = config.get("utility") or {}
    validate(options, UtilityConfig, "workflow config, section 'utility'")
    return options


def judge_config(config: JudgeConfig | dict | None = None, **options: Any) -> JudgeConfig:
    """Validate options (a mapping and/or keywords) into a :class:`JudgeConfig`; errors name the key."""
    data = to_dict(config) if isinstance(config, JudgeConfig) else dict(config or {})
    data.update(options)
    validate(data, JudgeConfig, "judge options")
    return from_dict(JudgeConfig, data)


def judge_options(config: dict) -> dict:
    """The workflow config's ``judge`` section, validated now (config/schemas/judge.schema.json), so that a typo
    stops ``snakemake -n``, not the evaluation after all training."""
    options = config.get("judge") or {}
    validate(options, JudgeConfig, "workflow config, section 'judge'")
    return options


def option_names() -> tuple[str, ...]:
    """The top-level keys ``--set`` accepts for ``ldmflow judge train``."""
    return tuple(f.name for f in dataclasses.fields(JudgeConfig))
