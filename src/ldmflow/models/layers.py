"""Building blocks shared by the autoencoder, the UNet and ControlNet: the only shared model code."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn


def norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with the largest group count <= 32 that divides the channels and leaves >= 4 channels per group.

    32 groups is latent diffusion's choice at 128+ channels (unchanged there). Narrow demo models would get one
    channel per group, i.e. instance norm, which erases each image's per-channel mean (its colour) at every
    layer: the demo autoencoder stayed blurry at ~14-17 dB PSNR with it and reached ~22 dB in the same
    800 steps with 4 channels per group (Wu & He 2018 find 1 channel per group the worst setting too)."""
    groups = next(g for g in (32, 16, 8, 4, 2, 1) if channels % g == 0 and (channels // g >= 4 or g == 1))
    return nn.GroupNorm(groups, channels, eps=1e-6)


def no_norm(channels: int) -> nn.Identity:
    """The identity, in the place of :func:`norm` (``model.norm: none``)."""
    return nn.Identity()


NORMS = {"group": norm, "none": no_norm}


def checkpointed(module: nn.Module, *args: torch.Tensor | None, enabled: bool) -> torch.Tensor:
    """``module(*args)``, recomputed in the backward pass instead of keeping its activations when ``enabled``
    and gradients are on (activation checkpointing: memory for about one more forward pass). The
    non-reentrant form replays dropout's random draws, so values and gradients are those of the plain call."""
    if enabled and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(module, *args, use_reentrant=False)
    return module(*args)


def run_blocks(blocks: nn.Sequential, x: torch.Tensor, checkpointing: bool) -> torch.Tensor:
    """``blocks(x)``, each block checkpointed on its own when ``checkpointing`` (see :func:`checkpointed`)."""
    for block in blocks:
        x = checkpointed(block, x, enabled=checkpointing)
    return x


def zero_module(module: nn.Module) -> nn.Module:
    """Zero a module's parameters, so that a new branch starts as the identity (ControlNet, FiLM)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResnetBlock(nn.Module):
    """Pre-activation ResNet block; with ``emb_channels`` a timestep embedding shifts and scales it."""

    def __init__(self, in_ch: int, out_ch: int, dropout: float = 0.0, emb_channels: int | None = None,
                 norm_layer=norm):
        super().__init__()
        self.norm1 = norm_layer(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_channels, 2 * out_ch) if emb_channels else None
        self.norm2 = norm_layer(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.norm2(h)
        if self.emb is not None and emb is not None:
            scale, shift = self.emb(F.silu(emb))[:, :, None, None].chunk(2, dim=1)  # (N, C, 1, 1) each
            h = h * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class Downsample(nn.Module):
    """Halve the resolution with a stride-2 3x3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Double the resolution: nearest-neighbour upsampling, then a 3x3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the pixels of a feature map, with a residual connection."""

    def __init__(self, channels: int, head_channels: int = 64):
        super().__init__()
        self.heads = max(1, channels // head_channels)
        self.norm = norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(n, 3, self.heads, c // self.heads, h * w)
        q, k, v = qkv.transpose(-1, -2).unbind(1)  # (N, heads, HW, C/heads) each
        out = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj(out.transpose(-1, -2).reshape(n, c, h, w))


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, (N,) -> (N, dim), as in DDPM."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))
