"""Diffusion training speed on the same work: ldmflow against diffusers' UNet2DModel built as the same architecture.

For a named UNet preset, latent size and batch it prints, for both sides, the parameters, the FLOPs per
training step (forward + backward, counted by torch's FlopCounterMode), samples/s, the achieved FLOP/s
and the ratio ours / diffusers of each, twice:
- bare step: forward + backward + AdamW on both sides; no EMA, no gradient clipping on either;
- with extras: ldmflow's whole ``training.fit`` loop (data, AdamW, clipping, non-finite guard, EMA,
  metrics) against the diffusers step with ``clip_grad_norm_`` and diffusers' ``EMAModel``: EMA and
  clipping on both;
and the loop's overhead over our bare step (target <= 1.10). On CUDA, the model FLOPs utilisation against
the GPU's bf16 dense peak. The comparisons themselves live in ``same_work.py``; ``suite.py`` runs them all.

    python benchmarks/diffusion_step.py --preset demo_tiny --batch 32 --latent 8
    python benchmarks/diffusion_step.py --preset capacity_unet128_d4 --batch 64 --latent 32 --compile
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import same_work as sw  # a sibling script, not a package

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def show(r: dict, peak: float | None) -> None:
    o, b, ratio = r["ours"], r["baseline"], r["ratio"]
    unit, k = ("GFLOP/s", 1e3) if o["tflop_per_s"] < 1 else ("TFLOP/s", 1.0)
    print(f"\n{r['stage']}: extras: {r['extras']}")
    print(f"  {'':<54} {'params':>10} {'GFLOP/step':>11} {'samples/s':>10} {'achieved':>14}")
    for side in (o, b):
        print(f"  {side['name']:<54} {side['params'] / 1e6:>9.2f}M {side['gflop_per_step']:>11.3f} "
              f"{side['items_per_s']:>10.1f} {side['tflop_per_s'] * k:>8.1f} {unit}"
              + (f" ({100 * side['tflop_per_s'] / peak:.1f}% of bf16 peak)" if peak else ""))
    print(f"  {'ratio ldmflow / diffusers':<54} {ratio['params']:>10.4f} {ratio['gflop_per_step']:>11.4f} "
          f"{ratio['items_per_s']:>10.3f} {ratio['tflop_per_s']:>14.3f}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="demo_tiny")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--latent", type=int, default=8, help="latent side")
    parser.add_argument("--channels", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per measurement (and per loop epoch)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before the timed ones")
    parser.add_argument("--precision", default=None, help="fp32 / bf16 (default: bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--compile", action="store_true", help="torch.compile both models (CUDA)")
    parser.add_argument("--cuda-graphs", action="store_true", help="with --compile: CUDA graphs (reduce-overhead)")
    parser.add_argument("--device", default=None)
    args = parser.parse_args(argv)

    device = sw.pick_device(args.device)
    if args.compile and device.type != "cuda":
        parser.error("--compile needs a CUDA device: training.fit compiles only there, and both sides must match")
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    kind = "cudagraphs" if args.cuda_graphs else "compile" if args.compile else "eager"
    mode = sw.Mode(f"{kind}_{precision}", precision, compile=args.compile, cuda_graphs=args.cuda_graphs)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} thread(s)"
    print(f"device {device} ({name}), preset {args.preset}, latents {(args.channels, args.latent, args.latent)}, "
          f"batch {args.batch}, {mode.name}; {args.steps} timed steps after {args.warmup} warm-up steps")
    step, loop = sw.compare_diffusion_training(args.preset, args.latent, args.batch, mode, device,
                                               warmup=args.warmup, steps=args.steps, channels=args.channels)
    peak = peak_tflops(device)
    show(step, peak)
    show(loop, peak)
    print(f"\nldmflow loop / bare step time ratio: {step['ours']['items_per_s'] / loop['ours']['items_per_s']:.3f} "
          "(target <= 1.10)")


if __name__ == "__main__":
    main()
