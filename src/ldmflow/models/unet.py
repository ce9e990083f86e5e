"""The denoising UNet of latent diffusion, with class conditioning and the hooks a ControlNet needs.

Noisy latent (N, C, h, w), timestep (N,) and optional class id (N,) -> model output (N, C, h, w): the noise
or v, as the training task chooses (the network does not know which). The architecture is the ADM / latent
diffusion UNet (Dhariwal & Nichol 2021; Rombach et al. 2022): ``len(channel_mult)`` levels of
``num_res_blocks`` ResNet blocks, self-attention at ``attention_levels``, a res-attn-res middle block, and a
decoder with ``num_res_blocks + 1`` blocks per level, each taking one skip connection from the encoder.
The timestep enters every ResNet block as a scale and shift (sinusoidal embedding, then an MLP); a class
embedding with ``num_classes + 1`` rows is added to it, the last row being the "null" label of
classifier-free guidance. Which labels are dropped is the training task's choice: the model embeds the
ids it is given.

ControlNet hooks (Zhang et al. 2023). :meth:`UNet.encode` runs the encoder and middle block and returns
``(skips, h, emb)``; :meth:`UNet.decode` finishes the pass. A ControlNet is a trainable copy of the encoder
half: it calls ``copy.encode(x, t, y, hint=...)`` and maps each of its skips and its middle output through
a zero-initialised 1x1 convolution (channels from :meth:`UNet.skip_channels` and
``UNet.mid_channels``) to residuals for the frozen UNet's ``forward(..., skip_residuals=, mid_residual=)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ldmflow.config.diffusion import DiffusionExperiment, UNetConfig
from ldmflow.models.layers import (
    AttentionBlock,
    Downsample,
    ResnetBlock,
    Upsample,
    checkpointed,
    norm,
    timestep_embedding,
    zero_module,
)


class _Block(nn.Module):
    """A ResNet block, followed by self-attention on levels that have it."""

    def __init__(self, in_ch: int, out_ch: int, emb_ch: int, dropout: float, attention: bool, head_channels: int):
        super().__init__()
        self.res = ResnetBlock(in_ch, out_ch, dropout, emb_ch)
        # ADM: every residual branch starts at zero, so a fresh UNet is a stack of identities.
        zero_module(self.res.conv2)
        self.attn = AttentionBlock(out_ch, head_channels) if attention else None
        if self.attn is not None:
            zero_module(self.attn.proj)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.res(x, emb)
        return self.attn(h) if self.attn is not None else h


class UNet(nn.Module):
    """Timestep- and (optionally) class-conditional UNet predicting a tensor of its input's shape.

    ``num_classes`` is the number of real classes; it is ignored when ``cfg.class_conditional`` is false.
    A conditional UNet has ``num_classes + 1`` label embeddings; id ``num_classes`` (``self.null_label``)
    is the unconditional "null" label, also used when ``y`` is None.
    """

    def __init__(self, cfg: UNetConfig, in_channels: int, num_classes: int | None = None):
        super().__init__()
        if in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {in_channels}")
        if num_classes is not None and num_classes < 1:
            raise ValueError(f"num_classes must be >= 1 or None, got {num_classes}")
        self.cfg = cfg
        self.checkpointing = cfg.checkpointing  # a ControlNet sets it for its base UNet and the copy
        self.in_channels = in_channels
        self.num_classes = num_classes if cfg.class_conditional else None
        chans = [cfg.base_channels * m for m in cfg.channel_mult]
        emb_ch = 4 * cfg.base_channels  # ADM's timestep-embedding width
        attn = set(cfg.attention_levels)

        def block(i: int, o: int, level: int) -> _Block:
            return _Block(i, o, emb_ch, cfg.dropout, level in attn, cfg.head_channels)

        self.time_embed = nn.Sequential(nn.Linear(cfg.base_channels, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch))
        self.label_embed = nn.Embedding(self.num_classes + 1, emb_ch) if self.num_classes else None

        # Encoder. Every entry of self.down pushes one skip; remember each skip's channels and level.
        self.conv_in = nn.Conv2d(in_channels, chans[0], 3, padding=1)
        self.down = nn.ModuleList()
        skips: list[tuple[int, int]] = [(chans[0], 0)]  # (channels, level)
        ch = chans[0]
        for level, width in enumerate(chans):
            for _ in range(cfg.num_res_blocks):
                self.down.append(block(ch, width, level))
                ch = width
                skips.append((ch, level))
            if level < len(chans) - 1:
                self.down.append(Downsample(ch))
                skips.append((ch, level + 1))
        self._skips = skips

        self.mid = nn.ModuleList([block(ch, ch, -1), AttentionBlock(ch, cfg.head_channels), block(ch, ch, -1)])
        zero_module(self.mid[1].proj)

        # Decoder: num_res_blocks + 1 blocks per level, each concatenating the most recent unused skip.
        self.up = nn.ModuleList()
        pending = list(skips)
        for level in reversed(range(len(chans))):
            for i in range(cfg.num_res_blocks + 1):
                skip_ch, _ = pending.pop()
                self.up.append(block(ch + skip_ch, chans[level], level))
                ch = chans[level]
                if level > 0 and i == cfg.num_res_blocks:
                    self.up.append(Upsample(ch))
        assert not pending

        self.norm_out = norm(ch)
        self.conv_out = zero_module(nn.Conv2d(ch, in_channels, 3, padding=1))  # a fresh UNet predicts 0

    # ---------------------------------------------------------------------------------------------
    # Shapes a ControlNet needs
    # ---------------------------------------------------------------------------------------------

    @property
    def null_label(self) -> int | None:
        """The class id of the unconditional "null" label (None for an unconditional UNet)."""
        return self.num_classes

    @property
    def downsample_factor(self) -> int:
        """Total downsampling of the encoder; latent sides must be multiples of it."""
        return 2 ** (len(self.cfg.channel_mult) - 1)

    @property
    def mid_channels(self) -> int:
        """Channels of the middle block's output, i.e. of ``mid_residual``."""
        return self.cfg.base_channels * self.cfg.channel_mult[-1]

    def skip_channels(self) -> list[int]:
        """Channels of each skip connection, in the order :meth:`encode` returns them (encoder order)."""
        return [c for c, _ in self._skips]

    def skip_shapes(self, height: int, width: int) -> list[tuple[int, int, int]]:
        """(channels, height, width) of each skip for an (N, C, height, width) input, in encoder order."""
        self._check_size(height, width)
        return [(c, height >> level, width >> level) for c, level in self._skips]

    def _check_size(self, height: int, width: int) -> None:
        f = self.downsample_factor
        if height % f or width % f:
            raise ValueError(f"UNet input of size {height}x{width}: with {len(self.cfg.channel_mult)} levels "
                             f"both sides must be multiples of {f}")

    # ---------------------------------------------------------------------------------------------
    # Forward pass, split into an encoder and a decoder half
    # ---------------------------------------------------------------------------------------------

    def embed(self, t: torch.Tensor, y: torch.Tensor | None, batch: int) -> torch.Tensor:
        """Timestep (N,) or scalar, and class ids (N,) or None -> conditioning embedding (N, 4 * base)."""
        t = torch.as_tensor(t, device=self.conv_in.weight.device)
        if t.ndim == 0:
            t = t.expand(batch)
        dtype = self.time_embed[0].weight.dtype  # float32 unless the weights were cast (autocast casts later)
        emb = self.time_embed(timestep_embedding(t, self.cfg.base_channels).to(dtype))  # (N, E)
        if self.label_embed is not None:
            if y is None:
                y = torch.full((batch,), self.num_classes, dtype=torch.long, device=emb.device)
            emb = emb + self.label_embed(y)
        elif y is not None:
            raise ValueError("class labels were given to an unconditional UNet (num_classes None or "
                             "model.class_conditional false)")
        return emb

    def encode(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None, *, hint: torch.Tensor | None = None,
    ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """Encoder and middle block: x (N, C, h, w) -> (skips, middle output, embedding).

        ``skips`` is the list of skip tensors in encoder order (highest resolution first; shapes from
        :meth:`skip_shapes`), ``h`` the middle block's output (N, mid_channels, h/f, w/f), ``emb`` the
        conditioning embedding (N, 4 * base_channels). ``hint`` (N, skip_channels()[0], h, w), when given,
        is added to the input convolution's output before anything else: a ControlNet's condition enters
        its encoder copy there.
        """
        self._check_size(x.shape[-2], x.shape[-1])
        emb = self.embed(t, y, x.shape[0])
        h = self.conv_in(x)  # (N, C0, h, w)
        if hint is not None:
            h = h + hint
        skips = [h]
        on = self.checkpointing
        for layer in self.down:
            h = checkpointed(layer, h, emb, enabled=on) if isinstance(layer, _Block) else layer(h)
            skips.append(h)
        h = checkpointed(self.mid[0], h, emb, enabled=on)
        h = checkpointed(self.mid[1], h, enabled=on)
        h = checkpointed(self.mid[2], h, emb, enabled=on)  # (N, mid_channels, h/f, w/f)
        return skips, h, emb

    def decode(
        self,
        skips: list[torch.Tensor],
        h: torch.Tensor,
        emb: torch.Tensor,
        *,
        skip_residuals: list[torch.Tensor] | None = None,
        mid_residual: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Decoder: the outputs of :meth:`encode` (plus optional ControlNet residuals) -> (N, C, h, w)."""
        if mid_residual is not None:
            h = h + mid_residual
        if skip_residuals is not None:
            if len(skip_residuals) != len(skips):
                raise ValueError(f"skip_residuals has {len(skip_residuals)} tensors; the UNet has {len(skips)} "
                                 f"skips (see UNet.skip_shapes)")
            skips = [s + r for s, r in zip(skips, skip_residuals)]
        else:
            skips = list(skips)
        for layer in self.up:
            if isinstance(layer, _Block):
                h = checkpointed(layer, torch.cat([h, skips.pop()], dim=1), emb,  # (N, C_h + C_skip, ...) in
                                 enabled=self.checkpointing)
            else:
                h = layer(h)
        return self.conv_out(F.silu(self.norm_out(h)))

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor | None = None,
        *,
        skip_residuals: list[torch.Tensor] | None = None,
        mid_residual: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (N, C, h, w), timesteps t (N,) int or float, class ids y (N,) long or None -> (N, C, h, w).

        ``skip_residuals``: one tensor per skip connection, in encoder order with the shapes of
        :meth:`skip_shapes`, each added to its skip before the decoder concatenates it. ``mid_residual``
        (N, mid_channels, h/f, w/f) is added to the middle block's output. Both are the ControlNet hooks;
        zeros leave the output unchanged.
        """
        skips, h, emb = self.encode(x, t, y)
        return self.decode(skips, h, emb, skip_residuals=skip_residuals, mid_residual=mid_residual)


def build_unet(cfg: DiffusionExperiment, latent_channels: int, num_classes: int | None = None) -> UNet:
    """The UNet of a resolved diffusion experiment for latents with ``latent_channels`` channels.

    ``num_classes`` is the number of real classes in the data (None when it has no labels); the UNet is
    class-conditional only when it is given and ``model.class_conditional`` is true.
    """
    return UNet(cfg.model, latent_channels, num_classes)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (optionally only those that require gradients)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
