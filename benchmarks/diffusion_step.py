"""Diffusion training speed: our full training loop against a bare step, and against diffusers.

For a named UNet preset and batch size it prints, on the current device:
- samples/s of ldmflow's full training loop (``training.fit``: data from a real latent store, AdamW,
  clipping, non-finite guard, EMA, metrics) and of a bare forward + backward + optimizer step of the same
  model, and their ratio (the loop's overhead; target <= 1.10);
- model FLOPs per training step (forward + backward, counted by torch's FlopCounterMode) and, on CUDA,
  model FLOPs utilisation against the GPU's bf16 dense peak;
- with ``--diffusers``, the same figures for diffusers' ``UNet2DModel`` of about the same size trained with
  AdamW (the baseline users would pick; a benchmark-only extra: ``pip install diffusers``), and our
  samples/s as a ratio to it.

    python benchmarks/diffusion_step.py --preset demo_tiny --batch 32 --latent 8
    python benchmarks/diffusion_step.py --preset capacity_unet128_d4 --batch 64 --latent 32 --compile --diffusers
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from ldmflow.config.loading import load_config
from ldmflow.devices import get_device
from ldmflow.diffusion.schedules import NoiseSchedule, diffusion_loss
from ldmflow.models.unet import build_unet, count_parameters
from ldmflow.training.loop import FitConfig, autocast, fit
from ldmflow.training.optim import build_optimizer

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


class SyntheticLatents(torch.utils.data.Dataset):
    """Latents and labels held in memory, served whole-batch like ``LatentDataset``."""

    def __init__(self, n: int, shape: tuple[int, int, int], classes: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn((n, *shape), generator=g)
        self.labels = torch.randint(0, classes, (n,), generator=g)

    def __len__(self):
        return len(self.x)

    def __getitems__(self, idx):
        idx = torch.as_tensor(idx)
        return {"latent": self.x[idx], "label": self.labels[idx], "index": idx}


class BenchTask:
    """The diffusion task's training step, without sample grids."""

    def __init__(self, model, schedule, classes):
        self.model, self.schedule, self.classes = model, schedule, classes

    def loss(self, model, batch, step):
        x0 = batch["latent"]
        t = torch.randint(0, self.schedule.timesteps, (x0.shape[0],), device=x0.device)
        noise = torch.randn_like(x0)
        out = model(self.schedule.add_noise(x0, noise, t), t, batch["label"])
        return diffusion_loss(out, x0, noise, t, self.schedule, "epsilon").mean(), {}

    def evaluate(self, model, loader):
        return {"val_loss": 0.0}

    def write_samples(self, model, epoch, path):
        pass


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def bare_samples_per_s(model, data, schedule, batch, steps, device, precision, compile_model, cuda_graphs) -> float:
    """A bare forward + backward + AdamW step on the same batches (no loop bookkeeping)."""
    model = copy.deepcopy(model).to(device).train()
    opt = build_optimizer(model.parameters(), load_config({"name": "b"}, "diffusion").optim, device)
    mode = "reduce-overhead" if cuda_graphs else None
    step_model = torch.compile(model, mode=mode) if compile_model else model
    batches = [data.__getitems__(list(range(i * batch, (i + 1) * batch))) for i in range(len(data) // batch)]
    batches = [{k: v.to(device) for k, v in b.items()} for b in batches]

    def one(b):
        x0 = b["latent"]
        t = torch.randint(0, schedule.timesteps, (x0.shape[0],), device=device)
        noise = torch.randn_like(x0)
        with autocast(device, precision):
            out = step_model(schedule.add_noise(x0, noise, t), t, b["label"])
            loss = diffusion_loss(out, x0, noise, t, schedule, "epsilon").mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for b in batches[:3]:
        one(b)
    sync(device)
    start = time.perf_counter()
    for i in range(steps):
        one(batches[i % len(batches)])
    sync(device)
    return steps * batch / (time.perf_counter() - start)


def loop_samples_per_s(cfg, model, data, schedule, device, epochs) -> float:
    """samples/s of ldmflow's ``fit`` (median over epochs after the first), evaluation excluded."""
    with tempfile.TemporaryDirectory() as tmp:
        task = BenchTask(copy.deepcopy(model), schedule, 10)
        fc = FitConfig(stage="bench", seed=0, data=cfg.data, optim=cfg.optim, train=cfg.train, resolved={})
        result = fit(task, data, SyntheticLatents(cfg.data.batch_size, data.x.shape[1:], 10), fc, tmp, "bench",
                     device=device, progress=False)
    rates = [row["samples_per_s"] for row in result["history"][1:]]
    return float(np.median(rates))


def flops_per_step(model, shape, batch, device) -> float:
    model = copy.deepcopy(model).to(device)
    x = torch.randn((batch, *shape), device=device)
    t = torch.randint(0, 1000, (batch,), device=device)
    y = torch.zeros(batch, dtype=torch.long, device=device)
    with FlopCounterMode(display=False) as counter:
        model(x, t, y).float().pow(2).mean().backward()
    return float(counter.get_total_flops())


def peak_tflops(device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def diffusers_baseline(params_target: int, shape, batch, steps, device, precision):
    """diffusers' UNet2DModel with about our parameter count, trained with AdamW: (samples/s, params)."""
    from diffusers import UNet2DModel

    best = None
    for width in (32, 64, 96, 128, 160, 192, 224, 256):
        chans = (width, 2 * width, 2 * width, 4 * width) if shape[1] >= 16 else (width, 2 * width)
        kinds = ("DownBlock2D",) * (len(chans) - 2) + ("AttnDownBlock2D",) * 2
        ups = ("AttnUpBlock2D",) * 2 + ("UpBlock2D",) * (len(chans) - 2)
        m = UNet2DModel(sample_size=shape[1], in_channels=shape[0], out_channels=shape[0], block_out_channels=chans,
                        down_block_types=kinds, up_block_types=ups, layers_per_block=2, num_class_embeds=11)
        n = count_parameters(m)
        if best is None or abs(n - params_target) < abs(best[1] - params_target):
            best = (m, n)
    model, n = best
    model = model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=device.type == "cuda")
    schedule = NoiseSchedule.from_config(load_config({"name": "b"}, "diffusion").diffusion).to(device)
    x = torch.randn((batch, *shape), device=device)
    y = torch.zeros(batch, dtype=torch.long, device=device)

    def one():
        t = torch.randint(0, 1000, (batch,), device=device)
        noise = torch.randn_like(x)
        with autocast(device, precision):
            out = model(schedule.add_noise(x, noise, t), t, class_labels=y).sample
            loss = (out.float() - noise).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        one()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        one()
    sync(device)
    return steps * batch / (time.perf_counter() - start), n


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="demo_tiny")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--latent", type=int, default=8, help="latent side")
    parser.add_argument("--channels", type=int, default=4)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per measurement")
    parser.add_argument("--epochs", type=int, default=4, help="loop epochs (the first is a warm-up)")
    parser.add_argument("--precision", default=None, help="fp32 / bf16 (default: bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (CUDA)")
    parser.add_argument("--cuda-graphs", action="store_true", help="with --compile: CUDA graphs (reduce-overhead)")
    parser.add_argument("--diffusers", action="store_true", help="also time diffusers' UNet2DModel")
    parser.add_argument("--device", default=None)
    args = parser.parse_args(argv)

    device = get_device(args.device)
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    shape = (args.channels, args.latent, args.latent)
    cfg = load_config({"name": "bench", "model": {"preset": args.preset}, "data": {"batch_size": args.batch},
                       "optim": {"warmup_steps": 0},
                       "train": {"epochs": args.epochs, "precision": precision, "compile": args.compile,
                                 "cuda_graphs": args.cuda_graphs,
                                 "log_every": 10_000, "ema": {"decay": 0.999}, "checkpoint_every_minutes": 0}},
                      "diffusion")
    torch.manual_seed(0)
    model = build_unet(cfg, args.channels, 10)
    schedule = NoiseSchedule.from_config(cfg.diffusion).to(device)
    data = SyntheticLatents(args.batch * args.steps, shape, 10)
    params = count_parameters(model)
    flops = flops_per_step(model, shape, args.batch, device)
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
          f"preset {args.preset}: {params / 1e6:.1f}M parameters, latents {shape}, batch {args.batch}, {precision}"
          f"{', compiled' if args.compile else ''}")
    print(f"model FLOPs per training step (fwd + bwd): {flops / 1e9:.2f} GFLOP")

    bare = bare_samples_per_s(model, data, schedule, args.batch, args.steps, device, precision, args.compile,
                              args.cuda_graphs)
    loop = loop_samples_per_s(cfg, model, data, schedule, device, args.epochs)
    print(f"bare step: {bare:,.0f} samples/s; full training loop: {loop:,.0f} samples/s; "
          f"loop/bare time ratio {bare / loop:.3f} (target <= 1.10)")
    peak = peak_tflops(device)
    if peak:
        achieved = loop / args.batch * flops / 1e12
        print(f"model FLOPs utilisation: {achieved:.1f} TFLOP/s = {100 * achieved / peak:.1f}% of {peak:.0f} bf16 peak")
    if args.diffusers:
        base, n = diffusers_baseline(params, shape, args.batch, args.steps, device, precision)
        print(f"diffusers UNet2DModel ({n / 1e6:.1f}M parameters, AdamW, eager {precision}): {base:,.0f} samples/s; "
              f"ldmflow / diffusers = {loop / base:.2f}x")


if __name__ == "__main__":
    main()
