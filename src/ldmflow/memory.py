"""How much GPU memory a training run needs: weights, gradients, optimizer state, EMA and saved activations.

:func:`estimate` builds the stage's real model from its experiment config and runs one training step's
forward pass (the stage's real loss, autograd recording) on fake tensors (``FakeTensorMode``: shapes and dtypes, no
data, no arithmetic, so a 256 px autoencoder costs seconds on a CPU). A ``saved_tensors_hooks`` pair
counts the bytes autograd keeps for the backward pass, once per storage and without the parameters
(counted apart). Two batch sizes (1 and 2) give the bytes per sample and the fixed part (bf16 copies of
the weights under autocast, say); the total at the configured batch is their line.

Precision: bf16 and fp16 run under CPU autocast with CUDA's cast policy for the ops these models use
(convolutions, linear layers and attention in 16 bits; GroupNorm upcast to fp32, so the GroupNorm input
and output that autograd keeps are fp32, as on a GPU). With ``model.checkpointing`` only the inputs of
each checkpointed block are kept; the largest block's activations, recomputed in the backward pass, are
added as the peak's transient.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import warnings
from collections.abc import Iterator
from typing import Literal

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from ldmflow.config.diffusion import DiffusionExperiment

Precision = Literal["fp32", "bf16", "fp16"]
GIB = 1024**3
# What a CUDA process holds beyond its tensors (the CUDA context, cuBLAS / cuDNN workspaces), and the
# allocator's slack over the tensors it hands out (fragmentation between differently sized batches).
CUDA_OVERHEAD_BYTES = 1 * GIB
ALLOCATOR_SLACK = 1.10
CARDS_GB = (16, 32, 80)


@dataclasses.dataclass
class MemoryEstimate:
    """A training run's GPU memory, in bytes, at micro-batch ``batch`` (``data.batch_size``)."""

    name: str
    stage: str
    precision: str
    batch: int
    accumulate: int
    checkpointing: bool
    parameters: int  # every parameter of the model, frozen ones too
    trainable: int
    weights: int  # fp32 weights
    grads_optimizer: int  # fp32 gradients and AdamW's two fp32 moments, of the trainable parameters
    ema: int  # the EMA copy of the whole model (0 without EMA)
    activations_per_sample: int
    activations_fixed: int  # independent of the batch: 16-bit weight copies under autocast, the recompute peak

    def activations(self, batch: int | None = None) -> int:
        return self.activations_fixed + self.activations_per_sample * (self.batch if batch is None else batch)

    def total(self, batch: int | None = None) -> int:
        """Tensors at the peak of a training step at ``batch`` (default: the configured micro-batch)."""
        return self.weights + self.grads_optimizer + self.ema + self.activations(batch)

    def needed_gb(self, batch: int | None = None) -> float:
        """What a card must have: the tensors, the allocator's slack and the CUDA context."""
        return (self.total(batch) * ALLOCATOR_SLACK + CUDA_OVERHEAD_BYTES) / 1e9

    def fits(self, card_gb: float, batch: int | None = None) -> bool:
        return self.needed_gb(batch) <= card_gb


# --------------------------------------------------------------------------------------------------
# Counting saved tensors
# --------------------------------------------------------------------------------------------------


class SavedTensors:
    """Bytes of the tensors autograd saves for the backward pass, once per storage, parameters excluded."""

    def __init__(self, exclude: set[int]):
        self.exclude = exclude
        self.storages: dict[int, tuple[int, torch.Tensor]] = {}  # the tensor is kept so the id stays unique
        self.recompute_peak = 0  # the largest checkpointed block's own saved bytes

    def add(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = storage._cdata
        if key not in self.exclude and key not in self.storages:
            self.storages[key] = (storage.nbytes(), t)

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        self.add(t)
        return t

    @property
    def nbytes(self) -> int:
        return sum(n for n, _ in self.storages.values()) + self.recompute_peak


@contextlib.contextmanager
def _counted_checkpoints(counter: SavedTensors) -> Iterator[None]:
    """Replace activation checkpointing by a plain call that counts what checkpointing keeps (the block's
    tensor inputs) and, apart, what the block saves (recomputed in the backward pass: a transient peak)."""
    original = torch.utils.checkpoint.checkpoint

    def counted(fn, *args, use_reentrant=None, **kwargs):
        for a in args:
            if torch.is_tensor(a):
                counter.add(a)
        inner = SavedTensors(counter.exclude | set(counter.storages))
        with torch.autograd.graph.saved_tensors_hooks(inner.pack, lambda t: t):
            out = fn(*args, **kwargs)
        counter.recompute_peak = max(counter.recompute_peak, inner.nbytes)
        return out

    torch.utils.checkpoint.checkpoint = counted
    try:
        yield
    finally:
        torch.utils.checkpoint.checkpoint = original


@contextlib.contextmanager
def _cuda_cast_policy(enabled: bool) -> Iterator[None]:
    """CUDA autocast runs GroupNorm in fp32 (CPU autocast runs it in 16 bits): do so here too."""
    original = F.group_norm

    def group_norm(x, num_groups, weight=None, bias=None, eps=1e-5):
        with torch.autocast("cpu", enabled=False):
            return original(x.float(), num_groups, None if weight is None else weight.float(),
                            None if bias is None else bias.float(), eps)

    if enabled:
        F.group_norm = group_norm
    try:
        yield
    finally:
        F.group_norm = original


def saved_bytes(build, batch: int, precision: Precision) -> tuple[nn.Module, int]:
    """The model ``build()`` returns with its training step, and the bytes autograd keeps from the step's
    forward pass for its backward pass at ``batch`` (``step(batch)`` returns the loss). The model is built on
    fake tensors too, so the parameters autograd saves are recognised as parameters."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    autocast = torch.autocast("cpu", dtype=dtype) if dtype else contextlib.nullcontext()
    with FakeTensorMode(allow_non_fake_inputs=True), warnings.catch_warnings():
        # deepcopy (a ControlNet's encoder copy) asks fake tensors for a data pointer: harmless here
        warnings.filterwarnings("ignore", message="Accessing the data pointer of FakeTensor")
        model, step = build()
        counter = SavedTensors({p.untyped_storage()._cdata for p in model.parameters()})
        with _counted_checkpoints(counter), _cuda_cast_policy(dtype is not None):
            with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t), autocast:
                step(batch)  # the backward pass would only read what the forward pass saved: not run
    return model, counter.nbytes


# --------------------------------------------------------------------------------------------------
# The stages' training steps
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class DataShape:
    """What the config leaves to the data, for a model built without it (the research preset's data)."""

    latent: tuple[int, int, int] = (4, 32, 32)  # (C, h, w): a KL f8 c4 autoencoder's latents of 256 px images
    classes: int = 2  # class labels (the conditioning embedding's rows; the classifier head)
    mask_classes: int = 2  # segmentation classes (the segmentation head; a ControlNet's one-hot control)
    downsample: int = 8  # the autoencoder's, for a ControlNet's control at image resolution


def _autoencoder_build(cfg, shape: DataShape):
    from ldmflow.api import build_loss, build_model

    cfg = copy.deepcopy(cfg)  # the data's sizes are filled in here, not in the caller's config
    cfg.data.mask_classes = cfg.data.mask_classes or shape.mask_classes
    cfg.data.classes = cfg.data.classes or [f"class{i}" for i in range(shape.classes)]
    side, channels = cfg.data.image_size, cfg.data.channels or 3

    def build():
        model, criterion = build_model(cfg).train(), build_loss(cfg)

        def step(b: int) -> torch.Tensor:
            batch = {"image": torch.randn(b, channels, side, side),
                     "mask": torch.randint(0, cfg.data.mask_classes, (b, side, side)),
                     "label": torch.randint(0, len(cfg.data.classes), (b,))}
            return criterion(model(batch["image"]), batch)[0]

        return model, step

    return build


def _diffusion_build(cfg, shape: DataShape, base_cfg: DiffusionExperiment | None = None):
    """A UNet's step, or a ControlNet's when ``base_cfg`` (its base UNet's experiment) is given."""
    from ldmflow.api import build_loss, build_model

    c, h, w = shape.latent
    f = shape.downsample

    def build():
        unet = build_model(base_cfg or cfg, latent_channels=c, num_classes=shape.classes)
        if base_cfg is None:
            model, loss, extra = unet.train(), build_loss(cfg), {}
        else:
            model = build_model(cfg, base=unet, control_channels=shape.mask_classes, downsample=f).train()
            loss, extra = build_loss(cfg, base=base_cfg), {"control": (shape.mask_classes, h * f, w * f)}

        def step(b: int) -> torch.Tensor:
            kwargs = {k: torch.randn(b, *size) for k, size in extra.items()}
            return loss(model, torch.randn(b, c, h, w), torch.randint(0, shape.classes, (b,)), **kwargs)

        return model, step

    return build


def estimate(cfg, precision: Precision, *, base_cfg: DiffusionExperiment | None = None,
             shape: DataShape | None = None) -> MemoryEstimate:
    """The GPU memory of training the experiment ``cfg`` (a loaded config of any stage) at its
    ``data.batch_size`` in ``precision``. A ControlNet needs its base UNet's experiment, ``base_cfg``."""
    from ldmflow.config.autoencoder import AutoencoderExperiment
    from ldmflow.config.controlnet import ControlNetExperiment
    from ldmflow.models.unet import count_parameters

    shape = shape or DataShape()
    if isinstance(cfg, AutoencoderExperiment):
        stage, build = "autoencoder", _autoencoder_build(cfg, shape)
    elif isinstance(cfg, ControlNetExperiment):
        if base_cfg is None:
            raise ValueError(f"{cfg.name}: a ControlNet's memory needs its base UNet's experiment (base_cfg)")
        stage, build = "controlnet", _diffusion_build(cfg, shape, base_cfg)
    else:
        stage, build = "diffusion", _diffusion_build(cfg, shape)
    model, one = saved_bytes(build, 1, precision)
    _, two = saved_bytes(build, 2, precision)
    n, trainable = count_parameters(model), count_parameters(model, trainable_only=True)
    return MemoryEstimate(
        name=cfg.name, stage=stage, precision=precision, batch=cfg.data.batch_size,
        accumulate=cfg.optim.accumulate, checkpointing=bool(cfg.model.checkpointing), parameters=n,
        trainable=trainable, weights=4 * n, grads_optimizer=3 * 4 * trainable,
        ema=4 * n if cfg.train.ema.decay > 0 else 0,
        activations_per_sample=two - one, activations_fixed=max(0, 2 * one - two))
