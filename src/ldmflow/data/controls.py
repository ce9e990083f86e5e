"""Control signals for ControlNet: one-hot masks, Sobel edge maps, manifest control images; their dataset.

Every control is a float tensor (N, K, H, W) at the autoencoder's image resolution H = W = image_size:

- ``mask``: the store's segmentation mask, one-hot, K = the number of mask classes;
- ``edges``: the Sobel gradient magnitude of the grayscale image (BT.601 luma of RGB, the channel mean of
  other channel counts), each image scaled to [0, 1], K = 1;
- ``image``: the image in the manifest's ``control`` column (same size as its image, resized and
  centre-cropped like it), RGB in [-1, 1], K = 3; grayscale control files are repeated to RGB, RGBA is
  composited on black, and 16- or 32-bit files are stretched from their own min..max to 0..255.

Edge maps and control images are computed once per run from the files and held in memory as uint8.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ldmflow.data.images import decode_image, load_row, resize_planes
from ldmflow.data.manifest import read_manifest
from ldmflow.errors import ControlError

log = logging.getLogger(__name__)

Signal = Literal["mask", "edges", "image"]
SIGNALS: tuple[str, ...] = ("mask", "edges", "image")
SOBEL_X = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601 grayscale


def control_channels(signal: Signal, mask_classes: int | None) -> int:
    """K, the channels of a control signal."""
    if signal == "mask":
        if not mask_classes:
            raise ControlError("control.signal 'mask' needs a latent store with masks (the manifest had no 'mask' "
                               "column); allowed without masks: 'edges', 'image'")
        return mask_classes
    if signal == "edges":
        return 1
    if signal == "image":
        return 3
    raise ControlError(f"unknown control signal {signal!r}; allowed: {', '.join(SIGNALS)}")


# --------------------------------------------------------------------------------------------------
# Computing controls: uint8 (N, K, H, W) for storage, float (N, K, H, W) for the model
# --------------------------------------------------------------------------------------------------


def sobel_edges(gray: torch.Tensor) -> torch.Tensor:
    """Sobel gradient magnitude of grayscale images (N, 1, H, W), each scaled so its maximum is 1."""
    kernels = torch.stack([SOBEL_X, SOBEL_X.T])[:, None].to(gray)  # (2, 1, 3, 3)
    g = F.conv2d(F.pad(gray, (1, 1, 1, 1), mode="replicate"), kernels)  # (N, 2, H, W)
    mag = g.pow(2).sum(1, keepdim=True).sqrt()
    return mag / mag.amax(dim=(2, 3), keepdim=True).clamp_min(1e-8)


def edges_from_rgb(images: np.ndarray) -> np.ndarray:
    """(N, H, W, C) images (uint8, or raw 16/32-bit values: each edge map is scaled to its own maximum, so
    the value scale does not matter) -> (N, 1, H, W) uint8 edge maps. C = 3 is RGB (luma), else the mean."""
    x = torch.from_numpy(np.require(images, requirements=["C", "W"])).float()
    if x.shape[-1] == 3:
        gray = (x * torch.tensor(LUMA)).sum(-1)[:, None]  # (N, 1, H, W)
    else:
        gray = x.mean(-1)[:, None]
    return sobel_edges(gray).mul_(255.0).round_().to(torch.uint8).numpy()


def edge_controls(paths: list[str], size: int, source: str = "latent store", channels: int | None = None) -> np.ndarray:
    """Edge maps (N, 1, size, size) uint8 of the image files, resized and centre-cropped like training images;
    ``channels`` is the data's (the store's ``channels`` attribute; None: each file's own)."""
    images = np.stack([load_row(p, None, size, None, source, i + 1, channels)[0] for i, p in enumerate(paths)])
    return edges_from_rgb(images)


def load_control_image(path: str, size: int, source: str, row: int, image_path: str | None = None) -> np.ndarray:
    """A control image (3, size, size) uint8; when ``image_path`` is given, it must have that image's size."""
    try:
        img = Image.open(path)
        img.load()
    except FileNotFoundError:
        raise ControlError(f"{source}: row {row}: control file not found: {path}") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ControlError(f"{source}: row {row}: cannot read control image {path}: {exc}") from None
    if image_path is not None:
        with Image.open(image_path) as ref:
            want = ref.size
        if img.size != want:
            raise ControlError(f"{source}: row {row}: control image {path} is {img.size[0]}x{img.size[1]} but its "
                               f"image {image_path} is {want[0]}x{want[1]}")
    return control_rgb(decode_image(img, 3, path, "control image", source, row), size)


def control_rgb(arr: np.ndarray, size: int) -> np.ndarray:
    """A decoded control image (H, W, 3) -> (3, size, size) uint8; 16/32-bit values are stretched from the
    image's own min..max to 0..255 (a control image carries shapes, not calibrated intensities)."""
    if arr.dtype != np.uint8:
        lo, hi = float(arr.min()), float(arr.max())
        arr = np.round((arr - lo) / max(hi - lo, 1e-8) * 255.0).astype(np.uint8)
    return resize_planes(arr, size).transpose(2, 0, 1).copy()


def manifest_controls(manifest: str | Path, image_paths: list[str], size: int) -> np.ndarray:
    """The manifest's control images (N, 3, size, size) uint8 for the given image paths (the store's rows)."""
    frame = read_manifest(manifest)
    source = frame.attrs["source"]
    if "control" not in frame.columns:
        raise ControlError(f"{source}: control.signal 'image' needs a 'control' column in the manifest; found "
                           f"columns: {', '.join(c for c in frame.columns if c != 'row')}")
    by_image = {img: (ctrl, int(row)) for img, ctrl, row in zip(frame["image"], frame["control"], frame["row"])}
    out = np.empty((len(image_paths), 3, size, size), dtype=np.uint8)
    for i, path in enumerate(image_paths):
        if path not in by_image:
            raise ControlError(f"{source}: no manifest row has the image {path} of the latent store; give the "
                               "manifest the store was embedded from (control.manifest)")
        ctrl, row = by_image[path]
        if not ctrl:
            raise ControlError(f"{source}: row {row}: empty 'control' path")
        out[i] = load_control_image(ctrl, size, source, row, image_path=path)
    return out


def to_model_input(signal: Signal, raw: torch.Tensor, mask_classes: int | None = None) -> torch.Tensor:
    """Stored control -> model input (N, K, H, W) float, on ``raw``'s device: masks (N, H, W) or (N, 1, H, W)
    int to one-hot, uint8 edges to [0, 1], uint8 images to [-1, 1]."""
    if signal == "mask":
        ids = raw[:, 0] if raw.dim() == 4 else raw
        return F.one_hot(ids.long(), mask_classes).permute(0, 3, 1, 2).float()
    if signal == "edges":
        return raw.float() / 255.0
    return raw.float() / 127.5 - 1.0


def control_preview(signal: Signal, control: torch.Tensor) -> np.ndarray:
    """Model input (N, K, H, W) -> (N, H, W, 3) uint8 for grids: masks coloured, edges gray, images as they are."""
    from ldmflow.viz import colorize, to_uint8

    if signal == "mask":
        return colorize(control.argmax(1))
    if signal == "edges":
        return to_uint8(control.float().mul(2).sub(1).expand(-1, 3, -1, -1))
    return to_uint8(control)


# --------------------------------------------------------------------------------------------------
# The dataset
# --------------------------------------------------------------------------------------------------


class ControlDataset(torch.utils.data.Dataset):
    """A :class:`ldmflow.data.latent_store.LatentDataset` whose batches also carry ``control`` and, when the store
    has masks and the signal is ``mask`` or ``masks`` is set, ``mask`` (B, H, W) uint8 (control fidelity
    compares against it).

    ``control`` is the model input (B, K, H, W) float, or with ``raw`` the control as stored, uint8: masks
    (B, 1, H, W), edge maps (B, 1, H, W), control images (B, 3, H, W), a quarter of the bytes (a K-th for
    masks) to move to the device, where :func:`to_model_input` makes the model input. Raw controls flip with
    the latents along the last axis like model inputs do.

    ``stored`` holds the edge maps or control images of all store rows, (N, K, H, W) uint8; masks come
    from the store itself. ``labels`` and ``rows`` are the latent dataset's (class balance, grids).
    """

    def __init__(self, latents, signal: Signal, mask_classes: int | None, stored: np.ndarray | None = None,
                 raw: bool = False, masks: bool = True):
        if signal == "mask" and latents.store.masks is None:
            control_channels(signal, None)  # raises the clear error
        if signal != "mask" and stored is None:
            raise ValueError(f"control signal {signal!r} needs its precomputed controls")
        self.latents = latents.with_masks() if masks or signal == "mask" else latents
        self.signal, self.mask_classes, self.raw = signal, mask_classes, raw
        self.stored = None if stored is None else torch.from_numpy(stored[latents.rows])  # this split's rows
        self.labels = latents.labels
        self.rows = latents.rows

    def __len__(self) -> int:
        return len(self.latents)

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        batch = self.latents.__getitems__(indices)
        raw = batch["mask"][:, None] if self.signal == "mask" else self.stored[torch.as_tensor(indices)]
        batch["control"] = raw if self.raw else to_model_input(self.signal, raw, self.mask_classes)
        return batch

    def model_input(self, control: torch.Tensor) -> torch.Tensor:
        """A batch's ``control`` as the model takes it (B, K, H, W) float, on its device; as is when already so."""
        return to_model_input(self.signal, control, self.mask_classes) if control.dtype == torch.uint8 else control

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[0] for k, v in self.__getitems__([i]).items()}
