"""The one place models are rebuilt from their checkpoints: autoencoder, diffusion UNet, ControlNet, judge.

Each loader reads a checkpoint as untrusted input, checks the stage that wrote it, rebuilds the network
from the resolved config the checkpoint carries (never from today's YAML), loads the inference (EMA)
weights and returns a :class:`Loaded`: the model in eval mode, its typed config and its typed metadata
(:mod:`ldmflow.metadata`). :func:`verified_autoencoder` and :func:`store_autoencoder` check the autoencoder
a model was trained with, or a store was made by, with the one sha256 check
(:func:`ldmflow.artifacts.require_sha256`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ldmflow.artifacts import inference_weights, load_checkpoint, require_sha256
from ldmflow.config.autoencoder import AutoencoderExperiment
from ldmflow.config.controlnet import ControlNetExperiment
from ldmflow.config.diffusion import DiffusionExperiment
from ldmflow.config.judge import JudgeConfig
from ldmflow.config.schema import from_dict
from ldmflow.errors import SamplingError, TrainingError
from ldmflow.metadata import AutoencoderMeta, ControlNetMeta, DiffusionMeta, JudgeMeta, LatentsInfo, MetadataError


@dataclass(frozen=True)
class Loaded:
    """A model rebuilt from its checkpoint: the network (eval mode, no gradients), its config, its metadata.

    ``base_config`` is a ControlNet's base diffusion experiment (None for the other models)."""

    model: Any
    config: Any
    meta: Any
    base_config: DiffusionExperiment | None = None


def _state(checkpoint: str | Path, stage: str, device, called: str, error: type[Exception] = SamplingError) -> dict:
    """The checkpoint's state, refusing one that another stage wrote (``called``: "a diffusion", ...)."""
    state = load_checkpoint(checkpoint, map_location=device)
    if state.get("stage") != stage:
        raise error(f"{checkpoint}: a {state.get('stage')} checkpoint, not {called} checkpoint")
    return state


def _ready(model: torch.nn.Module, state: dict, device) -> torch.nn.Module:
    model.load_state_dict(inference_weights(state))
    return model.to(device).eval().requires_grad_(False)


def build_network(stage: str, config: dict, extra: dict | None, source: str) -> Loaded:
    """The fresh network (weights not loaded) an artifact's resolved config and metadata describe, with its typed
    config and metadata: what both a checkpoint and an exported folder rebuild from (``source`` names it)."""
    if stage == "autoencoder":
        from ldmflow.models.autoencoder import build_autoencoder

        cfg = from_dict(AutoencoderExperiment, config)
        return Loaded(build_autoencoder(cfg), cfg, AutoencoderMeta.from_dict(extra, source))
    from ldmflow.models.unet import build_unet

    if stage == "diffusion":
        cfg = from_dict(DiffusionExperiment, config)
        meta = DiffusionMeta.from_dict(extra, source)
        return Loaded(build_unet(cfg, meta.latents.latent_channels, meta.num_classes), cfg, meta)
    if stage == "controlnet":
        from ldmflow.models.controlnet import build_controlnet

        cfg = from_dict(ControlNetExperiment, config)
        meta = ControlNetMeta.from_dict(extra, source)
        base_cfg = from_dict(DiffusionExperiment, meta.base_config)
        base = build_unet(base_cfg, meta.latents.latent_channels, meta.num_classes)
        return Loaded(build_controlnet(cfg.model, base, meta.control_channels, meta.downsample), cfg, meta, base_cfg)
    raise MetadataError(f"{source}: unknown stage {stage!r}; allowed: autoencoder, diffusion, controlnet")


def _load(checkpoint: str | Path, stage: str, device, called: str, error: type[Exception] = SamplingError) -> Loaded:
    """A checkpoint of ``stage`` rebuilt from what it carries, with its inference (EMA) weights, in eval mode."""
    state = _state(checkpoint, stage, device, called, error)
    loaded = build_network(stage, state["config"], state.get("extra"), str(checkpoint))
    _ready(loaded.model, state, device)
    return loaded


def load_autoencoder(checkpoint: str | Path, device: str | torch.device = "cpu") -> Loaded:
    """An autoencoder from its checkpoint alone (``config``: its :class:`AutoencoderExperiment`)."""
    return _load(checkpoint, "autoencoder", device, "an autoencoder", ValueError)


def verified_autoencoder(latents: LatentsInfo, device: str | torch.device = "cpu",
                         path: str | Path | None = None) -> Loaded:
    """The autoencoder a model was trained with (or ``path``, a moved copy of it), refusing a file whose
    sha256 is not the one recorded at training time."""
    path = Path(path or latents.autoencoder_checkpoint)
    if not path.is_file():
        raise SamplingError(f"autoencoder checkpoint {path} (recorded at training time) is missing")
    require_sha256(path, latents.autoencoder_sha256, SamplingError,
                   f"the model was trained with autoencoder {latents.autoencoder_checkpoint}",
                   "give the autoencoder the model was trained with")
    return load_autoencoder(path, device)


def store_autoencoder(store, device: str | torch.device | None = None,
                      checkpoint: str | Path | None = None) -> Loaded:
    """The autoencoder that made a latent store (the recorded checkpoint, or a moved copy of it), checked
    by sha256 (:meth:`ldmflow.data.latent_store.LatentStore.check_autoencoder`)."""
    from ldmflow.devices import get_device

    path = store.check_autoencoder(checkpoint or store.info.autoencoder.checkpoint)
    return load_autoencoder(path, get_device(None if device is None else str(device)))


def load_diffusion(checkpoint: str | Path, device: str | torch.device = "cpu") -> Loaded:
    """A diffusion UNet with its inference (EMA) weights (``meta``: :class:`DiffusionMeta`)."""
    return _load(checkpoint, "diffusion", device, "a diffusion")


def load_controlnet(checkpoint: str | Path, device: str | torch.device = "cpu") -> Loaded:
    """A controlled UNet from its checkpoint alone: the base UNet's config and weights are inside
    (``meta``: :class:`ControlNetMeta`, ``base_config``: the base experiment)."""
    return _load(checkpoint, "controlnet", device, "a ControlNet")


def load_judge(checkpoint: str | Path, device: str | torch.device = "cpu") -> Loaded:
    """A judge ensemble from ``judge.pt`` alone: ``model`` is its first member, ``model.members`` every member
    (a file from before ensembles: a one-judge ensemble). Each member's ``info`` holds its data facts and config,
    ``validity`` its real-val figures (``meta``: :class:`JudgeMeta`)."""
    from ldmflow.evaluation.judge import _flip_dims
    from ldmflow.models.judge import Judge

    state = load_checkpoint(checkpoint, map_location="cpu")
    if state.get("stage") != "judge":
        raise TrainingError(f"{checkpoint}: a {state.get('stage')} checkpoint, not a judge (train one with "
                            "`ldmflow judge train`)")
    cfg = from_dict(JudgeConfig, state["config"])
    meta = JudgeMeta.from_dict(state["extra"], str(checkpoint))
    weights = [(state["model"], state["validity"]["real_val"])]
    weights += [(m["model"], m["real_val"]) for m in state.get("members", [])]
    members = []
    for sd, real_val in weights:
        model = Judge(meta.channels, meta.num_classes, meta.mask_classes, cfg.width, cfg.levels,
                      image_size=meta.image_size, flips=_flip_dims(cfg.augment))
        model.load_state_dict(sd)
        model.info = meta.info(state["config"])
        model.validity = {**state["validity"], "real_val": real_val}
        members.append(model.to(device).eval().requires_grad_(False))
    for model in members:
        model.members = members
    return Loaded(members[0], dataclasses.replace(cfg, members=len(members)), meta)


def checkpoint_stage(checkpoint: str | Path) -> str | None:
    """The stage that wrote a checkpoint ('diffusion', 'controlnet', ...)."""
    return load_checkpoint(checkpoint).get("stage")
