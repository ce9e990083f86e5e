"""``ldmflow export``: a checkpoint as a folder others can load (safetensors, diffusers where exact, a model card).

A diffusion UNet goes out as a diffusers ``UNet2DModel`` folder with its ``DDIMScheduler`` config when its
architecture maps exactly (:func:`ldmflow.exporting.diffusers_unet.diffusers_mismatch` says why not
otherwise, and the weights go out under our names); an autoencoder or a ControlNet as ``model.safetensors``.
A diffusion or ControlNet export holds the autoencoder that decodes its latents in ``autoencoder/`` (checked
against the sha256 recorded at training time). Every folder loads with :func:`ldmflow.api.load_pretrained`.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from ldmflow import __version__
from ldmflow.artifacts import atomic_write_bytes, atomic_write_json, file_sha256, publish_dir, remove_stale_temporaries
from ldmflow.checkpoints import Loaded, checkpoint_stage, load_autoencoder, load_controlnet, load_diffusion
from ldmflow.config.schema import to_dict
from ldmflow.errors import SamplingError
from ldmflow.exporting.bundle import DIFFUSERS, INFO_FILE, OURS, ExportInfo, memorization_figures, save_weights
from ldmflow.exporting.card import model_card
from ldmflow.exporting.diffusers_unet import diffusers_mismatch, scheduler_config, to_diffusers, unet_config

log = logging.getLogger(__name__)

AUTOENCODER_DIR = "autoencoder"
CONTROLNET_REFUSED = ("diffusers' ControlNetModel steers a UNet2DConditionModel (text cross-attention); ldmflow's "
                      "ControlNet steers its class-conditional UNet, which diffusers has no ControlNet for")
AUTOENCODER_REFUSED = ("ldmflow's autoencoder has segmentation and classification heads and GroupNorms whose group "
                       "count follows the width; diffusers' AutoencoderKL has neither")


def _facts(checkpoint: Path, loaded: Loaded, memorization: dict | None) -> dict:
    """The ExportInfo fields every stage shares."""
    return {"name": loaded.config.name, "config": to_dict(loaded.config), "meta": loaded.meta.to_dict(),
            "checkpoint": str(checkpoint), "checkpoint_sha256": file_sha256(checkpoint),
            "memorization": memorization, "ldmflow_version": __version__}


def _latent_facts(loaded: Loaded) -> dict:
    latents = loaded.meta.latents
    return {"scale_factor": latents.scale_factor, "intensity": latents.intensity,
            "data_fingerprint_sha256": latents.data_fingerprint_sha256}


def _export_autoencoder(checkpoint: Path, out: Path, memorization: dict | None = None,
                        scale_factor: float | None = None) -> ExportInfo:
    loaded = load_autoencoder(checkpoint)
    save_weights(loaded.model.state_dict(), out / OURS, "autoencoder")
    return ExportInfo(stage="autoencoder", weights=OURS, weight_names="ldmflow", diffusers_refused=AUTOENCODER_REFUSED,
                      scale_factor=scale_factor, data_fingerprint_sha256=loaded.meta.data_fingerprint_sha256,
                      **_facts(checkpoint, loaded, memorization))


def _export_diffusion(checkpoint: Path, out: Path, memorization: dict | None) -> ExportInfo:
    loaded = load_diffusion(checkpoint)
    model, cfg = loaded.model, loaded.config
    atomic_write_json(out / "scheduler" / "scheduler_config.json",
                      {"_class_name": "DDIMScheduler", **scheduler_config(cfg.diffusion)})
    refused = diffusers_mismatch(model)
    if refused is None:
        config = unet_config(model, loaded.meta.latents.latent_size)
        atomic_write_json(out / "config.json", {"_class_name": "UNet2DModel", **config})
        save_weights(to_diffusers(model), out / DIFFUSERS, "diffusion")
        where = {"weights": DIFFUSERS, "weight_names": "diffusers", "diffusers": "UNet2DModel + DDIMScheduler"}
    else:
        log.warning("%s: no diffusers export (%s); writing %s for ldmflow.api.load_pretrained", checkpoint, refused,
                    OURS)
        save_weights(model.state_dict(), out / OURS, "diffusion")
        where = {"weights": OURS, "weight_names": "ldmflow", "diffusers_refused": refused}
    return ExportInfo(stage="diffusion", **where, **_latent_facts(loaded), **_facts(checkpoint, loaded, memorization))


def _export_controlnet(checkpoint: Path, out: Path, memorization: dict | None) -> ExportInfo:
    loaded = load_controlnet(checkpoint)
    save_weights(loaded.model.state_dict(), out / OURS, "controlnet")
    return ExportInfo(stage="controlnet", weights=OURS, weight_names="ldmflow", diffusers_refused=CONTROLNET_REFUSED,
                      **_latent_facts(loaded), **_facts(checkpoint, loaded, memorization))


def _bundle_autoencoder(info: ExportInfo, out: Path, autoencoder: str | Path | None, shown: Path) -> ExportInfo:
    """Export the autoencoder a diffusion or ControlNet model was trained with into ``out/autoencoder``."""
    from dataclasses import replace

    from ldmflow.checkpoints import verified_autoencoder
    from ldmflow.metadata import DiffusionMeta

    latents = DiffusionMeta.from_dict(info.meta).latents
    path = Path(autoencoder or latents.autoencoder_checkpoint)
    try:
        verified_autoencoder(latents, "cpu", path)
    except SamplingError as exc:
        log.warning("the export holds no autoencoder: %s", exc)
        return info
    write_folder(_export_autoencoder(path, out / AUTOENCODER_DIR, scale_factor=info.scale_factor),
                 out / AUTOENCODER_DIR, shown / AUTOENCODER_DIR)
    return replace(info, autoencoder=AUTOENCODER_DIR)


def write_folder(info: ExportInfo, out: Path, shown: Path) -> None:
    """``ldmflow.json``, ``config.json`` (our weights only) and the model card ``README.md`` into ``out``; the
    card's examples load from ``shown``, the folder's final name."""
    info.write(out)
    atomic_write_bytes(out / "README.md", model_card(info, str(shown)).encode())


def export_checkpoint(checkpoint: str | Path, out: str | Path, *, memorization: str | Path | None = None,
                      autoencoder: str | Path | None = None) -> ExportInfo:
    """Export a checkpoint into the folder ``out`` (replaced whole, never half-written); returns what
    ``out/ldmflow.json`` holds.

    ``memorization``: the memorization audit's ``summary.json`` whose figures go into the card.
    ``autoencoder``: a moved copy of the autoencoder the model was trained with (default: the recorded path).
    """
    checkpoint, out = Path(checkpoint), Path(out)
    stage = checkpoint_stage(checkpoint)
    exporters = {"autoencoder": _export_autoencoder, "diffusion": _export_diffusion,
                 "controlnet": _export_controlnet}
    if stage not in exporters:
        raise SamplingError(f"{checkpoint}: a {stage} checkpoint; `ldmflow export` takes an autoencoder, diffusion "
                            "or ControlNet checkpoint")
    if out.is_dir() and any(out.iterdir()) and not (out / INFO_FILE).is_file():
        raise SamplingError(f"--out {out}: a folder with other files in it, which an export would replace; give a "
                            "new folder (or an earlier export's)")
    figures = memorization_figures(memorization)  # an unreadable summary stops the export before any work
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        info = exporters[stage](checkpoint, tmp, figures)
        if stage != "autoencoder":
            info = _bundle_autoencoder(info, tmp, autoencoder, out)
        write_folder(info, tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish_dir(tmp, out)
    log.info("exported %s (%s) to %s: %s", checkpoint, stage, out, info.diffusers or "ldmflow safetensors")
    return info
