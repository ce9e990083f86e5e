"""The built-in demo dataset: coloured shapes on textured backgrounds, with masks and class labels.

Each image holds one to three shapes (circle, square, triangle) over a smooth colour gradient with
fine noise. Its mask gives every pixel's class (0 background, 1 circle, 2 square, 3 triangle) and its
label names the largest shape. Labels are deliberately imbalanced (about 60 / 30 / 10 %) so that
class-balanced sampling matters in the diffusion stage. Same seed, same bytes.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("circle", "square", "triangle")
MASK_CLASSES = 1 + len(CLASSES)  # background + shapes
CLASS_FREQUENCIES = (0.6, 0.3, 0.1)


def _shape_mask(kind: int, cy: float, cx: float, r: float, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    if kind == 0:  # circle
        return (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2
    if kind == 1:  # axis-aligned square
        return (np.abs(yy - cy) <= r * 0.85) & (np.abs(xx - cx) <= r * 0.85)
    # upward triangle: inside three half-planes
    top, base = cy - r, cy + r * 0.8
    half_width = (yy - top) / (base - top) * r
    return (yy >= top) & (yy <= base) & (np.abs(xx - cx) <= half_width)


def render(rng: np.random.Generator, size: int, label: int) -> tuple[np.ndarray, np.ndarray]:
    """One demo image (size, size, 3) uint8 and its mask (size, size) uint8, largest shape = label."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    angle = rng.uniform(0, 2 * np.pi)
    t = ((np.cos(angle) * xx + np.sin(angle) * yy) / size + 1) / 2
    t = np.clip(t, 0, 1)[..., None]
    background = c0 * (1 - t) + c1 * t + rng.normal(0, 6, (size, size, 3))
    image = background
    mask = np.zeros((size, size), dtype=np.uint8)
    n_shapes = int(rng.integers(1, 4))
    # the labelled shape is drawn largest and last so it stays visible
    kinds = [int(k) for k in rng.integers(0, len(CLASSES), n_shapes - 1)] + [label]
    radii = sorted(rng.uniform(0.10, 0.18, n_shapes - 1) * size) + [rng.uniform(0.22, 0.32) * size]
    for kind, r in zip(kinds, radii):
        cy, cx = rng.uniform(r, size - r, 2)
        inside = _shape_mask(kind, cy, cx, r, yy, xx)
        colour = rng.uniform(0, 255, 3)
        image = np.where(inside[..., None], colour + rng.normal(0, 3, (size, size, 3)), image)
        mask[inside] = kind + 1
    return np.clip(image, 0, 255).round().astype(np.uint8), mask


def write_demo_data(out: str | Path, n: int = 256, size: int = 32, seed: int = 42) -> Path:
    """Write N demo images, masks, ``manifest.csv`` (image, mask, label) and ``dataset.json`` (the class names
    and mask classes, which experiment files then need not name) into OUT; returns the manifest."""
    if n < 2 or size < 8:
        raise ValueError(f"demo data needs n >= 2 and size >= 8; got n={n}, size={size}")
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    labels = rng.choice(len(CLASSES), size=n, p=CLASS_FREQUENCIES)
    rows = []
    for i, label in enumerate(labels):
        image, mask = render(rng, size, int(label))
        name = f"{i:05d}.png"
        Image.fromarray(image, "RGB").save(out / "images" / name)
        Image.fromarray(mask, "L").save(out / "masks" / name)
        rows.append({"image": f"images/{name}", "mask": f"masks/{name}", "label": CLASSES[label]})
    manifest = out / "manifest.csv"
    tmp = manifest.with_suffix(".csv.tmp")
    with tmp.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["image", "mask", "label"])
        writer.writeheader()
        writer.writerows(rows)
    (out / "dataset.json").write_text(json.dumps({"classes": list(CLASSES), "mask_classes": MASK_CLASSES}))
    tmp.replace(manifest)
    return manifest
