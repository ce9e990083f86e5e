"""ldmflow: train latent diffusion models on your own image data, from a laptop to an HPC cluster.

The notebook helpers keep the names of the original research module: ``load_config``, ``build_model``,
``build_dataset``, ``build_loss``, ``build_optimizer``, ``set_deterministic`` and ``get_device``.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .config import load_config
from .data import build_dataset
from .training import get_device, set_deterministic


def build_model(config):
    """The model an experiment config describes (its data-derived fields resolved)."""
    from .autoencoder import build_autoencoder
    from .config import AutoencoderExperiment

    if isinstance(config, AutoencoderExperiment):
        return build_autoencoder(config)
    raise TypeError(f"no model for config type {type(config).__name__}")


def build_loss(config):
    """The loss an experiment config describes."""
    from .autoencoder import build_loss as build_ae_loss
    from .config import AutoencoderExperiment

    if isinstance(config, AutoencoderExperiment):
        return build_ae_loss(config)
    raise TypeError(f"no loss for config type {type(config).__name__}")


def build_optimizer(model, config):
    """AdamW over the model's trainable parameters with the config's ``optim`` section."""
    from .training import build_optimizer as _build

    return _build(model.parameters(), config.optim, next(model.parameters()).device)


__all__ = ["load_config", "build_model", "build_dataset", "build_loss", "build_optimizer", "set_deterministic",
           "get_device", "__version__"]
