"""Random-batch reads of a latent store, the path diffusion training takes, against a numpy gather in memory.

Prints samples/s of ``LatentDataset`` (streamed from the store's chunk files, or held in memory), of the
baseline, their ratio and the ratio to the anchor: 3,400 samples/s, what diffusers' 74M UNet consumes at
32x32x4 on an H100 with compile and CUDA graphs (see ``same_work.compare_store_reads``).

    python benchmarks/store_reads.py --n 100000 --size 32 --channels 4 --batch 64 [--max-gb 0] [--out r.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import same_work as sw


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000, help="latents in the store")
    parser.add_argument("--size", type=int, default=32, help="latent side")
    parser.add_argument("--channels", type=int, default=4)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--max-gb", type=float, default=0.0,
                        help="LatentDataset's max_gb: 0 streams from the files, more holds a split that fits")
    parser.add_argument("--batches", type=int, default=200, help="timed batches per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workdir", help="folder for the store (default: a temporary one)")
    parser.add_argument("--out", help="write the record as JSON here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        r = sw.compare_store_reads(args.n, args.size, args.channels, args.batch, workdir=Path(tmp),
                                   max_gb=args.max_gb, batches=args.batches, rounds=args.rounds)
    print(f"{r['mode']}: {r['latents']} latents {'x'.join(map(str, r['latent']))} ({r['store_gb']:.2f} GB), "
          f"batch {r['batch']}: {r['ours']['items_per_s']:.0f} samples/s; numpy gather in memory "
          f"{r['baseline']['items_per_s']:.0f} samples/s ({r['ratio']['items_per_s']:.2f}x); "
          f"{r['ratio_to_anchor']:.2f}x the anchor of {r['anchor_samples_per_s']:.0f} samples/s")
    if args.out:
        Path(args.out).write_text(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
