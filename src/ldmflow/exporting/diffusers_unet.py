"""Our UNet as diffusers' ``UNet2DModel``: the config, the weight names both ways, and the DDIM scheduler config.

The architectures agree block for block (``benchmarks/same_work.py`` builds the same twin): a scale-shift
ResNet block is ``ResnetBlock2D`` with ``resnet_time_scale_shift="scale_shift"``, a level with attention is
``AttnDownBlock2D`` / ``AttnUpBlock2D``, the middle block ``UNetMidBlock2D`` (with ``attn_norm_num_groups``
so that its attention keeps its GroupNorm), and the class embedding (``num_classes + 1`` rows, the last
the null label of classifier-free guidance) is ``num_class_embeds`` added to the timestep embedding. Three of
our choices have no exact diffusers equivalent; :func:`diffusers_mismatch` names the one a model makes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ldmflow.config.diffusion import DEFAULT_BETAS, NoiseConfig
from ldmflow.errors import ConfigError
from ldmflow.models.unet import UNet

# our schedule and prediction names -> diffusers' (DDPMScheduler / DDIMScheduler vocabulary)
BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}
PREDICTION_TYPES = {"epsilon": "epsilon", "v": "v_prediction"}


class UnsupportedArchitecture(ConfigError):
    """A UNet option with no exact diffusers equivalent; the message names the option."""


@dataclass(frozen=True)
class _Pair:
    """One of our modules and its diffusers name; ``kind`` says how the weights change on the way."""

    ours: str
    theirs: str
    kind: str = "same"  # "same", "qkv" (a 1x1 conv into to_q/to_k/to_v) or "linear" (a 1x1 conv into a Linear)


def _group_counts(model: UNet) -> set[int]:
    return {m.num_groups for m in model.modules() if isinstance(m, nn.GroupNorm)}


def diffusers_mismatch(model: UNet) -> str | None:
    """Why ``model`` has no exact ``UNet2DModel`` twin (naming the config option), or None when it has one."""
    cfg = model.cfg
    if cfg.channel_mult[0] != 1:
        return (f"model.channel_mult[0] is {cfg.channel_mult[0]}: ldmflow embeds timesteps at model.base_channels, "
                "diffusers' UNet2DModel at the first level's width; only channel_mult[0] = 1 maps exactly")
    groups = _group_counts(model)
    if len(groups) > 1:
        return (f"model.base_channels is {cfg.base_channels}: ldmflow's GroupNorms use {sorted(groups)} groups "
                "(at least 4 channels per group), diffusers' UNet2DModel one norm_num_groups; widths of 128 or "
                "more that are multiples of 32 map exactly")
    widths = [cfg.base_channels * cfg.channel_mult[lv] for lv in cfg.attention_levels] + [model.mid_channels]
    bad = sorted({w for w in widths if w % cfg.head_channels})
    if bad:
        return (f"model.head_channels is {cfg.head_channels}: attention widths {bad} are not multiples of it, "
                "which diffusers' heads (width // head_channels) need")
    return None


def require_exact(model: UNet) -> None:
    """Raise :class:`UnsupportedArchitecture` unless ``model`` maps exactly onto ``UNet2DModel``."""
    reason = diffusers_mismatch(model)
    if reason:
        raise UnsupportedArchitecture(f"no exact diffusers UNet2DModel for this UNet: {reason}")


def unet_config(model: UNet, sample_size: int) -> dict:
    """``UNet2DModel(**config)`` arguments of the same architecture as ``model`` (latents of side ``sample_size``)."""
    require_exact(model)
    cfg = model.cfg
    chans = [cfg.base_channels * m for m in cfg.channel_mult]
    attn, levels = set(cfg.attention_levels), range(len(chans))
    groups = _group_counts(model).pop()
    return {
        "sample_size": sample_size, "in_channels": model.in_channels, "out_channels": model.in_channels,
        "block_out_channels": chans, "layers_per_block": cfg.num_res_blocks,
        "down_block_types": ["AttnDownBlock2D" if lv in attn else "DownBlock2D" for lv in levels],
        "up_block_types": ["AttnUpBlock2D" if lv in attn else "UpBlock2D" for lv in reversed(levels)],
        "attention_head_dim": cfg.head_channels, "norm_num_groups": groups, "attn_norm_num_groups": groups,
        "norm_eps": 1e-6, "resnet_time_scale_shift": "scale_shift", "flip_sin_to_cos": True, "freq_shift": 0,
        "dropout": cfg.dropout, "class_embed_type": None,
        "num_class_embeds": model.num_classes + 1 if model.num_classes else None,
    }


def scheduler_config(noise: NoiseConfig) -> dict:
    """``DDIMScheduler(**config)`` arguments for our noise schedule, sampled as ``samplers.sample_ddim`` does
    (trailing timesteps, the last step to abar = 1, no clipping)."""
    start, end = DEFAULT_BETAS.get(noise.schedule, DEFAULT_BETAS["linear"])  # cosine ignores them
    return {
        "num_train_timesteps": noise.timesteps, "beta_schedule": BETA_SCHEDULES[noise.schedule],
        "beta_start": noise.beta_start if noise.beta_start is not None else start,
        "beta_end": noise.beta_end if noise.beta_end is not None else end,
        "prediction_type": PREDICTION_TYPES[noise.prediction], "timestep_spacing": "trailing",
        "clip_sample": False, "set_alpha_to_one": True, "steps_offset": 0,
    }


def _block_pairs(ours: str, theirs: str, j: int, block: nn.Module) -> list[_Pair]:
    """A ResNet block (and its attention) of ours -> ``{theirs}.resnets.j`` (and ``{theirs}.attentions.j``)."""
    res = f"{theirs}.resnets.{j}"
    pairs = [_Pair(f"{ours}.res.{a}", f"{res}.{b}") for a, b in
             (("norm1", "norm1"), ("conv1", "conv1"), ("emb", "time_emb_proj"), ("norm2", "norm2"),
              ("conv2", "conv2"))]
    if isinstance(block.res.skip, nn.Conv2d):
        pairs.append(_Pair(f"{ours}.res.skip", f"{res}.conv_shortcut"))
    if block.attn is not None:
        pairs += _attention_pairs(f"{ours}.attn", f"{theirs}.attentions.{j}")
    return pairs


def _attention_pairs(ours: str, theirs: str) -> list[_Pair]:
    return [_Pair(f"{ours}.norm", f"{theirs}.group_norm"), _Pair(f"{ours}.qkv", theirs, "qkv"),
            _Pair(f"{ours}.proj", f"{theirs}.to_out.0", "linear")]


def module_pairs(model: UNet) -> list[_Pair]:
    """Every weight-holding module of ours with its ``UNet2DModel`` name, in our order."""
    levels, blocks = len(model.cfg.channel_mult), model.cfg.num_res_blocks
    pairs = [_Pair("time_embed.0", "time_embedding.linear_1"), _Pair("time_embed.2", "time_embedding.linear_2"),
             _Pair("conv_in", "conv_in")]
    if model.label_embed is not None:
        pairs.append(_Pair("label_embed", "class_embedding"))
    i = 0
    for level in range(levels):
        for j in range(blocks):
            pairs += _block_pairs(f"down.{i}", f"down_blocks.{level}", j, model.down[i])
            i += 1
        if level < levels - 1:
            pairs.append(_Pair(f"down.{i}.conv", f"down_blocks.{level}.downsamplers.0.conv"))
            i += 1
    pairs += _block_pairs("mid.0", "mid_block", 0, model.mid[0])
    pairs += _attention_pairs("mid.1", "mid_block.attentions.0")
    pairs += _block_pairs("mid.2", "mid_block", 1, model.mid[2])
    i = 0
    for k, level in enumerate(reversed(range(levels))):
        for j in range(blocks + 1):
            pairs += _block_pairs(f"up.{i}", f"up_blocks.{k}", j, model.up[i])
            i += 1
        if level > 0:
            pairs.append(_Pair(f"up.{i}.conv", f"up_blocks.{k}.upsamplers.0.conv"))
            i += 1
    return pairs + [_Pair("norm_out", "conv_norm_out"), _Pair("conv_out", "conv_out")]


def to_diffusers(model: UNet) -> dict[str, torch.Tensor]:
    """Our UNet's weights under ``UNet2DModel``'s names (1x1 convolutions become Linear weights)."""
    require_exact(model)
    state = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for p in module_pairs(model):
        for leaf in ("weight", "bias"):
            value = state.pop(f"{p.ours}.{leaf}", None)
            if value is None:
                continue
            if p.kind == "same":
                out[f"{p.theirs}.{leaf}"] = value
                continue
            value = value.reshape(value.shape[0], -1) if leaf == "weight" else value  # (O, I, 1, 1) -> (O, I)
            parts = value.chunk(3) if p.kind == "qkv" else (value,)  # qkv: channels [q | k | v], heads inside each
            names = ("to_q", "to_k", "to_v") if p.kind == "qkv" else ("",)
            for name, part in zip(names, parts):
                out[f"{p.theirs}.{name}.{leaf}".replace("..", ".")] = part.contiguous()
    if state:
        raise AssertionError(f"UNet weights without a diffusers name: {sorted(state)}")
    return out


def from_diffusers(model: UNet, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`to_diffusers`: ``UNet2DModel`` weights as a state dict for ``model``."""
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    for p in module_pairs(model):
        for leaf in ("weight", "bias"):
            key = f"{p.ours}.{leaf}"
            if key not in shapes:
                continue
            if p.kind == "qkv":
                value = torch.cat([weights[f"{p.theirs}.{n}.{leaf}"] for n in ("to_q", "to_k", "to_v")])
            else:
                value = weights[f"{p.theirs}.{leaf}"]
            out[key] = value.reshape(shapes[key])
    return out
