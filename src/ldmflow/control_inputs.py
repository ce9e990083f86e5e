"""The controls a ControlNet samples under: a row of its latent store, an image file, or a split in turn."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ldmflow.config.controlnet import ControlNetExperiment
from ldmflow.data.controls import control_rgb, edge_controls, edges_from_rgb, manifest_controls, to_model_input
from ldmflow.data.images import decode_image
from ldmflow.data.latent_store import LatentStore
from ldmflow.data.manifest import SPLITS
from ldmflow.errors import ControlError
from ldmflow.metadata import ControlNetMeta


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


def load_control(value: str | int, cfg: ControlNetExperiment,
                 meta: ControlNetMeta) -> tuple[torch.Tensor, int | None, str]:
    """The control (1, K, H, W) from a store row index or an image file, the row's label (or None), and a
    description for the outputs' attributes."""
    signal, size, k = cfg.control.signal, meta.image_size, meta.control_channels
    text = str(value)
    if text.isascii() and text.isdigit():
        store = LatentStore(meta.latents.latents)
        i = int(text)
        if i >= store.n:
            raise ControlError(f"control index {i}: the latent store {store.path} has {store.n} rows "
                               f"(0..{store.n - 1})")
        if signal == "mask":
            raw = torch.from_numpy(store.masks[i:i + 1].astype(np.int64))
        elif signal == "edges":
            raw = torch.from_numpy(edge_controls([store.paths[i]], size, str(store.path), store.info.channels))
        else:
            manifest = cfg.control.manifest or store.info.manifest.path
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


def load_controls(value: str | int, n: int, cfg: ControlNetExperiment, meta: ControlNetMeta
                  ) -> tuple[torch.Tensor, list[int | None], str]:
    """N controls (N, K, H, W), each sample's row label (or None) and a description.

    ``value`` is one control (a store row index or an image file, used for every sample) or a split name
    (``val``, ``train``, ``test``): sample i then takes the i-th row of that split of the latent store, in
    turn, so a set of samples covers many held-out controls (what the workflow evaluates).
    """
    if str(value) in SPLITS:
        path = meta.latents.latents
        rows = LatentStore(path).indices(str(value))
        if not len(rows):
            raise ControlError(f"control {value!r}: the latent store {path} has no {value} rows")
        picks = [int(rows[i % len(rows)]) for i in range(n)]
        loaded = [load_control(str(i), cfg, meta) for i in picks]
        return (torch.cat([c for c, _, _ in loaded]), [lab for _, lab, _ in loaded],
                f"{path} split {value} (rows {picks[0]}..., in turn)")
    control, label, described = load_control(value, cfg, meta)
    return control.expand(n, *control.shape[1:]), [label] * n, described
