"""The convolutional autoencoder (plain or KL) with segmentation and classification heads, and its loss.

Image (N, I, H, W) in [-1, 1] (I = data.channels: 1 grayscale, 3 RGB, N stack channels) -> latent
(N, C, H/f, W/f) -> reconstruction (N, I, H, W), segmentation
logits (N, K, H, W) from a light segmentation decoder of its own, and class logits from the latent. The KL variant
is the VAE of latent diffusion (Rombach et al. 2022): the encoder outputs a diagonal Gaussian.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ldmflow.config.autoencoder import AutoencoderExperiment, AutoencoderLossConfig, AutoencoderModelConfig
from ldmflow.models.layers import NORMS, Downsample, ResnetBlock, Upsample, checkpointed, run_blocks


class Encoder(nn.Module):
    def __init__(self, cfg: AutoencoderModelConfig, out_channels: int, image_channels: int = 3):
        super().__init__()
        chans = [cfg.base_channels * m for m in cfg.channel_mult]
        norm = NORMS[cfg.norm]
        self.conv_in = nn.Conv2d(image_channels, chans[0], 3, padding=1)
        blocks: list[nn.Module] = []
        ch = chans[0]
        for level, width in enumerate(chans):
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock(ch, width, cfg.dropout, norm_layer=norm))
                ch = width
            if level < len(chans) - 1:
                blocks.append(Downsample(ch))
        self.blocks = nn.Sequential(*blocks)
        self.mid = ResnetBlock(ch, ch, cfg.dropout, norm_layer=norm)
        self.norm_out = norm(ch)
        self.conv_out = nn.Conv2d(ch, out_channels, 3, padding=1)
        self.checkpointing = cfg.checkpointing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = run_blocks(self.blocks, self.conv_in(x), self.checkpointing)
        h = checkpointed(self.mid, h, enabled=self.checkpointing)
        return self.conv_out(F.silu(self.norm_out(h)))


def up_path(cfg: AutoencoderModelConfig, ch: int, blocks_per_level: int) -> tuple[list[nn.Module], int]:
    """The upsampling half of a decoder: per level, deepest first, ResNet blocks to that level's width, then
    a 2x upsample (none after the last). Returns the modules and their output width."""
    chans = [cfg.base_channels * m for m in cfg.channel_mult]
    modules: list[nn.Module] = []
    norm = NORMS[cfg.norm]
    for level in reversed(range(len(chans))):
        for _ in range(blocks_per_level):
            modules.append(ResnetBlock(ch, chans[level], cfg.dropout, norm_layer=norm))
            ch = chans[level]
        if level > 0:
            modules.append(Upsample(ch))
    return modules, ch


class Decoder(nn.Module):
    """Latent (N, C, h, w) -> image (N, I, H, W): the mirror of the encoder."""

    def __init__(self, cfg: AutoencoderModelConfig, image_channels: int = 3):
        super().__init__()
        chans = [cfg.base_channels * m for m in cfg.channel_mult]
        ch = chans[-1]
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch, 3, padding=1)
        self.mid = ResnetBlock(ch, ch, cfg.dropout, norm_layer=NORMS[cfg.norm])
        blocks, ch = up_path(cfg, ch, cfg.num_res_blocks)
        self.blocks = nn.Sequential(*blocks)
        self.norm_out = NORMS[cfg.norm](ch)
        self.conv_out = nn.Conv2d(ch, image_channels, 3, padding=1)
        self.checkpointing = cfg.checkpointing

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = checkpointed(self.mid, self.conv_in(z), enabled=self.checkpointing)
        return self.conv_out(F.silu(self.norm_out(run_blocks(self.blocks, h, self.checkpointing))))


class SegmentationHead(nn.Module):
    """Latent (N, C, h, w) -> mask logits (N, K, H, W), a light decoder of its own (one ResNet block per
    level). Sharing the RGB decoder's features let the segmentation loss take the small decoder's capacity:
    on the demo, reconstructions stayed at ~13 dB PSNR with a shared decoder and reached ~19 dB without."""

    def __init__(self, cfg: AutoencoderModelConfig, mask_classes: int):
        super().__init__()
        chans = [cfg.base_channels * m for m in cfg.channel_mult]
        ch = chans[-1]
        first = nn.Conv2d(cfg.latent_channels, ch, 3, padding=1)
        layers, ch = up_path(cfg, ch, 1)
        self.blocks = nn.Sequential(first, *layers)
        self.norm_out = NORMS[cfg.norm](ch)
        self.conv_out = nn.Conv2d(ch, mask_classes, 3, padding=1)
        self.checkpointing = cfg.checkpointing

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.conv_out(F.silu(self.norm_out(run_blocks(self.blocks, z, self.checkpointing))))


class Autoencoder(nn.Module):
    """Plain or KL autoencoder with optional segmentation (decoder) and classification (latent) heads."""

    def __init__(self, cfg: AutoencoderModelConfig, mask_classes: int | None = None, num_classes: int | None = None,
                 image_channels: int = 3):
        super().__init__()
        self.cfg = cfg
        self.kl = cfg.variant == "kl"
        self.image_channels = image_channels
        self.encoder = Encoder(cfg, 2 * cfg.latent_channels if self.kl else cfg.latent_channels, image_channels)
        self.decoder = Decoder(cfg, image_channels)
        self.segmenter = SegmentationHead(cfg, mask_classes) if mask_classes else None
        self.classifier = (
            nn.Sequential(
                nn.Conv2d(cfg.latent_channels, 64, 3, padding=1),
                nn.SiLU(),
                nn.AdaptiveAvgPool2d(1),
                nn.Flatten(),
                nn.Linear(64, num_classes),
            )
            if num_classes
            else None
        )

    @property
    def downsample(self) -> int:
        return self.cfg.downsample

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(N, I, H, W) -> posterior mean (N, C, h, w) and log-variance (None for the plain variant)."""
        h = self.encoder(x)
        if not self.kl:
            return h, None
        mean, logvar = h.chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z: torch.Tensor, with_seg: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(N, C, h, w) -> image (N, I, H, W) in about [-1, 1], and segmentation logits when asked."""
        seg = self.segmenter(z) if (with_seg and self.segmenter is not None) else None
        return self.decoder(z), seg

    def forward(self, x: torch.Tensor, sample: bool = True) -> dict[str, torch.Tensor | None]:
        mean, logvar = self.encode(x)
        z = mean
        if logvar is not None and sample:
            z = mean + torch.randn_like(mean) * torch.exp(0.5 * logvar)
        recon, seg = self.decode(z, with_seg=True)
        logits = self.classifier(mean) if self.classifier is not None else None
        return {"recon": recon, "seg": seg, "logits": logits, "mean": mean, "logvar": logvar, "z": z}


def build_autoencoder(cfg: AutoencoderExperiment) -> Autoencoder:
    """An autoencoder for a resolved config (data.mask_classes, data.classes and data.channels filled from
    the data; a config without ``data.channels`` means RGB)."""
    heads = cfg.loss
    mask_classes = cfg.data.mask_classes if heads.segmentation.enabled else None
    num_classes = len(cfg.data.classes) if (heads.classification.enabled and cfg.data.classes) else None
    return Autoencoder(cfg.model, mask_classes, num_classes, cfg.data.channels or 3)


def dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Soft multi-class Dice loss, averaged over classes: logits (N, K, H, W), target (N, H, W)."""
    probs = logits.float().softmax(1)
    onehot = F.one_hot(target, logits.shape[1]).permute(0, 3, 1, 2).float()
    inter = (probs * onehot).sum((0, 2, 3))
    total = probs.sum((0, 2, 3)) + onehot.sum((0, 2, 3))
    return 1 - ((2 * inter + 1) / (total + 1)).mean()


class AutoencoderLoss(nn.Module):
    """Weighted sum of the enabled heads' losses; returns the total and each part (for the metrics)."""

    def __init__(self, cfg: AutoencoderLossConfig):
        super().__init__()
        self.cfg = cfg

    def head_scale(self, step: int | None) -> float:
        """The factor on the segmentation and classification weights at optimizer step ``step`` (the warm-up
        ramp); None (validation) is 1."""
        warmup = self.cfg.heads_warmup_steps
        return 1.0 if step is None or step >= warmup else step / warmup

    def forward(self, out: dict, batch: dict, step: int | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The total loss and its parts; ``step``: the optimizer step in training (ramps the heads' weights)."""
        cfg = self.cfg
        heads = self.head_scale(step)
        parts: dict[str, torch.Tensor] = {}
        recon, image = out["recon"].float(), batch["image"]
        if cfg.reconstruction.enabled:
            fn = F.l1_loss if cfg.reconstruction.kind == "l1" else F.mse_loss
            parts["rgb"] = fn(recon, image) * cfg.reconstruction.weight
        if out["seg"] is not None and "mask" in batch:
            seg = F.cross_entropy(out["seg"].float(), batch["mask"])
            if cfg.segmentation.dice > 0:
                seg = seg + cfg.segmentation.dice * dice_loss(out["seg"], batch["mask"])
            parts["seg"] = seg * (cfg.segmentation.weight * heads)
        if out["logits"] is not None and "label" in batch:
            parts["cls"] = F.cross_entropy(out["logits"].float(), batch["label"]) * (cfg.classification.weight * heads)
        if out["logvar"] is not None:
            mean, logvar = out["mean"].float(), out["logvar"].float()
            kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).sum((1, 2, 3)).mean()
            parts["kl"] = kl * cfg.kl_weight
        total = sum(parts.values()) if parts else recon.sum() * 0
        return total, parts


def build_loss(cfg: AutoencoderExperiment) -> AutoencoderLoss:
    """The research module's notebook helper: the multi-head autoencoder loss."""
    return AutoencoderLoss(cfg.loss)
