"""The Python API a notebook uses: build any stage's model, loss, dataset and optimiser from its config.

Every stage works the same way: ``cfg = load_config(path)`` (the stage is read from the file), then
``build_model(cfg, data)``, ``build_dataset(cfg, data)``, ``build_loss(cfg)``, ``build_optimizer(model, cfg)``.
``data`` is what the stage trains on: a manifest (or image folder) for an autoencoder, a latent store
(``latents.zarr``) for a diffusion UNet or a ControlNet. Sizes the config leaves to the data (an autoencoder's
``data.mask_classes`` and ``data.classes``, a UNet's latent channels and class count) come from ``data`` when
it is given, or from keyword arguments; when neither says, the build stops with an error naming the key,
rather than building a model without a head.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ldmflow.config.autoencoder import AutoencoderExperiment
from ldmflow.config.controlnet import ControlNetExperiment
from ldmflow.config.diffusion import DiffusionExperiment
from ldmflow.errors import ConfigError
from ldmflow.training.optim import build_optimizer  # noqa: F401 (the public API)


def _stage_of(config: Any) -> str:
    for stage, cls in (("autoencoder", AutoencoderExperiment), ("diffusion", DiffusionExperiment),
                       ("controlnet", ControlNetExperiment)):
        if isinstance(config, cls):
            return stage
    raise TypeError(f"expected an experiment config from load_config(path), got {type(config).__name__}")


def _autoencoder(cfg: AutoencoderExperiment, data) -> torch.nn.Module:
    from ldmflow.data.dataset import prepare_data
    from ldmflow.models.autoencoder import build_autoencoder
    from ldmflow.stages.train_autoencoder import resolve_data_fields

    if data is not None:  # fill data.mask_classes and data.classes as training does
        resolve_data_fields(cfg, prepare_data(data, cfg.data, cfg.seed), str(data))
    heads = cfg.loss
    for key, head, value in (("data.mask_classes", "segmentation", cfg.data.mask_classes),
                             ("data.classes", "classification", cfg.data.classes)):
        if getattr(heads, head).enabled and value is None:
            raise ConfigError(
                f"{cfg.name}: key '{key}' is null, so the {head} head has no size; pass the manifest "
                f"(build_model(cfg, manifest)) to infer it, set '{key}', or set 'loss.{head}.enabled: false'")
    return build_autoencoder(cfg)


def _unet_sizes(cfg: DiffusionExperiment, data, latent_channels: int | None,
                num_classes: int | None) -> tuple[int, int | None]:
    """A UNet's input channels and class count: from a latent store, or given."""
    if data is not None:
        from ldmflow.data.latent_store import LatentStore
        from ldmflow.stages.train_diffusion import conditioning_classes

        store = LatentStore(data)
        return store.latent_shape[0], conditioning_classes(cfg, store)
    if latent_channels is None:
        raise ConfigError(f"{cfg.name}: a diffusion UNet's input channels are the latent store's; pass it "
                          "(build_model(cfg, 'latents.zarr')) or latent_channels=")
    if cfg.model.class_conditional and num_classes is None:
        raise ConfigError(f"{cfg.name}: key 'model.class_conditional' is true but the class count is unknown; pass "
                          "the latent store or num_classes=, or set 'model.class_conditional: false'")
    return latent_channels, num_classes if cfg.model.class_conditional else None


def build_model(config, data: str | Path | None = None, *, base: str | Path | torch.nn.Module | None = None,
                latent_channels: int | None = None, num_classes: int | None = None,
                control_channels: int | None = None, downsample: int | None = None) -> torch.nn.Module:
    """The freshly initialised model of an experiment config, of any stage.

    ``data``: a manifest for an autoencoder (fills ``data.mask_classes`` and ``data.classes``), a latent store
    for a UNet or a ControlNet (latent channels, class count, control channels, downsampling). Without it the
    sizes come from the config or the keyword arguments. A ControlNet also needs ``base``: the trained diffusion
    checkpoint (or UNet) it steers.

    >>> from ldmflow import load_config, build_model
    >>> cfg = load_config("config/autoencoders/demo_kl_c4_f4.yaml", overrides=["data.mask_classes=4",
    ...                   "data.classes=[circle, square, triangle]"])  # or build_model(cfg, manifest)
    >>> ae = build_model(cfg)
    >>> ae.segmenter is not None and ae.classifier is not None
    True
    >>> build_model(load_config({"name": "ae", "data": {"mask_classes": 4}}))
    Traceback (most recent call last):
    ldmflow.errors.ConfigError: ae: key 'data.classes' is null, so the classification head has no size; ...
    >>> unet = build_model(load_config("config/diffusion/demo_unet_tiny.yaml"), latent_channels=4, num_classes=3)
    >>> unet(torch.zeros(2, 4, 8, 8), torch.tensor([0, 999]), torch.tensor([0, 2])).shape
    torch.Size([2, 4, 8, 8])
    >>> net = build_model(load_config("config/controlnet/demo_controlnet_add.yaml"), base=unet, control_channels=4,
    ...                   downsample=4)
    >>> net(torch.zeros(2, 4, 8, 8), torch.tensor([0, 999]), control=torch.zeros(2, 4, 32, 32)).shape
    torch.Size([2, 4, 8, 8])
    """
    stage = _stage_of(config)
    if stage == "autoencoder":
        return _autoencoder(config, data)
    if stage == "diffusion":
        from ldmflow.models.unet import build_unet

        return build_unet(config, *_unet_sizes(config, data, latent_channels, num_classes))
    return _controlnet(config, data, base, control_channels, downsample)


def _controlnet(cfg: ControlNetExperiment, data, base, control_channels: int | None, downsample: int | None):
    import copy

    from ldmflow.data.latent_store import LatentStore
    from ldmflow.models.controlnet import build_controlnet
    from ldmflow.stages.train_controlnet import control_geometry

    if base is None:
        raise ConfigError(f"{cfg.name}: a ControlNet steers a trained diffusion UNet; pass base=CHECKPOINT (the "
                          "config's key 'base' names a workflow experiment, not a file)")
    if not isinstance(base, torch.nn.Module):
        from ldmflow.checkpoints import load_diffusion

        base = load_diffusion(base, "cpu").model
    if data is not None:
        control_channels, downsample = control_geometry(cfg, LatentStore(data))
    if control_channels is None or downsample is None:
        raise ConfigError(f"{cfg.name}: the control's channels and resolution come from the latent store; pass it "
                          "(build_model(cfg, 'latents.zarr', base=...)) or control_channels= and downsample=")
    return build_controlnet(cfg.model, copy.deepcopy(base).train(), control_channels, downsample)


def build_loss(config, base: str | Path | DiffusionExperiment | None = None):
    """The training loss of an experiment config.

    An autoencoder's is ``loss(model(images), batch) -> (total, parts)``; a UNet's or ControlNet's is
    ``loss(model, latents, labels=None, **model_kwargs) -> scalar`` (noise and timesteps drawn inside). A
    ControlNet trains with its base's noise schedule and loss: pass ``base`` (the diffusion checkpoint, or
    its config).

    >>> from ldmflow import load_config, build_loss, build_model
    >>> cfg = load_config("config/diffusion/demo_unet_tiny.yaml")
    >>> loss = build_loss(cfg)
    >>> unet = build_model(cfg, latent_channels=4, num_classes=3)
    >>> loss(unet, torch.randn(2, 4, 8, 8), torch.tensor([0, 1])).item() > 0
    True
    >>> control_loss = build_loss(load_config("config/controlnet/demo_controlnet_add.yaml"), base=cfg)
    """
    from ldmflow.diffusion.schedules import DiffusionLoss

    stage = _stage_of(config)
    if stage == "autoencoder":
        from ldmflow.models.autoencoder import build_loss as autoencoder_loss

        return autoencoder_loss(config)
    if stage == "controlnet":
        if base is None:
            raise ConfigError(f"{config.name}: a ControlNet trains with its base's noise schedule; pass base= (the "
                              "diffusion checkpoint or its config)")
        if not isinstance(base, DiffusionExperiment):
            from ldmflow.artifacts import load_checkpoint
            from ldmflow.config.schema import from_dict

            base = from_dict(DiffusionExperiment, load_checkpoint(base)["config"])
        config = base
    return DiffusionLoss(config.diffusion, config.loss.min_snr_gamma)


def build_dataset(config, data: str | Path, split: str | None = "train", threads: int | None = None):
    """The training (or ``"val"``) split an experiment trains on, from ``data``: a manifest or image folder for
    an autoencoder (an :class:`~ldmflow.data.dataset.ImageDataset` of dicts with ``image``, ``mask``,
    ``label``), a latent store for a UNet (a :class:`~ldmflow.data.latent_store.LatentDataset`) or a ControlNet
    (with its ``control``). ``split=None``: every row.

    >>> from ldmflow import load_config, build_dataset
    >>> from ldmflow.data.demo import write_demo_data
    >>> import tempfile
    >>> manifest = write_demo_data(Path(tempfile.mkdtemp()) / "demo", n=12, size=16)
    >>> cfg = load_config({"name": "ae", "data": {"image_size": 16}})
    >>> items = build_dataset(cfg, manifest)
    >>> sorted(items[0]), tuple(items[0]["image"].shape)
    (['image', 'index', 'label', 'mask'], (3, 16, 16))
    """
    stage = _stage_of(config)
    if stage == "autoencoder":
        from ldmflow.data.dataset import build_dataset as image_dataset

        return image_dataset(config, data, split, threads)
    from ldmflow.data.latent_store import LatentDataset, LatentStore

    store = LatentStore(data)
    if stage == "diffusion":
        return LatentDataset(store, split, kl_latents=config.data.kl_latents)
    from ldmflow.stages.train_controlnet import control_dataset, stored_controls

    return control_dataset(config, store, split, stored_controls(config, store, store.info.image_size))


def load_pretrained(folder: str | Path, device: str | torch.device = "cpu"):
    """A model exported by ``ldmflow export`` (a diffusion UNet, an autoencoder or a ControlNet), rebuilt from
    the folder alone: a :class:`~ldmflow.checkpoints.Loaded` with ``model`` (eval mode, no gradients),
    ``config`` (the resolved training config) and ``meta`` (its typed metadata, :mod:`ldmflow.metadata`).

    The weights are safetensors (no code runs on loading); a diffusion UNet exported for diffusers is read
    back from diffusers' parameter names. A diffusion or ControlNet export holds its autoencoder in
    ``FOLDER/autoencoder``: ``load_pretrained(folder / "autoencoder")``.
    """
    from ldmflow.exporting.bundle import load_pretrained as load

    return load(folder, device)
