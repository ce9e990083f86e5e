"""The memorization stage's options."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, Literal

from ldmflow.config.schema import from_dict, param, to_dict, validate

log = logging.getLogger(__name__)

Feature = Literal["pixel", "latent"]
Criterion = Literal["calibrated", "tiled_l2", "nn_ratio", "either", "both"]


@dataclass
class MemorizationConfig:
    feature: Feature = param("pixel", "Feature space: pixel (images at image_size) or latent (autoencoder latents).")
    image_size: int = param(
        64, "Side of the square images in the pixel feature space and in top_matches.png.", minimum=8,
    )
    tiles: int = param(4, "Tiles per side for the tiled L2 distance (4: 16 tiles, as Carlini et al. 2023).", minimum=1)
    k: int = param(5, "Nearest training images listed per sample in per_sample.csv.", minimum=2)
    n: int = param(50, "Tiled L2 test: the nearest distance is divided by the mean distance to this many "
                   "nearest training images (Carlini et al.: 50).", minimum=2)
    alpha: float = param(0.5, "Tiled L2 test: memorized when the distance ratio is below this (Carlini et al.: 0.5).",
                         exclusiveMinimum=0.0, maximum=1.0)
    ratio: float = param(1 / 3, "Nearest / second-nearest test: memorized when d1 / d2 is below this.",
                         exclusiveMinimum=0.0, maximum=1.0)
    criterion: Criterion = param(
        "calibrated", "Which test sets the headline 'memorized' verdict: calibrated (the shift-tolerant tiled-L2 "
        "ratio below a threshold calibrated on the held-out reference; tiled_l2 when there is no reference, "
        "marked uncalibrated), tiled_l2, nn_ratio, either or both (fixed thresholds). All are reported.",
    )
    calibration_rate: float = param(
        0.01, "Calibrated test: at most this fraction of new images from the training distribution may be "
        "flagged; the threshold is the conformal quantile of the reference images' scores.",
        exclusiveMinimum=0.0, maximum=0.5,
    )
    shift: int = param(
        2, "Calibrated test: the sample is also compared moved by up to this many feature pixels in each "
        "direction, so that a copy moved by a pixel stays a copy (2 at image_size 64 covers a 1-pixel move of "
        "a 32-pixel image); 0: no moves.", minimum=0,
    )
    reference_split: Literal["val", "test"] = param(
        "val", "Split of the training manifest or store used as held-out reference when no reference is given.",
    )
    memory_gb: float = param(
        1.0, "Working memory of the nearest-neighbour search (feature blocks and similarity blocks).",
        exclusiveMinimum=0.0,
    )
    feature_memory_gb: float = param(
        4.0, "Hold the feature vectors in memory up to this size; larger sets go to a temporary file in OUT "
        "and are streamed in blocks (100k 64x64 images take 2.3 GiB).", minimum=0.0,
    )
    autoencoder: str | None = param(
        None, "Autoencoder checkpoint for the latent space and the quality features; null: the store's "
        "autoencoder_checkpoint attribute.",
    )
    quality: bool = param(True, "Also compute Fréchet distance and precision/recall in autoencoder features.")
    quality_max_images: int = param(10000, "At most this many images of each set for the quality numbers.", minimum=2)
    pr_k: int = param(3, "k of the k-NN manifolds of precision/recall (Kynkäänniemi et al. 2019: 3).", minimum=1)
    inception: str | None = param(
        None, "Local TorchScript Inception weights (e.g. inception-2015-12-05.pt) for Inception FID; null skips it.",
    )
    top_matches: int = param(16, "Most similar sample/training pairs drawn in top_matches.png.", minimum=1)
    batch_size: int = param(64, "Images per batch when decoding and encoding.", minimum=1)
    seed: int = param(0, "Seed of the subsets drawn for the quality numbers.", minimum=0)
    resize: bool = param(
        False, "Compare images of different sizes or channel counts (samples vs training vs reference) by resizing "
        "them all to image_size; false: such a mismatch is an error, since resized copies rarely match.",
    )


def option_names() -> tuple[str, ...]:
    """The keys ``--set`` accepts for ``ldmflow memorization``."""
    return tuple(f.name for f in dataclasses.fields(MemorizationConfig))


def memorization_config(config: MemorizationConfig | dict | None = None, **options: Any) -> MemorizationConfig:
    """Validate options (a mapping and/or keywords) into a :class:`MemorizationConfig`; errors name the key."""
    data = to_dict(config) if isinstance(config, MemorizationConfig) else dict(config or {})
    data.update(options)
    validate(data, MemorizationConfig, "memorization options")
    return from_dict(MemorizationConfig, data)
