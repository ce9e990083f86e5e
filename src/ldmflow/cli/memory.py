"""The ``memory`` command: the GPU memory a training run of an experiment config needs, and which cards it fits."""

from __future__ import annotations

import argparse

from ldmflow.cli.arguments import add_command, existing_file, int_range

PRECISIONS = ("config", "bf16", "fp16", "fp32")


def memory_rows(args: argparse.Namespace) -> list:
    """One :class:`ldmflow.memory.MemoryEstimate` per ``--config``."""
    from ldmflow.config.loading import load_config
    from ldmflow.errors import ConfigError
    from ldmflow.memory import DataShape, estimate

    base = load_config(args.base, stage="diffusion") if args.base else None
    c, h, w = args.latent_shape
    shape = DataShape(latent=(c, h, w), classes=args.classes, mask_classes=args.mask_classes,
                      downsample=args.downsample)
    rows = []
    for path in args.config:
        cfg = load_config(path, overrides=args.set or ())
        if args.batch:
            cfg.data.batch_size = args.batch
        precision = cfg.train.precision if args.precision == "config" else args.precision
        # auto is what a GPU with bf16 runs (compute capability 8.0 and later)
        precision = "bf16" if precision == "auto" else precision
        if type(cfg).__name__ == "ControlNetExperiment" and base is None:
            raise ConfigError(f"{path}: a ControlNet's memory needs its base UNet's experiment file; pass --base")
        rows.append(estimate(cfg, precision, base_cfg=base, shape=shape))
    return rows


def render(rows: list) -> str:
    """The table ``ldmflow memory`` prints: sizes in GB (1e9 bytes), and whether each card fits."""
    from ldmflow.memory import CARDS_GB

    head = ["experiment", "stage", "precision", "params", "weights+grads+AdamW+EMA", "activations/sample",
            "batch", "activations", "total", "needs", *[f"{gb} GB" for gb in CARDS_GB]]
    lines = []
    for e in rows:
        ck = " (checkpointing)" if e.checkpointing else ""
        batch = f"{e.batch} x {e.accumulate}" if e.accumulate > 1 else f"{e.batch}"
        state = (e.weights + e.grads_optimizer + e.ema) / 1e9
        lines.append([e.name, e.stage, e.precision, f"{e.parameters / 1e6:.1f}M", f"{state:.2f}",
                      f"{e.activations_per_sample / 1e9:.3f}{ck}",
                      batch, f"{e.activations() / 1e9:.2f}", f"{e.total() / 1e9:.2f}", f"{e.needed_gb():.1f}",
                      *["yes" if e.fits(gb) else "no" for gb in CARDS_GB]])
    widths = [max(len(r[i]) for r in [head, *lines]) for i in range(len(head))]
    return "\n".join("  ".join(cell.ljust(wd) for cell, wd in zip(r, widths)).rstrip() for r in [head, *lines])


def cmd_memory(args: argparse.Namespace) -> None:
    print(render(memory_rows(args)))
    print("GB = 1e9 bytes. batch: micro-batch x optim.accumulate (the micro-batch is what memory holds). needs: "
          "total x 1.1 (allocator slack) + 1 GB (CUDA context and workspaces).")


def latent_shape(text: str) -> tuple[int, int, int]:
    """An argparse ``type=``: ``C,H,W`` (or ``CxHxW``) of the latents."""
    parts = str(text).replace("x", ",").split(",")
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) != 3 or min(values) < 1 or max(values) > 4096:
        raise argparse.ArgumentTypeError(f"{text!r} is not C,H,W (three integers 1..4096)")
    return values  # type: ignore[return-value]


def add_commands(sub) -> None:
    p = add_command(sub, "memory", cmd_memory,
                    "estimate the GPU memory of training an experiment (parameters, optimizer, activations) "
                    "and which cards (16 / 32 / 80 GB) it fits")
    p.add_argument("--config", type=existing_file, action="append", required=True,
                   help="experiment config file (repeatable; --set applies to each)")
    p.add_argument("--batch", type=int_range(1, 65536), default=None,
                   help="micro-batch (default: the config's data.batch_size)")
    p.add_argument("--precision", choices=PRECISIONS, default="config",
                   help="autocast precision (default: the config's train.precision; auto counts as bf16)")
    p.add_argument("--base", type=existing_file, default=None,
                   help="a ControlNet's base: the diffusion experiment file of the UNet it steers")
    p.add_argument("--latent-shape", type=latent_shape, default=(4, 32, 32), metavar="C,H,W",
                   help="latents of a UNet or ControlNet (default 4,32,32: a KL f8 autoencoder of 256 px images)")
    p.add_argument("--classes", type=int_range(1, 100000), default=2, help="class labels (default 2)")
    p.add_argument("--mask-classes", type=int_range(1, 1024), default=2,
                   help="segmentation classes, a ControlNet's control channels (default 2)")
    p.add_argument("--downsample", type=int_range(1, 64), default=8,
                   help="a ControlNet's autoencoder downsampling (default 8)")
