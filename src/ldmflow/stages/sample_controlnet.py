"""Sampling from a ControlNet checkpoint with one control: decoded PNGs, a grid, ``samples.zarr``.

The control is a row of the latent store the ControlNet was trained on (its index; the control is made
as in training, and the row's class is the default class) or an image file of the autoencoder's image
size: a mask PNG of class ids (signal ``mask``), an image whose Sobel edges are taken (``edges``) or
the control image itself (``image``).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ldmflow import __version__
from ldmflow.artifacts import file_sha256, inference_weights, load_checkpoint
from ldmflow.config.controlnet import ControlNetExperiment
from ldmflow.config.diffusion import DiffusionExperiment, SamplingConfig
from ldmflow.config.schema import from_dict, to_dict, validate
from ldmflow.data.controls import (
    control_preview,
    control_rgb,
    edge_controls,
    edges_from_rgb,
    manifest_controls,
    to_model_input,
)
from ldmflow.data.images import decode_image
from ldmflow.devices import get_device
from ldmflow.diffusion.generate import generate_decoded
from ldmflow.errors import ControlError, SamplingError
from ldmflow.models.controlnet import ControlledUNet, Scale, build_controlnet
from ldmflow.models.unet import build_unet
from ldmflow.stages.sample import (
    check_request,
    decoder_and_schedule,
    prepare_out,
    recorded_guidance,
    resolve_class,
    save_data_values,
    save_samples,
)
from ldmflow.viz import save_png

log = logging.getLogger(__name__)


def checkpoint_stage(checkpoint: str | Path) -> str | None:
    """The stage that wrote a checkpoint ('diffusion', 'controlnet', ...)."""
    return load_checkpoint(checkpoint).get("stage")


def load_controlnet(checkpoint: str | Path, device) -> tuple[ControlledUNet, ControlNetExperiment, DiffusionExperiment, dict]:
    """Rebuild a controlled UNet with its inference (EMA) weights from its checkpoint alone (the base
    UNet's config and weights are inside)."""
    state = load_checkpoint(checkpoint, map_location=device)
    if state.get("stage") != "controlnet":
        raise SamplingError(f"{checkpoint}: a {state.get('stage')} checkpoint, not a ControlNet checkpoint")
    cfg = from_dict(ControlNetExperiment, state["config"])
    extra = state["extra"]
    base_cfg = from_dict(DiffusionExperiment, extra["base_config"])
    base = build_unet(base_cfg, extra["latent_channels"], extra["num_classes"])
    model = build_controlnet(cfg.model, base, extra["control_channels"], extra["downsample"])
    model.load_state_dict(inference_weights(state))
    return model.to(device).eval().requires_grad_(False), cfg, base_cfg, extra


def _read_image(path: Path, size: int, what: str) -> Image.Image:
    try:
        img = Image.open(path)
        img.load()
    except (OSError, SyntaxError, ValueError) as exc:
        raise ControlError(f"control {path}: cannot read it as an image: {exc}") from None
    if img.size != (size, size):
        raise ControlError(f"control {path} is {img.size[0]}x{img.size[1]}; this ControlNet takes {what} of "
                           f"{size}x{size} (the autoencoder's image size)")
    return img


def load_control(value: str | int, cfg: ControlNetExperiment, extra: dict) -> tuple[torch.Tensor, int | None, str]:
    """The control (1, K, H, W) from a store row index or an image file, the row's label (or None), and a
    description for the outputs' attributes."""
    signal, size, k = cfg.control.signal, extra["image_size"], extra["control_channels"]
    text = str(value)
    if text.isascii() and text.isdigit():
        from ldmflow.data.latent_store import LatentStore

        store = LatentStore(extra["latents"])
        i = int(text)
        if i >= store.n:
            raise ControlError(f"control index {i}: the latent store {store.path} has {store.n} rows (0..{store.n - 1})")
        if signal == "mask":
            raw = torch.from_numpy(store.masks[i:i + 1].astype(np.int64))
        elif signal == "edges":
            raw = torch.from_numpy(edge_controls([store.paths[i]], size, str(store.path), store.attrs.get("channels")))
        else:
            from ldmflow.stages.train_controlnet import store_manifest

            manifest = cfg.control.manifest or store_manifest(store)
            raw = torch.from_numpy(manifest_controls(manifest, [store.paths[i]], size))
        label = int(store.labels[i])
        return to_model_input(signal, raw, k), (label if label >= 0 else None), f"{store.path}[{i}]"
    path = Path(text)
    if not path.is_file():
        raise ControlError(f"control {text!r}: neither a row index of the latent store nor an image file")
    if signal == "mask":
        img = _read_image(path, size, "masks")
        if img.mode not in ("L", "P", "I", "I;16", "1"):
            raise ControlError(f"control {path} has mode {img.mode}; a mask must be single-channel (class ids)")
        ids = np.asarray(img).astype(np.int64)
        if ids.max() >= k:
            raise ControlError(f"control {path} has class id {ids.max()}; this ControlNet knows ids 0..{k - 1}")
        return to_model_input(signal, torch.from_numpy(ids)[None], k), None, str(path)
    img = _read_image(path, size, "images")
    if signal == "edges":  # the file's own channels: 16-bit grayscale keeps its contrast
        raw = torch.from_numpy(edges_from_rgb(decode_image(img, None, str(path), "control", "control", 1)[None]))
    else:
        raw = torch.from_numpy(control_rgb(decode_image(img, 3, str(path), "control", "control", 1), size))[None]
    return to_model_input(signal, raw, k), None, str(path)


def load_controls(value: str | int, n: int, cfg: ControlNetExperiment, extra: dict
                  ) -> tuple[torch.Tensor, list[int | None], str]:
    """N controls (N, K, H, W), each sample's row label (or None) and a description.

    ``value`` is one control (a store row index or an image file, used for every sample) or a split name
    (``val``, ``train``, ``test``): sample i then takes the i-th row of that split of the latent store, in
    turn, so a set of samples covers many held-out controls (what the workflow evaluates).
    """
    from ldmflow.data.manifest import SPLITS

    if str(value) in SPLITS:
        from ldmflow.data.latent_store import LatentStore

        rows = LatentStore(extra["latents"]).indices(str(value))
        if not len(rows):
            raise ControlError(f"control {value!r}: the latent store {extra['latents']} has no {value} rows")
        picks = [int(rows[i % len(rows)]) for i in range(n)]
        loaded = [load_control(str(i), cfg, extra) for i in picks]
        return (torch.cat([c for c, _, _ in loaded]), [lab for _, lab, _ in loaded],
                f"{extra['latents']} split {value} (rows {picks[0]}..., in turn)")
    control, label, described = load_control(value, cfg, extra)
    return control.expand(n, *control.shape[1:]), [label] * n, described


def sample_controlnet(checkpoint: str | Path, control: str | int, n: int, out: str | Path, *, scale: Scale | None = None,
                      class_id: str | int | None = None, guidance: float | None = None, sampler: str | None = None,
                      steps: int | None = None, seed: int = 42, device: str | None = None,
                      batch_size: int = 64, data_values: bool = False) -> dict:
    """Generate N samples into OUT: ``sample_NNNNN.png``, ``grid.png`` (each control beside its sample),
    ``samples.zarr``; same seed, same images.

    ``control``: one control for all samples (a store row index or an image file), or a split name (each
    sample takes the next row of that split). The class is ``class_id``, else each control row's class,
    else the classes in turn (class-conditional models only). ``scale`` (one number or one per UNet level)
    defaults to the experiment's sampling.scale. ``data_values``: also write the samples in the data's own
    bit depth and channels into ``OUT/data/`` (:func:`ldmflow.stages.sample.save_data_values`).
    """
    if n < 1:
        raise SamplingError(f"--n {n}: allowed: 1 or more samples")
    dev = get_device(device)
    model, cfg, base_cfg, extra = load_controlnet(checkpoint, dev)
    sampling = cfg.sampling.base()
    for key, value in {"sampler": sampler, "steps": steps}.items():
        if value is not None:
            setattr(sampling, key, value)
    check_request(n, batch_size, sampling, base_cfg.diffusion.timesteps, extra["num_classes"], guidance)
    if guidance is not None:
        sampling.guidance = guidance
    validate(to_dict(sampling), SamplingConfig, "--sampler/--steps/--guidance")
    scale = cfg.sampling.scale if scale is None else scale
    controls, row_labels, described = load_controls(control, n, cfg, extra)
    try:
        model.level_scales(scale)
    except ValueError as exc:
        raise SamplingError(f"--scale: {exc}") from None
    decoder, schedule = decoder_and_schedule(extra, base_cfg.diffusion, dev)
    num_classes = extra["num_classes"]
    fixed = resolve_class(class_id, extra["classes"], num_classes)
    labels = None
    if num_classes:
        labels = torch.tensor([fixed if fixed is not None else (lab if lab is not None else i % num_classes)
                               for i, lab in enumerate(row_labels)], dtype=torch.long)
    out = prepare_out(out)
    start = time.monotonic()
    latents, pixels = generate_decoded(lambda lo, hi: model.bind(controls[lo:hi].to(dev), scale), n, labels, extra,
                                       schedule, sampling, base_cfg.diffusion.prediction, decoder, seed=seed,
                                       device=dev, batch_size=batch_size)
    previews = control_preview(cfg.control.signal, controls.cpu())  # (N, H, W, 3)
    save_png(previews[0], out / "control.png")
    attrs = {"format": "ldmflow-samples-v1", "checkpoint": str(checkpoint), "checkpoint_sha256": file_sha256(checkpoint),
             "autoencoder_checkpoint": extra["autoencoder_checkpoint"],
             "autoencoder_sha256": extra["autoencoder_sha256"], "sampler": sampling.sampler, "steps": sampling.steps,
             "eta": sampling.eta, "guidance": recorded_guidance(sampling, num_classes), "seed": seed,
             "classes": extra["classes"], "fusion": cfg.model.fusion, "signal": cfg.control.signal, "control": described, "scale": scale,
             "ldmflow_version": __version__}
    lab = labels.numpy() if labels is not None else np.full(n, -1)
    save_samples(out, pixels, latents, lab, attrs, controls=previews)
    if data_values:
        save_data_values(out, latents, decoder, extra.get("intensity"), batch_size)
    seconds = time.monotonic() - start
    log.info("wrote %d samples under control %s to %s in %.1f s (%s, %d steps, guidance %s, scale %s)", n, described,
             out, seconds, sampling.sampler, sampling.steps, attrs["guidance"], scale)
    return {"n": n, "out": str(out), "seconds": seconds, **attrs}
