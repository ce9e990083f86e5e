"""One module per workflow stage; each is what a Snakemake rule and an ``ldmflow`` subcommand call."""

from __future__ import annotations

from ldmflow.config.common import STAGE_NAMES, Stage


def trainer(stage: Stage):
    """The library function that trains one experiment of ``stage`` (imported on demand: each pulls in its
    models and data)."""
    if stage == "autoencoder":
        from ldmflow.stages.train_autoencoder import train_autoencoder as fn
    elif stage == "diffusion":
        from ldmflow.stages.train_diffusion import train_diffusion as fn
    elif stage == "controlnet":
        from ldmflow.stages.train_controlnet import train_controlnet as fn
    else:
        raise ValueError(f"stage {stage!r}; allowed: {', '.join(STAGE_NAMES)}")
    return fn
