"""An exported model folder: safetensors weights, ``ldmflow.json`` (what rebuilds it), ``config.json`` and a card.

Every folder holds ``ldmflow.json`` (:class:`ExportInfo`: the stage, the resolved training config, the typed
checkpoint metadata of :mod:`ldmflow.metadata`, the checkpoint's sha256 and the facts a user of the weights
needs: latent scale factor, intensity range, data fingerprint, the memorization audit's figures) and a model
card ``README.md``. The weights are either diffusers' (a diffusion UNet that maps exactly: ``config.json`` +
``diffusion_pytorch_model.safetensors`` for ``UNet2DModel.from_pretrained`` and
``scheduler/scheduler_config.json`` for ``DDIMScheduler``) or ours (``model.safetensors`` with our parameter
names, and ``config.json`` holding the stage, config and metadata). Safetensors hold tensors only, so loading
an exported folder runs no code.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file, save_file

from ldmflow.artifacts import atomic_write_json
from ldmflow.checkpoints import Loaded, build_network
from ldmflow.errors import DataError

EXPORT_FORMAT = "ldmflow-export-v1"
EXPORT_VERSION = 1
INFO_FILE = "ldmflow.json"
OURS = "model.safetensors"
DIFFUSERS = "diffusion_pytorch_model.safetensors"
Stage = Literal["autoencoder", "diffusion", "controlnet"]


@dataclass(frozen=True, kw_only=True)
class ExportInfo:
    """``ldmflow.json``: what an exported folder holds and what made it (the one place its keys are named)."""

    stage: Stage
    name: str
    config: dict  # the resolved training config
    meta: dict  # the checkpoint's typed metadata (AutoencoderMeta, DiffusionMeta or ControlNetMeta), as saved
    checkpoint: str
    checkpoint_sha256: str
    weights: str  # the safetensors file in this folder
    weight_names: Literal["ldmflow", "diffusers"]
    diffusers: str | None = None  # what diffusers loads from this folder, or None
    diffusers_refused: str | None = None  # why diffusers cannot load it exactly
    scale_factor: float | None = None  # multiply the autoencoder's latents by it before the UNet
    intensity: dict | None = None  # the data's intensity range (see ldmflow.samples.save_data_values)
    data_fingerprint_sha256: str | None = None
    autoencoder: str | None = None  # the subfolder holding the autoencoder that decodes the latents
    memorization: dict | None = None  # figures of the memorization audit's summary.json
    ldmflow_version: str | None = None
    format: str = EXPORT_FORMAT
    version: int = EXPORT_VERSION

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def read(cls, folder: str | Path) -> ExportInfo:
        path = Path(folder) / INFO_FILE
        if not path.is_file():
            raise DataError(f"{folder}: no {INFO_FILE}; not a folder written by `ldmflow export`")
        data = json.loads(path.read_text())
        if data.get("format") != EXPORT_FORMAT:
            raise DataError(f"{path}: format {data.get('format')!r}, expected {EXPORT_FORMAT!r}")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def write(self, folder: Path) -> None:
        atomic_write_json(folder / INFO_FILE, self.to_dict())
        if self.weight_names == "ldmflow":  # diffusers' config.json takes the name otherwise
            atomic_write_json(folder / "config.json", {"stage": self.stage, "config": self.config, "meta": self.meta})


def save_weights(weights: dict[str, torch.Tensor], path: Path, stage: str) -> None:
    """Tensors to a safetensors file (contiguous CPU copies; safetensors refuses views)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, str(path),
              metadata={"format": "pt", "ldmflow_stage": stage})


def build_model(info: ExportInfo) -> Loaded:
    """The freshly built network of an exported folder, with its typed config and metadata (weights not loaded)."""
    return build_network(info.stage, info.config, info.meta, INFO_FILE)


def load_pretrained(folder: str | Path, device: str | torch.device = "cpu") -> Loaded:
    """A model from a folder written by ``ldmflow export``: the network in eval mode, its config and metadata."""
    from ldmflow.exporting.diffusers_unet import from_diffusers

    folder = Path(folder)
    info = ExportInfo.read(folder)
    loaded = build_model(info)
    weights = load_file(str(folder / info.weights))
    if info.weight_names == "diffusers":
        weights = from_diffusers(loaded.model, weights)
    loaded.model.load_state_dict(weights)
    loaded.model.to(device).eval().requires_grad_(False)
    return loaded


MEMORIZATION_FIGURES = ("counts", "memorized", "tests", "similarity_percentiles", "quality", "inception_fid")


def memorization_figures(summary: str | Path | None) -> dict | None:
    """The headline figures of a memorization ``summary.json`` (None without one)."""
    if summary is None:
        return None
    try:
        data: Any = json.loads(Path(summary).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{summary}: not a readable memorization summary.json ({type(exc).__name__}: {exc})") from None
    if not isinstance(data, dict):
        raise DataError(f"{summary}: not a memorization summary.json (a JSON object is expected)")
    return {"summary": str(summary), **{k: data[k] for k in MEMORIZATION_FIGURES if k in data}}
