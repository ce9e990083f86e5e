"""Optimisation helpers: AdamW, the learning-rate schedule and the EMA of the weights."""

from __future__ import annotations

import copy
import logging
import math
from typing import Protocol

import torch
from torch import nn

from ldmflow.config.common import OptimConfig

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------
# Optimisation helpers
# --------------------------------------------------------------------------------------------------


class HasOptim(Protocol):
    """Any config with an ``optim`` section: an experiment from ``load_config``, or the loop's ``FitConfig``."""

    optim: OptimConfig


def build_optimizer(model: nn.Module, config: HasOptim) -> torch.optim.AdamW:
    """AdamW over the model's trainable parameters with the config's ``optim`` section, fused on CUDA (one
    kernel for all parameters).

    >>> from ldmflow import load_config, build_model, build_optimizer
    >>> cfg = load_config("config/diffusion/demo_unet_tiny.yaml")
    >>> build_optimizer(build_model(cfg, latent_channels=4, num_classes=3), cfg).param_groups[0]["lr"]
    0.001
    """
    cfg = config.optim
    params = [p for p in model.parameters() if p.requires_grad]
    fused = next(model.parameters()).device.type == "cuda"
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=tuple(cfg.betas), fused=fused)


def lr_factor(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Linear warm-up to 1, then constant or cosine decay to ``min_lr_ratio``."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class Ema:
    """Exponential moving average of a model's weights, with warm-up (decay grows with the step)."""

    def __init__(self, model: nn.Module, decay: float, warmup: int):
        self.decay, self.warmup = decay, warmup
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    def rate(self, step: int) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        d = self.rate(step)
        ema_p = [p for p in self.model.parameters()]
        src_p = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(ema_p, src_p, 1.0 - d)
        for eb, b in zip(self.model.buffers(), model.buffers()):
            eb.copy_(b)


def update_ema(ema: Ema | None, model: nn.Module, step: int) -> None:
    if ema is not None:
        ema.update(model, step)
