"""ldmflow: train latent diffusion models on your own image data, from a laptop to an HPC cluster.

The notebook helpers keep the names of the original research module: ``load_config``, ``build_model``,
``build_dataset``, ``build_loss``, ``build_optimizer``, ``set_deterministic``, ``get_device``,
``check_memorization`` and ``compute_sample_similarity``; they work for every stage (see :mod:`ldmflow.api`).
"""

from __future__ import annotations

__version__ = "0.1.0"

from ldmflow.api import build_dataset, build_loss, build_model, build_optimizer
from ldmflow.config.loading import load_config
from ldmflow.devices import get_device, set_deterministic
from ldmflow.stages.memorization import check_memorization, compute_sample_similarity

__all__ = ["load_config", "build_model", "build_dataset", "build_loss", "build_optimizer", "set_deterministic",
           "get_device", "check_memorization", "compute_sample_similarity", "__version__"]
