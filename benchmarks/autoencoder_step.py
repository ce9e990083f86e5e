"""Benchmark: the autoencoder's training step in channels_last (NHWC, what the stage uses) against NCHW.

Builds one autoencoder from an experiment file (the demo's by default) with random heads' targets, and
times the same training step (forward, the multi-head loss, backward, AdamW) on the same weights and
batch in both memory layouts, interleaved in one process; prints ms per step of each and the ratio
NCHW / NHWC (above 1: channels_last is faster).

    PYTHONPATH=src python benchmarks/autoencoder_step.py --config config/autoencoders/demo_kl_c4_f4.yaml --threads 1
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from ldmflow.config.loading import resolve_experiment
from ldmflow.models.autoencoder import AutoencoderLoss, build_autoencoder


def timed_step(model, loss_fn, batch, steps: int) -> float:
    """Seconds per training step of ``model`` on ``batch`` (after two untimed steps)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        total, _ = loss_fn(model(batch["image"]), batch)
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()

    for _ in range(2):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="config/autoencoders/demo_kl_c4_f4.yaml")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="NCHW / NHWC measurements, interleaved")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg, _ = resolve_experiment(args.config, "autoencoder", ())
    cfg.data.mask_classes, cfg.data.classes, cfg.data.channels = 4, ["a", "b", "c"], 3
    torch.manual_seed(0)
    nchw = build_autoencoder(cfg)
    nhwc = copy.deepcopy(nchw).to(memory_format=torch.channels_last)
    n, size = cfg.data.batch_size, cfg.data.image_size
    batch = {"image": torch.rand(n, 3, size, size) * 2 - 1, "mask": torch.randint(0, 4, (n, size, size)),
             "label": torch.randint(0, 3, (n,))}
    loss_fn = AutoencoderLoss(cfg.loss)
    times = {"NCHW": [], "NHWC (channels_last)": []}
    for _ in range(args.rounds):
        times["NCHW"].append(timed_step(nchw, loss_fn, batch, args.steps))
        times["NHWC (channels_last)"].append(timed_step(nhwc, loss_fn, batch, args.steps))
    best = {k: min(v) for k, v in times.items()}
    print(f"{cfg.name}: batch {n} x {size} px, {sum(p.numel() for p in nchw.parameters()) / 1e6:.2f}M parameters, "
          f"{args.threads} thread(s), best of {args.rounds} x {args.steps} steps")
    for k, v in best.items():
        print(f"  {k:<22} {1000 * v:7.1f} ms/step")
    print(f"  ratio NCHW / NHWC       {best['NCHW'] / best['NHWC (channels_last)']:.2f}")


if __name__ == "__main__":
    main()
