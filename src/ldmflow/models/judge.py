"""The judge: a small pixel-space network trained on real images only, that reads a class and a
segmentation from an image. It scores generated images the way a person would look at them (is this a
circle? does the sample follow its mask?), independently of the autoencoder that decoded them.

A compact U-Net: an encoder of ``levels`` stages (3x3 convolutions, GroupNorm, SiLU; stride 2 between
stages), a class head on the pooled bottleneck and a decoder with skip connections for the segmentation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _norm(channels: int) -> nn.GroupNorm:
    # One channel per group up to 32 groups (instance norm on the narrow demo judge): unlike the generative
    # models (layers.norm keeps >= 4 channels per group there, so that colour survives), the judge should read
    # shapes, not colours; its demo recipe was tuned with this norm.
    return nn.GroupNorm(next(g for g in (32, 16, 8, 4, 2, 1) if channels % g == 0), channels, eps=1e-6)


def _conv(in_ch: int, out_ch: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1), _norm(out_ch), nn.SiLU())


class Judge(nn.Module):
    """Class logits (N, K), segmentation logits (N, M, H, W) and pooled features (N, D) of images
    (N, C, H, W) in [-1, 1]; either head is absent (None) when the data had no labels or no masks."""

    def __init__(self, channels: int, num_classes: int | None, mask_classes: int | None, width: int = 16,
                 levels: int = 3, dropout: float = 0.1, image_size: int = 32, flips: tuple[int, ...] = ()):
        super().__init__()
        self.image_size = image_size  # the side of the images it reads; judge_outputs resizes others to it
        self.flips = tuple(flips)  # dims it trained flipped: its outputs average each image and its flips
        widths = [width * 2**i for i in range(levels)]
        self.stem = _conv(channels, widths[0])
        self.down = nn.ModuleList(
            nn.Sequential(_conv(widths[max(i - 1, 0)], w, stride=1 if i == 0 else 2), _conv(w, w))
            for i, w in enumerate(widths))
        # features: the pooled bottleneck and the pooled stage above it (coarse shape + finer texture)
        self.feature_dim = widths[-1] + (widths[-2] if levels > 1 else 0)
        # with masks, the class head also reads how much of the image each segment class covers
        head_in = self.feature_dim + (mask_classes or 0)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(head_in, num_classes)) if num_classes else None
        self.up = nn.ModuleList(_conv(widths[i + 1] + widths[i], widths[i]) for i in reversed(range(levels - 1)))
        self.segmenter = nn.Conv2d(widths[0], mask_classes, 1) if mask_classes else None

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The encoder's stage outputs, finest first: [(N, w, H, W), (N, 2w, H/2, W/2), ...]."""
        h, skips = self.stem(x), []
        for stage in self.down:
            h = stage(h)
            skips.append(h)
        return skips

    def pooled(self, skips: list[torch.Tensor]) -> torch.Tensor:
        """(N, D) image-level features: average-pooled bottleneck and the stage above it."""
        return torch.cat([s.mean((2, 3)) for s in skips[-2:]], dim=1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor | None]:
        skips = self.encode(x)
        features = self.pooled(skips)
        out: dict[str, torch.Tensor | None] = {"features": features, "logits": None, "seg": None}
        head_in = features
        if self.segmenter is not None:
            h = skips[-1]
            for block, skip in zip(self.up, reversed(skips[:-1])):
                h = block(torch.cat([F.interpolate(h, size=skip.shape[-2:], mode="nearest"), skip], dim=1))
            out["seg"] = self.segmenter(h)  # (N, M, H, W)
            head_in = torch.cat([features, out["seg"].softmax(1).mean((2, 3))], dim=1)  # + area fractions (N, M)
        if self.classifier is not None:
            out["logits"] = self.classifier(head_in)
        return out
