"""The data commands: ``demo-data`` writes the built-in dataset, ``embed`` encodes a dataset into a latent store."""

from __future__ import annotations

from ldmflow.cli.arguments import (
    MAX_IMAGE_SIZE,
    MAX_IMAGES,
    MAX_SEED,
    _apply_sets,
    add_command,
    add_device_and_threads,
    existing_file,
    existing_path,
    int_range,
    output_dir,
)


def cmd_demo_data(args) -> None:
    from ldmflow.data.demo import write_demo_data

    _apply_sets(args, ("n", "size", "seed"))
    path = write_demo_data(args.out, n=args.n, size=args.size, seed=args.seed)
    print(path)


def cmd_embed(args) -> None:
    from ldmflow.stages.embed import embed_latents

    _apply_sets(args, ("batch_size", "dtype"))
    print(embed_latents(args.checkpoint, args.data, args.out, batch_size=args.batch_size, dtype=args.dtype,
                        device=args.device, threads=args.threads))


def add_demo_data(sub) -> None:
    p = add_command(sub, "demo-data", cmd_demo_data, "write the built-in procedural demo dataset and its manifest.csv")
    p.add_argument("--out", type=output_dir, required=True, help="output folder")
    p.add_argument("--n", type=int_range(2, MAX_IMAGES), default=256, help="number of images")
    p.add_argument("--size", type=int_range(8, MAX_IMAGE_SIZE), default=32, help="image side in pixels")
    p.add_argument("--seed", type=int_range(0, MAX_SEED), default=42)


def add_embed(sub) -> None:
    p = add_command(sub, "embed", cmd_embed, "encode every image with an autoencoder into a zarr latent store")
    p.add_argument("--checkpoint", type=existing_file, required=True,
                   help="autoencoder checkpoint .pt, or the selected.json naming one")
    p.add_argument("--data", type=existing_path, required=True, help="manifest CSV or folder of images")
    p.add_argument("--out", type=output_dir, required=True, help="the store to write, e.g. latents.zarr")
    p.add_argument("--batch-size", type=int_range(1, 65536), default=64, help="images per encoder batch (default 64)")
    p.add_argument("--dtype", default="float16", choices=("float16", "float32"), help="latent dtype (default float16)")
    add_device_and_threads(p)
