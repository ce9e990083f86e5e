"""What an artifact carries besides its weights, typed: the one module that writes and reads it.

A checkpoint's ``state["extra"]`` and a latent store's zarr attributes are plain JSON-like dicts on disk
(``torch.load(weights_only=True)`` and zarr both need that); in memory they are the frozen dataclasses
below. Each ``to_dict`` writes the flat keys the files have always had plus ``version``; each
``from_dict`` reads them back, a dict without ``version`` as version 0 (what ldmflow wrote before the
field existed: the same keys). No other module reads these dicts by key (``tests/test_architecture.py``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ldmflow.errors import DataError

METADATA_VERSION = 1  # 0: the keys without a version field; 1: the same keys with it
STORE_FORMAT = "ldmflow-latents-v1"
SAMPLES_FORMAT = "ldmflow-samples-v1"

T = TypeVar("T")


class MetadataError(DataError):
    """An artifact's metadata lacks a field this version of ldmflow needs; the message says how to convert."""


def _read(cls: type[T], data: dict | None, what: str, **derived: Any) -> T:
    """``cls`` from the keys of ``data`` that name its fields (``derived`` fills or overrides some); a missing
    required field is one line naming it and the way out."""
    data = dict(data or {})
    version = data.get("version", 0)
    if not isinstance(version, int) or version > METADATA_VERSION:
        raise MetadataError(f"{what}: metadata version {version!r} is newer than this ldmflow reads "
                            f"(<= {METADATA_VERSION}); upgrade ldmflow")
    kwargs = {f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data and f.init}
    kwargs.update(derived)
    missing = [f.name for f in dataclasses.fields(cls) if f.init and f.name not in kwargs
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise MetadataError(f"{what}: metadata (version {version}) lacks {', '.join(missing)}; retrain it, or "
                            "convert it with torch.load / torch.save adding those keys to state['extra']")
    return cls(**kwargs)


def _flat(obj: Any) -> dict:
    """The dataclass as one flat dict (nested dataclasses merged in), with the current version."""
    out: dict = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out.update(_flat(value))
        else:
            out[f.name] = value
    out["version"] = METADATA_VERSION
    return out


def _without_empty_init(out: dict) -> dict:
    """A checkpoint has ``init`` only when it was fine-tuned from a parent."""
    if out.get("init") is None:
        out.pop("init", None)
    return out


# --------------------------------------------------------------------------------------------------
# Latent stores
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class AutoencoderRef:
    """The autoencoder that made a latent store: its checkpoint, sha256, name and resolved config."""

    checkpoint: str
    sha256: str
    name: str | None = None
    selected: str | None = None  # the selected.json it was named by, if any
    config: dict | None = None


@dataclass(frozen=True, kw_only=True)
class ManifestRef:
    """The manifest a latent store was embedded from."""

    path: str | None
    sha256: str | None
    autoencoder_trained_on_it: bool | None = None
    skipped_rows: int = 0


@dataclass(frozen=True, kw_only=True)
class StoreAttrs:
    """A latent store's attributes (see :mod:`ldmflow.data.latent_store` for what each array holds)."""

    n: int
    scale_factor: float
    variant: str  # "kl" or "plain"
    image_size: int
    downsample: int
    latent_channels: int
    classes: list[str] | None
    mask_classes: int | None
    autoencoder: AutoencoderRef
    manifest: ManifestRef = ManifestRef(path=None, sha256=None)
    channels: int = 3  # stores written before multi-channel data were RGB
    intensity: dict | None = None  # {"range": per-channel [low, high] or None (8-bit), "source_bits": int}
    data_fingerprint: str | None = None
    counts: dict | None = None
    dtype: str = "float16"
    latent_std: float | None = None
    channel_mean: list[float] | None = None
    channel_std: list[float] | None = None
    posterior_var_mean: list[float] | None = None  # KL stores: E[sigma^2] per channel
    ldmflow_version: str | None = None
    created: str | None = None
    format: str = STORE_FORMAT

    REQUIRED = ("n", "scale_factor", "variant", "image_size", "downsample", "latent_channels", "classes",
                "mask_classes", "autoencoder")

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["autoencoder"] = dataclasses.asdict(self.autoencoder)
        out["manifest"] = dataclasses.asdict(self.manifest)
        if self.posterior_var_mean is None:
            out.pop("posterior_var_mean")  # a plain autoencoder's store has no posterior
        out["version"] = METADATA_VERSION
        return out

    @classmethod
    def from_dict(cls, attrs: dict, what: str = "latent store") -> StoreAttrs:
        return _read(cls, attrs, what, autoencoder=_read(AutoencoderRef, attrs.get("autoencoder"), what),
                     manifest=_read(ManifestRef, attrs.get("manifest") or {"path": None, "sha256": None}, what))

    @staticmethod
    def missing(attrs: dict) -> list[str]:
        """The required attributes a store's raw attribute dict lacks (checked before reading it)."""
        return [k for k in StoreAttrs.REQUIRED if k not in attrs]

    @staticmethod
    def format_of(attrs: dict) -> Any:
        """The ``format`` attribute (written last: a store without it is incomplete)."""
        return attrs.get("format")


# --------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class LatentsInfo:
    """What a diffusion or ControlNet checkpoint records about its latents and their autoencoder: enough
    to rebuild, sample and decode."""

    latents: str  # the latent store's path
    latent_channels: int
    latent_size: int
    classes: list[str] | None
    scale_factor: float
    autoencoder_checkpoint: str
    autoencoder_sha256: str
    manifest: str | None = None
    manifest_sha256: str | None = None
    data_fingerprint_sha256: str | None = None
    mask_classes: int | None = None
    image_size: int | None = None
    channels: int = 3
    intensity: dict | None = None

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, h, w) of one latent."""
        return (self.latent_channels, self.latent_size, self.latent_size)

    @classmethod
    def of_store(cls, path: str, attrs: StoreAttrs) -> LatentsInfo:
        """What a checkpoint trained on the store at ``path`` records about it."""
        return cls(latents=path, latent_channels=attrs.latent_channels,
                   latent_size=attrs.image_size // attrs.downsample, classes=attrs.classes,
                   scale_factor=float(attrs.scale_factor), autoencoder_checkpoint=attrs.autoencoder.checkpoint,
                   autoencoder_sha256=attrs.autoencoder.sha256, manifest=attrs.manifest.path,
                   manifest_sha256=attrs.manifest.sha256, data_fingerprint_sha256=attrs.data_fingerprint,
                   mask_classes=attrs.mask_classes, image_size=attrs.image_size, channels=attrs.channels,
                   intensity=attrs.intensity)


@dataclass(frozen=True, kw_only=True)
class AutoencoderMeta:
    """An autoencoder checkpoint's data facts: the manifest it trained on."""

    manifest: str | None = None
    manifest_sha256: str | None = None
    data_fingerprint_sha256: str | None = None
    init: dict | None = None  # the parent checkpoint a fine-tune started from

    def to_dict(self) -> dict:
        return _without_empty_init(_flat(self))

    @classmethod
    def from_dict(cls, extra: dict | None, what: str = "autoencoder checkpoint") -> AutoencoderMeta:
        return _read(cls, extra, what)


@dataclass(frozen=True, kw_only=True)
class DiffusionMeta:
    """A diffusion checkpoint's metadata: its latents and the number of classes it is conditioned on."""

    latents: LatentsInfo
    num_classes: int | None
    init: dict | None = None  # the parent checkpoint a fine-tune started from

    def to_dict(self) -> dict:
        return _without_empty_init(_flat(self))

    @classmethod
    def from_dict(cls, extra: dict | None, what: str = "diffusion checkpoint") -> DiffusionMeta:
        return _read(cls, extra, what, latents=_read(LatentsInfo, extra, what))


@dataclass(frozen=True, kw_only=True)
class ControlNetMeta(DiffusionMeta):
    """A ControlNet checkpoint's metadata: the diffusion fields, its base model and its control."""

    base_checkpoint: str
    base_sha256: str
    base_config: dict  # the base experiment's resolved config: rebuilds the base UNet
    signal: str
    control_channels: int
    downsample: int  # image -> latent resolution factor of the control
    image_size: int

    @classmethod
    def from_dict(cls, extra: dict | None, what: str = "ControlNet checkpoint") -> ControlNetMeta:
        return _read(cls, extra, what, latents=_read(LatentsInfo, extra, what))


@dataclass(frozen=True, kw_only=True)
class JudgeMeta:
    """A judge's data facts: the store (or manifest) it trained on and the images it takes."""

    latents: str
    classes: list[str] | None
    num_classes: int | None
    mask_classes: int | None
    channels: int
    image_size: int
    value_range: list | None = None

    def to_dict(self) -> dict:
        return _flat(self)

    @classmethod
    def from_dict(cls, extra: dict | None, what: str = "judge checkpoint") -> JudgeMeta:
        return _read(cls, extra, what)

    @classmethod
    def of_judge(cls, model: Any) -> tuple[JudgeMeta, dict]:
        """A judge's metadata and resolved config from its ``model.info`` (set by training or loading)."""
        return cls.from_dict(model.info, "judge"), model.info["config"]

    def info(self, config: dict) -> dict:
        """The ``model.info`` of a loaded judge: these facts and its resolved config."""
        return {**self.to_dict(), "config": config}


# --------------------------------------------------------------------------------------------------
# Samples stores
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class SamplesAttrs:
    """``samples.zarr``'s attributes: what made the samples (checkpoint, autoencoder, sampler, seed, control)."""

    checkpoint: str
    checkpoint_sha256: str
    autoencoder_checkpoint: str
    autoencoder_sha256: str
    sampler: str
    steps: int
    eta: float
    guidance: float | None
    seed: int
    classes: list[str] | None
    ldmflow_version: str
    controlnet: dict = field(default_factory=dict)  # fusion, signal, control, scale of a ControlNet's samples
    format: str = SAMPLES_FORMAT

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "controlnet"}
        return {**out, **self.controlnet, "version": METADATA_VERSION}

    @classmethod
    def from_dict(cls, attrs: dict, what: str = "samples store") -> SamplesAttrs:
        control = {k: attrs[k] for k in ("fusion", "signal", "control", "scale") if k in attrs}
        return _read(cls, attrs, what, controlnet=control)


def autoencoder_of_store(attrs: dict) -> tuple[str | None, str | None]:
    """The (checkpoint, sha256) of the autoencoder a latent or samples store's raw attributes name (a samples
    store records it at the top level, a latent store under ``autoencoder``); Nones when neither does."""
    if "autoencoder_checkpoint" in attrs:
        return attrs["autoencoder_checkpoint"], attrs.get("autoencoder_sha256")
    made_by = attrs.get("autoencoder") or {}
    return made_by.get("checkpoint"), made_by.get("sha256")


def store_image_size(attrs: dict) -> int | None:
    """A latent store's image size from its raw attributes (None when it records none)."""
    size = attrs.get("image_size")
    return int(size) if size else None
