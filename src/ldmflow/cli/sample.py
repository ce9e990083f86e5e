"""The ``sample`` command: images from a diffusion or ControlNet checkpoint."""

from __future__ import annotations

from ldmflow.cli.arguments import (
    MAX_GUIDANCE,
    MAX_IMAGES,
    MAX_SEED,
    _apply_sets,
    add_command,
    add_device,
    existing_file,
    float_range,
    int_range,
    output_dir,
)
from ldmflow.errors import ConfigError


def parse_scale(text: str | float | list | None) -> float | list[float] | None:
    """``--scale``: one number, or comma-separated numbers, one per UNet level."""
    if text is None:
        return None
    try:
        values = [float(v) for v in (text if isinstance(text, list) else str(text).split(","))]
    except ValueError:
        raise ConfigError(f"--scale {text!r}: give a number or comma-separated numbers (one per UNet level)") from None
    if min(values) < 0:
        raise ConfigError(f"--scale {text!r}: conditioning scales must be >= 0")
    return values[0] if len(values) == 1 else values


def cmd_sample(args) -> None:
    from ldmflow.checkpoints import checkpoint_stage
    from ldmflow.errors import SamplingError
    from ldmflow.stages.sample import sample_checkpoint
    from ldmflow.stages.sample_controlnet import sample_controlnet

    _apply_sets(args, ("n", "class_id", "guidance", "sampler", "steps", "seed", "batch_size", "control", "scale"))
    if checkpoint_stage(args.checkpoint) == "controlnet":
        if args.control is None:
            raise SamplingError(f"{args.checkpoint} is a ControlNet checkpoint: give --control (a row index of its "
                                "latent store, or an image file)")
        result = sample_controlnet(args.checkpoint, args.control, args.n, args.out, scale=parse_scale(args.scale),
                                   class_id=args.class_id, guidance=args.guidance, sampler=args.sampler,
                                   steps=args.steps, seed=args.seed, device=args.device, batch_size=args.batch_size,
                                   data_values=args.data_values)
        print(f"wrote {result['n']} samples to {result['out']}")
        return
    if args.control is not None or args.scale is not None:
        raise SamplingError("--control and --scale need a ControlNet checkpoint")
    result = sample_checkpoint(args.checkpoint, args.n, args.out, class_id=args.class_id, guidance=args.guidance,
                               sampler=args.sampler, steps=args.steps, seed=args.seed, device=args.device,
                               batch_size=args.batch_size, data_values=args.data_values)
    print(f"wrote {result['n']} samples to {result['out']}")


def add_commands(sub) -> None:
    p = add_command(sub, "sample", cmd_sample,
                    "generate images from a diffusion or ControlNet checkpoint (PNGs, grid.png, samples.zarr)")
    p.add_argument("--checkpoint", type=existing_file, required=True, help="diffusion or ControlNet checkpoint (.pt)")
    p.add_argument("--n", type=int_range(1, MAX_IMAGES), default=16, help="number of samples")
    p.add_argument("--out", type=output_dir, required=True,
                   help="output folder (sample PNGs, grid.png and samples.zarr of an earlier call are replaced)")
    p.add_argument("--class", dest="class_id", default=None,
                   help="class name or index (default: cycle classes); class-conditional models only")
    p.add_argument("--guidance", type=float_range(0.0, MAX_GUIDANCE), default=None,
                   help="classifier-free guidance scale (default: config); class-conditional models only")
    p.add_argument("--sampler", choices=("ddpm", "ddim", "dpmpp_2m"), default=None, help="default: config")
    p.add_argument("--steps", type=int_range(1, 100_000), default=None,
                   help="sampling steps, at most the model's trained timesteps (default: config)")
    p.add_argument("--control", default=None, metavar="PATH_OR_INDEX",
                   help="ControlNet checkpoints: the control, a row index of the latent store or an image file "
                   "(a mask PNG, an image for edges, or a control image) of the autoencoder's image size")
    p.add_argument("--scale", default=None, metavar="S",
                   help="ControlNet conditioning scale: a number, or one per UNet level as 1,0.5 (default: config)")
    p.add_argument("--seed", type=int_range(0, MAX_SEED), default=42)
    p.add_argument("--batch-size", type=int_range(1, 65536), default=64)
    add_device(p)
    p.add_argument("--data-values", action="store_true",
                   help="also write OUT/data/ samples in the data's own bit depth and channels (16-bit PNG, "
                   "multi-page TIFF)")
