"""ldmflow: train latent diffusion models on your own image data, from a laptop to an HPC cluster.

The notebook helpers keep the names of the original research module: ``load_config``, ``build_model``,
``build_dataset``, ``build_loss``, ``build_optimizer``, ``set_deterministic`` and ``get_device``.
"""

from __future__ import annotations

__version__ = "0.1.0"

from ldmflow.config.loading import load_config
from ldmflow.data.manifest import build_dataset
from ldmflow.devices import get_device, set_deterministic


def build_model(config):
    """The model an experiment config describes (its data-derived fields resolved)."""
    from ldmflow.config.autoencoder import AutoencoderExperiment
    from ldmflow.models.autoencoder import build_autoencoder

    if isinstance(config, AutoencoderExperiment):
        return build_autoencoder(config)
    raise TypeError(f"no model for config type {type(config).__name__}")


def build_loss(config):
    """The loss an experiment config describes."""
    from ldmflow.config.autoencoder import AutoencoderExperiment
    from ldmflow.models.autoencoder import build_loss as build_ae_loss

    if isinstance(config, AutoencoderExperiment):
        return build_ae_loss(config)
    raise TypeError(f"no loss for config type {type(config).__name__}")


def build_optimizer(model, config):
    """AdamW over the model's trainable parameters with the config's ``optim`` section."""
    from ldmflow.training.optim import build_optimizer as _build

    return _build(model.parameters(), config.optim, next(model.parameters()).device)


__all__ = ["load_config", "build_model", "build_dataset", "build_loss", "build_optimizer", "set_deterministic",
           "get_device", "__version__"]
