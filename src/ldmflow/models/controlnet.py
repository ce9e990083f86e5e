"""Controlled UNets: a trained diffusion UNet steered by a spatial control signal, in three fusion modes.

Noisy latent (N, C, h, w), timestep (N,), optional class id (N,) and a control (N, K, H, W) at image
resolution (H = f h, f the autoencoder's downsampling) -> model output (N, C, h, w), like the base UNet.
The control is a one-hot mask, an edge map or a control image; the model only sees K channels.

- ``add`` (ControlNet, Zhang et al. 2023): a trainable copy of the base UNet's encoder and middle block,
  initialised from the base weights, reads the noisy latent plus a hint (the control brought to latent
  resolution by stride-2 convolutions, the last one zero-initialised). A zero-initialised 1x1 convolution
  maps each of its skips and its middle output to a residual added to the frozen base UNet's.
- ``concat``: the control, brought to latent resolution by space-to-depth (pixel unshuffle: lossless,
  K f^2 channels), is concatenated to the UNet input; the input convolution gains zero-initialised
  channels for it and the whole UNet is fine-tuned.
- ``film``: a small control encoder gives each encoder output (skip) and the middle block of the frozen
  base UNet a spatial scale and shift, ``s -> s (1 + gamma) + beta`` (FiLM, Perez et al. 2018), from
  zero-initialised 1x1 convolutions.

Every mode starts as the base model: ``add`` and ``film`` give the base UNet's output exactly, ``concat``
too (its new input weights are zero). The conditioning ``scale`` multiplies the residuals (add), the
scale and shift (film) or the control channels (concat); ``add`` and ``film`` also take one scale per
UNet level (the middle block takes the last level's).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ldmflow.config.controlnet import ControlNetModelConfig
from ldmflow.models.layers import zero_module
from ldmflow.models.unet import UNet

Fusion = Literal["add", "concat", "film"]
FUSIONS: tuple[str, ...] = ("add", "concat", "film")
Scale = float | Sequence[float]


class HintEncoder(nn.Module):
    """Control (N, K, H, W) -> features (N, out, H/f, W/f): a 3x3 convolution, log2(f) stride-2 ones, then
    a 3x3 output convolution (zero-initialised when ``zero_out``, so that a new branch adds nothing)."""

    def __init__(self, in_channels: int, out_channels: int, factor: int, width: int, zero_out: bool = True):
        super().__init__()
        if factor < 1 or factor & (factor - 1):
            raise ValueError(f"the downsampling factor must be a power of 2, got {factor}")
        layers: list[nn.Module] = [nn.Conv2d(in_channels, width, 3, padding=1), nn.SiLU()]
        for _ in range(int(math.log2(factor))):
            layers += [nn.Conv2d(width, width, 3, stride=2, padding=1), nn.SiLU()]
        self.body = nn.Sequential(*layers)
        self.out = nn.Conv2d(width, out_channels, 3, padding=1)
        if zero_out:
            zero_module(self.out)

    def forward(self, control: torch.Tensor) -> torch.Tensor:
        return self.out(self.body(control))


def _decoder_modules(unet: UNet) -> list[nn.Module]:
    """The modules of a UNet that run after its middle block."""
    return [unet.up, unet.norm_out, unet.conv_out]


class ControlledUNet(nn.Module):
    """What every fusion mode shares: the base UNet, the control's shape, the scale, sampling helpers.

    ``base`` is the trained diffusion UNet; the subclass decides which of its weights train. ``factor`` is
    the autoencoder's downsampling (control side / latent side) and ``control_channels`` K.
    """

    fusion: Fusion

    def __init__(self, base: UNet, control_channels: int, factor: int):
        super().__init__()
        if control_channels < 1:
            raise ValueError(f"control_channels must be >= 1, got {control_channels}")
        self.base = base
        self.control_channels = control_channels
        self.factor = factor
        self.levels = len(base.cfg.channel_mult)

    def freeze_base(self, train_decoder: bool) -> None:
        """Freeze the base UNet; with ``train_decoder`` its decoder (after the middle block) still trains."""
        self.base.requires_grad_(False)
        for m in _decoder_modules(self.base) if train_decoder else ():
            m.requires_grad_(True)

    @property
    def null_label(self) -> int | None:
        return self.base.null_label

    @property
    def num_classes(self) -> int | None:
        return self.base.num_classes

    def check_control(self, control: torch.Tensor, x: torch.Tensor) -> None:
        """Refuse a control whose batch, channels or size does not fit the latents x (N, C, h, w)."""
        want = (x.shape[0], self.control_channels, x.shape[-2] * self.factor, x.shape[-1] * self.factor)
        if control.ndim != 4 or tuple(control.shape[1:]) != want[1:] or control.shape[0] not in (1, x.shape[0]):
            raise ValueError(
                f"control of shape {tuple(control.shape)}; expected (N, {want[1]}, {want[2]}, {want[3]}): "
                f"{self.control_channels} channel(s) at image resolution ({self.factor} x the {x.shape[-2]}x"
                f"{x.shape[-1]} latent), N = {x.shape[0]} or 1")

    def level_scales(self, scale: Scale) -> list[float]:
        """One conditioning scale per UNet level from a number or a per-level list."""
        if isinstance(scale, (int, float)):
            return [float(scale)] * self.levels
        scale = [float(s) for s in scale]
        if len(scale) != self.levels:
            raise ValueError(f"conditioning scale has {len(scale)} values; this UNet has {self.levels} levels "
                             f"(give one number or {self.levels})")
        return scale

    def skip_levels(self) -> list[int]:
        """The UNet level (0 = full latent resolution) of each skip connection, in encoder order."""
        f = self.base.downsample_factor
        return [int(math.log2(f // h)) for _, h, _ in self.base.skip_shapes(f, f)]

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None, *,
                control: torch.Tensor, scale: Scale = 1.0) -> torch.Tensor:
        raise NotImplementedError

    def bind(self, control: torch.Tensor, scale: Scale = 1.0) -> BoundControl:
        """This model with a fixed control: ``bound(x, t, y)``, the signature the samplers' guidance calls."""
        return BoundControl(self, control, scale)


class BoundControl:
    """A controlled UNet with its control fixed, called like a plain UNet (classifier-free guidance stacks
    the batch, [x; x]: the control is repeated to match)."""

    def __init__(self, model: ControlledUNet, control: torch.Tensor, scale: Scale):
        self.model, self.control, self.scale = model, control, scale
        self.null_label = model.null_label

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        control = self.control
        if control.shape[0] not in (1, x.shape[0]):
            control = control.repeat(x.shape[0] // control.shape[0], 1, 1, 1)
        return self.model(x, t, y, control=control, scale=self.scale)


class AddControlNet(ControlledUNet):
    """ControlNet (Zhang et al. 2023): a trainable encoder copy whose zero-convolved outputs are added to
    the frozen base UNet's skips and middle block."""

    fusion = "add"

    def __init__(self, base: UNet, control_channels: int, factor: int, hint_channels: int = 32,
                 train_base_decoder: bool = False):
        super().__init__(base, control_channels, factor)
        copy_ = copy.deepcopy(base)
        del copy_.up, copy_.norm_out, copy_.conv_out  # the copy runs encode() only
        self.control = copy_.requires_grad_(True)
        self.hint = HintEncoder(control_channels, base.skip_channels()[0], factor, hint_channels)
        self.zero_convs = nn.ModuleList(zero_module(nn.Conv2d(c, c, 1))
                                        for c in base.skip_channels() + [base.mid_channels])
        self.freeze_base(train_base_decoder)

    def forward(self, x, t, y=None, *, control, scale=1.0):
        self.check_control(control, x)
        scales = self.level_scales(scale)
        skips, h, _ = self.control.encode(x, t, y, hint=self.hint(control))  # hint (N, C0, h, w)
        levels = self.skip_levels() + [self.levels - 1]
        residuals = [conv(s) * scales[lv] for conv, s, lv in zip(self.zero_convs, skips + [h], levels)]
        return self.base(x, t, y, skip_residuals=residuals[:-1], mid_residual=residuals[-1])


class ConcatControl(ControlledUNet):
    """The control at latent resolution (space-to-depth) concatenated to the input of a fine-tuned UNet."""

    fusion = "concat"

    def __init__(self, base: UNet, control_channels: int, factor: int):
        super().__init__(base, control_channels, factor)
        old = base.conv_in
        extra = control_channels * factor**2  # pixel_unshuffle: (K, H, W) -> (K f^2, H/f, W/f)
        conv = nn.Conv2d(old.in_channels + extra, old.out_channels, 3, padding=1)
        with torch.no_grad():
            conv.weight.zero_()
            conv.weight[:, :old.in_channels].copy_(old.weight)
            conv.bias.copy_(old.bias)
        base.conv_in = conv
        base.requires_grad_(True)

    def level_scales(self, scale: Scale) -> list[float]:
        if not isinstance(scale, (int, float)) and len(set(map(float, scale))) > 1:
            raise ValueError("per-level conditioning scales apply to the add and film fusions; concat takes "
                             "one scale")
        return super().level_scales(scale)

    def forward(self, x, t, y=None, *, control, scale=1.0):
        self.check_control(control, x)
        s = self.level_scales(scale)[0]
        c = F.pixel_unshuffle(control.to(x.dtype), self.factor) * s  # (N, K f^2, h, w)
        if c.shape[0] != x.shape[0]:
            c = c.expand(x.shape[0], -1, -1, -1)
        return self.base(torch.cat([x, c], dim=1), t, y)


class FiLMControl(ControlledUNet):
    """Spatial FiLM of the frozen base UNet's encoder outputs and middle block from a control encoder."""

    fusion = "film"

    def __init__(self, base: UNet, control_channels: int, factor: int, hint_channels: int = 32,
                 train_base_decoder: bool = False):
        super().__init__(base, control_channels, factor)
        w = hint_channels
        # a feature pyramid of the control, one map per UNet level: (N, w, h / 2^level, w / 2^level)
        self.stem = HintEncoder(control_channels, w, factor, w, zero_out=False)
        self.down = nn.ModuleList(nn.Sequential(nn.SiLU(), nn.Conv2d(w, w, 3, stride=2, padding=1))
                                  for _ in range(self.levels - 1))
        # each output gives (gamma, beta) for one skip, the last for the middle block; zero: the identity
        self.film = nn.ModuleList(zero_module(nn.Conv2d(w, 2 * c, 1))
                                  for c in base.skip_channels() + [base.mid_channels])
        self.freeze_base(train_base_decoder)

    def forward(self, x, t, y=None, *, control, scale=1.0):
        self.check_control(control, x)
        scales = self.level_scales(scale)
        feats = [self.stem(control)]
        for down in self.down:
            feats.append(down(feats[-1]))
        skips, h, emb = self.base.encode(x, t, y)
        levels = self.skip_levels() + [self.levels - 1]
        residuals = []
        for conv, s, lv in zip(self.film, skips + [h], levels):
            gamma, beta = conv(feats[lv]).chunk(2, dim=1)  # (N, C, h_l, w_l) each
            residuals.append(scales[lv] * (s * gamma + beta))  # the decoder adds it: s (1 + gamma) + beta
        return self.base.decode(skips, h, emb, skip_residuals=residuals[:-1], mid_residual=residuals[-1])


def build_controlnet(cfg: ControlNetModelConfig, base: UNet, control_channels: int, factor: int) -> ControlledUNet:
    """A controlled UNet of the configured fusion around ``base`` (which it takes over: pass a copy to keep
    the original). ``factor`` is the autoencoder's downsampling, ``control_channels`` K."""
    base.checkpointing = cfg.checkpointing  # before the add fusion copies it
    if cfg.fusion == "add":
        return AddControlNet(base, control_channels, factor, cfg.hint_channels, cfg.train_base_decoder)
    if cfg.fusion == "concat":
        return ConcatControl(base, control_channels, factor)
    if cfg.fusion == "film":
        return FiLMControl(base, control_channels, factor, cfg.hint_channels, cfg.train_base_decoder)
    raise ValueError(f"unknown fusion {cfg.fusion!r}; allowed: {', '.join(FUSIONS)}")
