"""Same-work speed comparisons: each stage a user waits on, ldmflow against a baseline doing the same work.

Every comparison runs both sides in this process on the same device, data shapes and precision, and
returns one record (a dict, one JSON line of ``suite.py``): for each side its parameters, FLOPs per
timed step (``torch.utils.flop_counter.FlopCounterMode``, counted on the meta device), items/s and the
achieved TFLOP/s, and the ratio ours / baseline of each. "Same work" means:

- diffusion training: diffusers' ``UNet2DModel`` built as *the same architecture* as our UNet (same
  widths, levels, ResNet blocks, attention levels and heads, scale-shift timestep conditioning, class
  embedding): parameters within 0.1% and identical FLOPs per step. Two records: ``diffusion_train_step``
  (bare forward + backward + AdamW on both sides: no EMA, no clipping) and ``diffusion_train_loop``
  (ldmflow's whole ``training.fit`` against the diffusers step *plus* gradient clipping and diffusers'
  ``EMAModel``: EMA and clipping in both);
- autoencoder training: diffusers' ``AutoencoderKL`` (no mid-block attention, no quant convs) with its
  width chosen so that its FLOPs per step match ours (all heads: reconstruction, segmentation,
  classification, KL) within 10%; bare steps, no EMA or clipping on either side;
- embedding: ``stages.embed.embed_latents`` (manifest validation, PNG decoding, encoding, zarr store)
  against a plain loop over the same manifest with the same weights (loading the checkpoint, PIL
  decoding, ``encode``, arrays saved with ``np.savez``);
- sampling: ``samplers.sample_ddim`` against diffusers' ``DDIMScheduler`` in a pipeline-free loop, both
  driving the same UNet (same weights, trailing spacing, eta 0): the samples agree to float error, so the
  ratio is the samplers' overhead;
- memorization search: ``evaluation.search.blocked_search`` against one fp32 matrix product of the same
  shapes with both operands already on the device (the arithmetic alone).

The two sides are timed in alternating rounds after a warm-up, and the best round of each counts
(:func:`paired_seconds`); for the training loop, the baseline's rounds run between ``fit``'s epochs.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from ldmflow.config.diffusion import DEFAULT_BETAS
from ldmflow.config.loading import load_config
from ldmflow.diffusion.samplers import sample_ddim
from ldmflow.diffusion.schedules import NoiseSchedule, diffusion_loss
from ldmflow.models.autoencoder import build_autoencoder, build_loss
from ldmflow.models.unet import build_unet, count_parameters
from ldmflow.training.loop import FitConfig, autocast, fit
from ldmflow.training.optim import build_optimizer

REPO = Path(__file__).resolve().parents[1]
CLASSES = 10  # class-conditional UNets: 10 classes + the null label


@dataclasses.dataclass
class Mode:
    """How both sides run: precision, torch.compile, CUDA graphs (compile's reduce-overhead mode)."""

    name: str
    precision: str = "fp32"
    compile: bool = False
    cuda_graphs: bool = False

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        if not self.compile:
            return model
        return torch.compile(model, mode="reduce-overhead" if self.cuda_graphs else None)


MODES = {
    "eager_fp32": Mode("eager_fp32"),
    "eager_bf16": Mode("eager_bf16", "bf16"),
    "compile_bf16": Mode("compile_bf16", "bf16", compile=True),
    "cudagraphs_bf16": Mode("cudagraphs_bf16", "bf16", compile=True, cuda_graphs=True),
}


@dataclasses.dataclass
class Side:
    """One side of a comparison: what ran, its size, its work per timed step and its speed."""

    name: str
    params: int
    flop_per_step: float  # FLOPs of one timed step (a training step, a batch of samples, a whole search)
    items_per_step: int  # samples, images or query-training pairs per timed step
    seconds_per_step: float

    def as_dict(self) -> dict:
        return {"name": self.name, "params": self.params, "gflop_per_step": self.flop_per_step / 1e9,
                "items_per_s": self.items_per_step / self.seconds_per_step,
                "tflop_per_s": self.flop_per_step / self.seconds_per_step / 1e12}


def record(stage: str, mode: str, batch: int, unit: str, extras: str, ours: Side, base: Side, **extra) -> dict:
    """One comparison as a JSON-safe dict, with the ratio ours / baseline of every figure."""
    a, b = ours.as_dict(), base.as_dict()
    ratio = {k: (a[k] / b[k] if b[k] else None) for k in ("params", "gflop_per_step", "items_per_s", "tflop_per_s")}
    return {"stage": stage, "mode": mode, "batch": batch, "unit": unit, "extras": extras, "ours": a, "baseline": b,
            "ratio": ratio, "flop_mismatch": abs(ours.flop_per_step / base.flop_per_step - 1), **extra}


# -------------------------------------------------------------------------------------------------
# Timing and counting
# -------------------------------------------------------------------------------------------------

def pick_device(name: str | None = None) -> torch.device:
    """The named device, else CUDA when there is one, else the CPU."""
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def paired_seconds(fns: list[Callable[[], object]], device: torch.device, warmup: int, steps: int,
                   rounds: int = 3) -> list[float]:
    """Seconds per call of each function: ``warmup`` untimed calls each (compilation, allocator), then
    ``rounds`` rounds in which each runs ``steps`` timed calls in turn; the best round of each counts.
    Alternating the sides spreads a busy neighbour on a shared machine over both, and the best round is
    the one least disturbed."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    best = [math.inf] * len(fns)
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            sync(device)
            t0 = time.perf_counter()
            for _ in range(steps):
                fn()
            sync(device)
            best[i] = min(best[i], (time.perf_counter() - t0) / steps)
    return best


def count_flops(fn: Callable[[], object]) -> float:
    """FLOPs torch's FlopCounterMode sees in ``fn()`` (matmuls, convolutions, attention)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def training_flops(build: Callable[[], torch.nn.Module], loss: Callable[[torch.nn.Module], torch.Tensor]) -> float:
    """FLOPs of one forward + backward, counted on the meta device (no memory, no time)."""
    with torch.device("meta"):
        model = build()
        return count_flops(lambda: loss(model).backward())


# -------------------------------------------------------------------------------------------------
# Diffusion UNet: ours and its diffusers twin
# -------------------------------------------------------------------------------------------------

def diffusion_config(preset: str, batch: int, mode: Mode, epochs: int = 3):
    return load_config({"name": "bench", "model": {"preset": preset, "label_dropout": 0.0},
                        "data": {"batch_size": batch}, "optim": {"warmup_steps": 0, "grad_clip": 1.0},
                        "train": {"epochs": epochs, "precision": mode.precision, "compile": mode.compile,
                                  "cuda_graphs": mode.cuda_graphs, "log_every": 10_000,
                                  "ema": {"decay": 0.999, "warmup": 0}, "checkpoint_every_minutes": 0}},
                       "diffusion")


def diffusers_unet(model_cfg, channels: int, side: int):
    """diffusers' UNet2DModel built as the same architecture as ``UNet(model_cfg, channels, CLASSES)``."""
    from diffusers import UNet2DModel

    chans = tuple(model_cfg.base_channels * m for m in model_cfg.channel_mult)
    attn, levels = set(model_cfg.attention_levels), range(len(chans))
    return UNet2DModel(
        sample_size=side, in_channels=channels, out_channels=channels, block_out_channels=chans,
        down_block_types=tuple("AttnDownBlock2D" if lv in attn else "DownBlock2D" for lv in levels),
        up_block_types=tuple("AttnUpBlock2D" if lv in attn else "UpBlock2D" for lv in reversed(levels)),
        layers_per_block=model_cfg.num_res_blocks, attention_head_dim=model_cfg.head_channels, norm_eps=1e-6,
        resnet_time_scale_shift="scale_shift", num_class_embeds=CLASSES + 1, flip_sin_to_cos=True, freq_shift=0,
        dropout=model_cfg.dropout,
    )


class _DiffusersDenoiser(torch.nn.Module):
    """diffusers' UNet2DModel behind our call signature model(x, t, y) -> tensor."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, x, t, y=None):
        return self.unet(x, t, class_labels=y).sample


class SyntheticLatents(torch.utils.data.Dataset):
    """Latents and labels held in memory, served whole-batch like ``LatentDataset``."""

    def __init__(self, n: int, shape: tuple[int, int, int], seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn((n, *shape), generator=g)
        self.labels = torch.randint(0, CLASSES, (n,), generator=g)

    def __len__(self):
        return len(self.x)

    def __getitems__(self, idx):
        idx = torch.as_tensor(idx)
        return {"latent": self.x[idx], "label": self.labels[idx], "index": idx}


class _DiffusionTask:
    """The diffusion task's training step for ``fit``, without validation or sample grids.

    ``between_epochs`` runs in place of the validation pass, after each epoch and outside its timing:
    the baseline's timed rounds go there, so that both sides see the same load on a shared machine.
    """

    def __init__(self, model, schedule, between_epochs: Callable[[], None] | None = None):
        self.model, self.schedule, self.between_epochs = model, schedule, between_epochs

    def loss(self, model, batch, step):
        x0 = batch["latent"]
        t = torch.randint(0, self.schedule.timesteps, (x0.shape[0],), device=x0.device)
        noise = torch.randn_like(x0)
        out = model(self.schedule.add_noise(x0, noise, t), t, batch["label"])
        return diffusion_loss(out, x0, noise, t, self.schedule, "epsilon").mean(), {}

    def validate(self, model, loader):
        if self.between_epochs is not None:
            with torch.enable_grad():  # fit evaluates under no_grad
                self.between_epochs()
        return {"val_loss": 0.0}

    def write_samples(self, model, epoch, path):
        pass


def _train_step(model, opt, schedule, batches, device, mode, *, clip: float | None = None, ema=None):
    """A closure: one noise-prediction step (forward, backward, AdamW; optional clipping and EMA)."""
    step_model = mode.wrap(model)
    it = [0]

    def one():
        b = batches[it[0] % len(batches)]
        it[0] += 1
        x0, y = b["latent"], b["label"]
        t = torch.randint(0, schedule.timesteps, (x0.shape[0],), device=device)
        noise = torch.randn_like(x0)
        with autocast(device, mode.precision):
            out = step_model(schedule.add_noise(x0, noise, t), t, y)
            loss = (out.float() - noise).pow(2).mean()
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if ema is not None:
            ema.step(model.parameters())

    return one


def compare_diffusion_training(preset: str, side: int, batch: int, mode: Mode, device: torch.device, *,
                               warmup: int, steps: int, rounds: int = 3, channels: int = 4) -> list[dict]:
    """Two records: bare steps (no EMA, no clipping) and ldmflow's fit vs the diffusers step with both."""
    from diffusers.training_utils import EMAModel

    cfg = diffusion_config(preset, batch, mode, epochs=1 + rounds)
    shape = (channels, side, side)
    torch.manual_seed(0)
    ours = build_unet(cfg, channels, CLASSES).to(device)
    base = _DiffusersDenoiser(diffusers_unet(cfg.model, channels, side)).to(device)
    schedule = NoiseSchedule.from_config(cfg.diffusion).to(device)

    def flops(build):
        def loss(model):
            x = torch.randn((batch, *shape))
            out = model(x, torch.randint(0, 1000, (batch,)), torch.zeros(batch, dtype=torch.long))
            return out.float().pow(2).mean()
        return training_flops(build, loss)

    f_ours = flops(lambda: build_unet(cfg, channels, CLASSES))
    f_base = flops(lambda: _DiffusersDenoiser(diffusers_unet(cfg.model, channels, side)))
    data = SyntheticLatents(batch * steps, shape)
    batches = [{k: v.to(device) for k, v in data.__getitems__(list(range(i * batch, (i + 1) * batch))).items()}
               for i in range(min(steps, 4))]
    p_ours, p_base = count_parameters(ours), count_parameters(base)
    common = {"preset": preset, "latent": list(shape), "device": str(device)}

    def bare(model):
        model = copy.deepcopy(model).train()
        opt = build_optimizer(model, cfg)
        return _train_step(model, opt, schedule, batches, device, mode)

    t_ours, t_base = paired_seconds([bare(ours), bare(base)], device, warmup, steps, rounds)

    records = [record("diffusion_train_step", mode.name, batch, "samples/s", "none (bare step on both sides)",
                      Side("ldmflow UNet", p_ours, f_ours, batch, t_ours),
                      Side("diffusers UNet2DModel (same architecture)", p_base, f_base, batch, t_base),
                      **common)]

    # ldmflow's whole loop (data, AdamW, clipping, non-finite guard, EMA, metrics): 1 + rounds epochs of
    # `steps` steps, the first a warm-up, the best epoch counts; against the diffusers step with clipping
    # and diffusers' EMAModel, one round of `steps` steps after each epoch, the best round counts.
    model = copy.deepcopy(base).train()
    opt = build_optimizer(model, cfg)
    ema = EMAModel(model.parameters(), decay=cfg.train.ema.decay, use_ema_warmup=False)
    ema.to(device)
    base_step = _train_step(model, opt, schedule, batches, device, mode, clip=cfg.optim.grad_clip, ema=ema)
    paired_seconds([base_step], device, warmup, 1, 0)  # the warm-up alone
    base_rounds: list[float] = []

    def base_round():
        base_rounds.extend(paired_seconds([base_step], device, 0, steps, 1))

    # fit asks torch for deterministic kernels, process-wide: both sides of this record run so (the
    # baseline's rounds run inside fit), and the setting is put back for the cases that follow
    deterministic, benchmark = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark
    try:
        with tempfile.TemporaryDirectory() as tmp:
            task = _DiffusionTask(copy.deepcopy(ours), schedule, between_epochs=base_round)
            fc = FitConfig(stage="bench", seed=0, data=cfg.data, optim=cfg.optim, train=cfg.train, resolved={})
            result = fit(task, data, SyntheticLatents(batch, shape, seed=1), fc, tmp, "bench", device=device,
                         progress=False)
    finally:
        torch.use_deterministic_algorithms(deterministic)
        torch.backends.cudnn.benchmark = benchmark
    loop_rate = max(row["samples_per_s"] for row in result["history"][1:])
    t_base = min(base_rounds)
    records.append(record("diffusion_train_loop", mode.name, batch, "samples/s",
                          "EMA + gradient clipping on both sides (ldmflow: the whole training.fit loop); "
                          "both under fit's deterministic-kernels setting",
                          Side("ldmflow training.fit", p_ours, f_ours, batch, batch / loop_rate),
                          Side("diffusers UNet2DModel + clip_grad_norm_ + EMAModel", p_base, f_base, batch, t_base),
                          **common))
    return records


# -------------------------------------------------------------------------------------------------
# Sampling: our DDIM against diffusers' DDIMScheduler on the same UNet
# -------------------------------------------------------------------------------------------------

def compare_sampling(preset: str, side: int, batch: int, steps: int, mode: Mode, device: torch.device, *,
                     repeats: int, channels: int = 4) -> dict:
    """samples/s of ``sample_ddim`` and of a pipeline-free diffusers DDIMScheduler loop, same UNet and noise."""
    from diffusers import DDIMScheduler

    cfg = diffusion_config(preset, batch, mode)
    torch.manual_seed(0)
    model = build_unet(cfg, channels, CLASSES)
    # a trained-looking UNet: the fresh one predicts exactly 0 (zero-initialised outputs), which hides errors
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model = model.to(device).eval()
    net = mode.wrap(model)
    schedule = NoiseSchedule.from_config(cfg.diffusion).to(device)
    noise = cfg.diffusion
    start, end = DEFAULT_BETAS[noise.schedule]  # the benchmark's config leaves them null
    scheduler = DDIMScheduler(num_train_timesteps=noise.timesteps, beta_schedule=noise.schedule,
                              beta_start=start, beta_end=end, timestep_spacing="trailing",
                              clip_sample=False, set_alpha_to_one=True, prediction_type=noise.prediction)
    x_T = torch.randn((batch, channels, side, side), generator=torch.Generator().manual_seed(0)).to(device)
    y = torch.arange(batch, device=device) % CLASSES

    def denoise(x, t):
        with autocast(device, mode.precision):
            return net(x, t, y)

    def ours():
        return sample_ddim(denoise, x_T, schedule, steps)

    @torch.no_grad()
    def base():
        scheduler.set_timesteps(steps, device=device)
        x = x_T.float()
        for t in scheduler.timesteps:
            with autocast(device, mode.precision):
                out = net(x, t.expand(batch), y)
            x = scheduler.step(out.float(), t, x).prev_sample
        return x

    agree = float((ours() - base()).abs().max())  # also the warm-up
    with torch.device("meta"):
        meta = build_unet(cfg, channels, CLASSES)
        f_forward = count_flops(lambda: meta(torch.randn((batch, channels, side, side)),
                                             torch.zeros(batch, dtype=torch.long),
                                             torch.zeros(batch, dtype=torch.long)))
    params = count_parameters(model)
    t_ours, t_base = paired_seconds([ours, base], device, 0, 1, repeats)
    return record(f"sample_ddim{steps}", mode.name, batch, "samples/s", "none (same UNet, same weights)",
                  Side("ldmflow samplers.sample_ddim", params, steps * f_forward, batch, t_ours),
                  Side("diffusers DDIMScheduler loop", params, steps * f_forward, batch, t_base),
                  preset=preset, latent=[channels, side, side], device=str(device), max_abs_difference=agree)


# -------------------------------------------------------------------------------------------------
# Autoencoder: ours (all heads) against a FLOP-matched diffusers AutoencoderKL
# -------------------------------------------------------------------------------------------------

def autoencoder_config(image_size: int, base_channels: int, batch: int):
    """The demo autoencoder (KL, f4, 4 latent channels, all heads: the demo's 3 classes and 4 mask classes,
    which the experiment file leaves to the data) at this image size and width."""
    return load_config(REPO / "config/autoencoders/demo_kl_c4_f4.yaml",
                       overrides=[f"data.image_size={image_size}", f"model.base_channels={base_channels}",
                                  f"data.batch_size={batch}", "data.classes=[circle, square, triangle]",
                                  "data.mask_classes=4"])


def diffusers_autoencoder(model_cfg, width: int):
    """diffusers' AutoencoderKL with our levels and blocks at base width ``width`` (no attention, no quant convs)."""
    from diffusers import AutoencoderKL

    from ldmflow.models.layers import norm

    groups = norm(width).num_groups  # ours: at least 4 channels per group
    levels = len(model_cfg.channel_mult)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=model_cfg.latent_channels,
                         block_out_channels=tuple(width * m for m in model_cfg.channel_mult),
                         down_block_types=("DownEncoderBlock2D",) * levels,
                         up_block_types=("UpDecoderBlock2D",) * levels,
                         layers_per_block=model_cfg.num_res_blocks, norm_num_groups=groups,
                         mid_block_add_attention=False, use_quant_conv=False, use_post_quant_conv=False)


def _ae_batch(cfg, batch: int, device=None, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    size = cfg.data.image_size
    out = {"image": torch.rand((batch, 3, size, size), generator=g) * 2 - 1,
           "mask": torch.randint(0, cfg.data.mask_classes, (batch, size, size), generator=g),
           "label": torch.randint(0, len(cfg.data.classes), (batch,), generator=g)}
    return {k: v.to(device) for k, v in out.items()} if device is not None else out


class _DiffusersVAEStep(torch.nn.Module):
    """AutoencoderKL's training forward in one ``forward`` (so that torch.compile sees all of it):
    image (N, 3, H, W) -> reconstruction from a posterior sample (N, 3, H, W), KL per image (N,)."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, image):
        posterior = self.vae.encode(image).latent_dist
        return self.vae.decode(posterior.sample()).sample, posterior.kl()


def _diffusers_ae_loss(model: _DiffusersVAEStep, batch: dict, kl_weight: float) -> torch.Tensor:
    recon, kl = model(batch["image"])
    return (recon.float() - batch["image"]).abs().mean() + kl_weight * kl.float().mean()


def compare_autoencoder_training(image_size: int, base_channels: int, batch: int, mode: Mode,
                                 device: torch.device, *, warmup: int, steps: int, rounds: int = 3) -> dict:
    """Bare training steps (forward, loss, backward, AdamW) of our autoencoder and a FLOP-matched AutoencoderKL."""
    cfg = autoencoder_config(image_size, base_channels, batch)
    loss_fn = build_loss(cfg)
    meta_batch = {k: v.to("meta") for k, v in _ae_batch(cfg, batch).items()}
    f_ours = training_flops(lambda: build_autoencoder(cfg), lambda m: loss_fn(m(meta_batch["image"]), meta_batch)[0])
    kl_weight = cfg.loss.kl_weight
    # diffusers' decoder has one more ResNet block per level and two in the middle: find the width whose
    # FLOPs per step are closest to ours
    # (FLOPs grow with the width: walk up until they pass ours)
    f_of: dict[int, float] = {}
    for w in range(4, 4 * base_channels + 1, max(1, base_channels // 16)):
        f_of[w] = training_flops(lambda w=w: _DiffusersVAEStep(diffusers_autoencoder(cfg.model, w)),
                                 lambda m: _diffusers_ae_loss(m, meta_batch, kl_weight))
        if f_of[w] > f_ours:
            break
    width = min(f_of, key=lambda w: abs(math.log(f_of[w] / f_ours)))
    torch.manual_seed(0)
    ours = build_autoencoder(cfg).to(device).train()
    base = _DiffusersVAEStep(diffusers_autoencoder(cfg.model, width)).to(device).train()
    batches = [_ae_batch(cfg, batch, device, seed=i) for i in range(2)]

    def closure(model, loss):
        opt = build_optimizer(model, cfg)
        step_model = mode.wrap(model)
        it = [0]

        def one():
            b = batches[it[0] % len(batches)]
            it[0] += 1
            with autocast(device, mode.precision):
                value = loss(step_model, b)
            value.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return one

    t_ours, t_base = paired_seconds([closure(ours, lambda m, b: loss_fn(m(b["image"]), b)[0]),
                                     closure(base, lambda m, b: _diffusers_ae_loss(m, b, kl_weight))],
                                    device, warmup, steps, rounds)
    return record("autoencoder_train_step", mode.name, batch, "images/s", "none (bare step on both sides)",
                  Side(f"ldmflow Autoencoder (kl, base {base_channels}, all heads)", count_parameters(ours), f_ours,
                       batch, t_ours),
                  Side(f"diffusers AutoencoderKL (base {width}, FLOP-matched)", count_parameters(base), f_of[width],
                       batch, t_base),
                  image_size=image_size, device=str(device))


# -------------------------------------------------------------------------------------------------
# Embedding: embed_latents against a plain loop with the same weights
# -------------------------------------------------------------------------------------------------

def write_autoencoder_checkpoint(cfg, path: Path) -> Path:
    """A checkpoint of a freshly initialised autoencoder that ``embed_latents`` loads like a trained one."""
    from ldmflow.artifacts import CHECKPOINT_FORMAT, save_checkpoint
    from ldmflow.config.schema import to_dict

    torch.manual_seed(0)
    model = build_autoencoder(cfg)
    save_checkpoint({"format": CHECKPOINT_FORMAT, "stage": "autoencoder", "name": cfg.name, "config": to_dict(cfg),
                     "model": model.state_dict(), "ema": None, "extra": {}}, path)
    return path


def plain_embed(model, manifest: Path, out: Path, batch_size: int, device: torch.device) -> int:
    """The loop a user would write once the model is loaded: decode each PNG with PIL, encode a batch, keep
    arrays, ``np.savez`` them."""
    import pandas as pd
    from PIL import Image

    rows = pd.read_csv(manifest)
    root = manifest.parent
    means, logvars, masks = [], [], []
    with torch.inference_mode():
        for i in range(0, len(rows), batch_size):
            part = rows.iloc[i:i + batch_size]
            images = np.stack([np.asarray(Image.open(root / p).convert("RGB")) for p in part["image"]])
            masks.append(np.stack([np.asarray(Image.open(root / p)) for p in part["mask"]]).astype(np.uint8))
            x = torch.from_numpy(images).to(device).permute(0, 3, 1, 2).float() / 127.5 - 1  # (B, 3, H, W)
            mean, logvar = model.encode(x)
            means.append(mean.cpu().numpy().astype(np.float16))
            logvars.append(logvar.cpu().numpy().astype(np.float16))
    np.savez(out, latents=np.concatenate(means), logvar=np.concatenate(logvars), masks=np.concatenate(masks),
             labels=rows["label"].astype("category").cat.codes.to_numpy())
    return len(rows)


def compare_embedding(image_size: int, base_channels: int, n: int, batch: int, device: torch.device, *,
                      repeats: int, workdir: Path) -> dict:
    """images/s of ``embed_latents`` and of a plain PIL + encode + np.savez loop over the same manifest."""
    from ldmflow.checkpoints import load_autoencoder
    from ldmflow.data.demo import write_demo_data
    from ldmflow.stages.embed import embed_latents

    manifest = write_demo_data(workdir / "embed_data", n=n, size=image_size, seed=1)
    cfg = autoencoder_config(image_size, base_channels, batch)
    checkpoint = write_autoencoder_checkpoint(cfg, workdir / "ae.pt")
    model = load_autoencoder(checkpoint, device).model
    runs = iter(range(10**6))

    def ours():
        embed_latents(checkpoint, manifest, workdir / f"ours_{next(runs)}.zarr", batch_size=batch, device=str(device))

    def base():
        # from the checkpoint file, as embed_latents starts: loading the encoder is work both sides do
        plain_embed(load_autoencoder(checkpoint, device).model, manifest, workdir / f"plain_{next(runs)}.npz", batch,
                    device)

    with torch.device("meta"):
        meta = build_autoencoder(cfg)
        f_image = count_flops(lambda: meta.encode(torch.randn((1, 3, image_size, image_size))))
    params = count_parameters(model.encoder)
    t_ours, t_base = paired_seconds([ours, base], device, 1, 1, repeats)
    return record("embed", "eager_fp32", batch, "images/s", "none (same encoder weights, same PNGs)",
                  Side("ldmflow stages.embed.embed_latents (zarr store)", params, n * f_image, n, t_ours),
                  Side("plain loop: load + PIL + encode + np.savez", params, n * f_image, n, t_base),
                  images=n, image_size=image_size, device=str(device))


# -------------------------------------------------------------------------------------------------
# Latent store reads: random training batches from the store against a numpy gather in memory
# -------------------------------------------------------------------------------------------------

ANCHOR_SAMPLES_PER_S = 3400.0  # diffusers' 74M UNet at 32x32x4 on an H100 with compile and CUDA graphs


def write_synthetic_store(path: Path, n: int, size: int, channels: int, seed: int = 0) -> Path:
    """A valid latent store of ``n`` random float16 latents (channels, size, size), laid out as
    ``embed_latents`` lays them out (uncompressed chunks along N), written chunk by chunk in bounded memory."""
    import zarr

    from ldmflow.data.latent_store import COMPRESSOR, RAW_CHUNK_BYTES, chunk_rows
    from ldmflow.metadata import AutoencoderRef, StoreAttrs

    group = zarr.open_group(path, mode="w", zarr_format=3)
    shape = (n, channels, size, size)
    rows = chunk_rows(channels * size * size * 2, n, RAW_CHUNK_BYTES)
    latents = group.create_array("latents", shape=shape, chunks=(rows, *shape[1:]), dtype="float16", compressors=None)
    rng = np.random.default_rng(seed)
    for i in range(0, n, rows):
        latents[i:i + rows] = rng.standard_normal((min(rows, n - i), *shape[1:]), np.float32).astype(np.float16)
    step = chunk_rows(256, n)
    for name, kind, values in (("labels", "int64", lambda a, b: np.full(b - a, -1)),
                               ("split", str, lambda a, b: np.full(b - a, "train")),
                               ("paths", str, lambda a, b: np.array([f"image_{j}.png" for j in range(a, b)]))):
        target = group.create_array(name, shape=(n,), chunks=(step,), dtype=kind,
                                    compressors=COMPRESSOR if kind == "int64" else "auto")
        for i in range(0, n, step):
            target[i:i + step] = values(i, min(i + step, n)).astype(kind)
    attrs = StoreAttrs(n=n, scale_factor=1.0, variant="plain", image_size=size * 4, downsample=4,
                       latent_channels=channels, classes=None, mask_classes=None,
                       autoencoder=AutoencoderRef(checkpoint="synthetic", sha256="0" * 64))
    group.update_attributes(attrs.to_dict())
    return path


def compare_store_reads(n: int, size: int, channels: int, batch: int, *, workdir: Path, max_gb: float = 0.0,
                        batches: int = 200, rounds: int = 3, baseline_max_gb: float = 2.0) -> dict:
    """samples/s of random training batches from a latent store of ``n`` latents (channels, size, size), as
    ``LatentDataset`` serves them to diffusion training, against a numpy gather of the same rows from an
    in-memory array (float16 -> float32 scaled, the same output); ``max_gb`` as LatentDataset's: 0 reads
    every batch from the store's files (streamed), a larger value holds a split that fits in memory. The
    baseline's array holds min(n, what fits in ``baseline_max_gb``) rows. Also the ratio to the anchor,
    ANCHOR_SAMPLES_PER_S, what one H100 consumes."""
    from ldmflow.data.latent_store import LatentDataset

    store = write_synthetic_store(workdir / f"store_{n}_{channels}x{size}x{size}.zarr", n, size, channels)
    dataset = LatentDataset(store, "train", max_gb=max_gb)
    row_bytes = channels * size * size * 2
    held = max(batch, min(n, int(baseline_max_gb * 2**30 // row_bytes)))
    memory = np.random.default_rng(1).standard_normal((held, channels, size, size), np.float32).astype(np.float16)
    order, base_order = np.random.default_rng(2).permutation(n), np.random.default_rng(3).permutation(held)
    at = [0, 0]

    def take(perm: np.ndarray, k: int) -> np.ndarray:
        i = at[k] % (len(perm) // batch) * batch
        at[k] += 1
        return perm[i:i + batch]

    def ours():
        return dataset.__getitems__(take(order, 0).tolist())["latent"]

    def base():
        return torch.from_numpy(memory[take(base_order, 1)]).float().mul_(1.0)

    cpu = torch.device("cpu")
    t_ours, t_base = paired_seconds([ours, base], cpu, 5, batches, rounds)
    a = Side("ldmflow LatentDataset (" + ("in memory" if dataset.in_memory else "streamed from chunk files") + ")",
             0, 0.0, batch, t_ours).as_dict()
    b = Side("numpy gather from an in-memory array", 0, 0.0, batch, t_base).as_dict()
    return {"stage": "store_reads", "mode": "in_memory" if dataset.in_memory else "streamed", "batch": batch,
            "unit": "samples/s", "extras": "none (same rows, same float32 output)", "ours": a, "baseline": b,
            "ratio": {k: (a[k] / b[k] if b[k] else None) for k in ("params", "gflop_per_step", "items_per_s",
                                                                      "tflop_per_s")},
            "flop_mismatch": 0.0, "anchor_samples_per_s": ANCHOR_SAMPLES_PER_S,
            "ratio_to_anchor": a["items_per_s"] / ANCHOR_SAMPLES_PER_S, "latents": n, "latent": [channels, size, size],
            "store_gb": n * row_bytes / 2**30, "baseline_rows": held, "device": "cpu"}


# -------------------------------------------------------------------------------------------------
# Memorization search: blocked search against one bare matrix product
# -------------------------------------------------------------------------------------------------

def compare_search(queries: int, train: int, size: int, tiles: int, device: torch.device, *, repeats: int,
                   memory_gb: float = 1.0) -> dict:
    """query-training pairs/s of ``blocked_search`` and of one fp32 matrix product of the same shapes."""
    from ldmflow.evaluation.search import blocked_search

    t = tiles * tiles
    dim = 3 * size * size
    d = dim // t
    rng = np.random.default_rng(0)
    # unit-norm rows, tile-major (N, T, d), fp16 in host memory as the evaluation holds them
    q = (rng.standard_normal((queries, t, d), np.float32) / np.sqrt(dim)).astype(np.float16)
    x = (rng.standard_normal((train, t, d), np.float32) / np.sqrt(dim)).astype(np.float16)
    flop = 2.0 * queries * train * t * d
    pairs = queries * train
    a = torch.from_numpy(q.reshape(queries, -1)).to(device).float()
    b = torch.from_numpy(x.reshape(train, -1)).to(device).float()
    t_ours, t_base = paired_seconds([lambda: blocked_search(q, x, k=5, n=50, memory_gb=memory_gb, device=device),
                                     lambda: a @ b.T], device, 1, 1, repeats)
    return record("memorization_search", "eager_fp32", queries, "pairs/s", "none (features already in memory)",
                  Side("ldmflow evaluation.search.blocked_search (top-5 cosine + top-50 tiled L2)", 0, flop, pairs,
                       t_ours),
                  Side("one fp32 matrix product, operands on the device", 0, flop, pairs, t_base),
                  queries=queries, train=train, dim=t * d, tiles=t, device=str(device))
