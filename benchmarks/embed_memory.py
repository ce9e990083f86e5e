"""Benchmark: does `embed_latents` keep memory flat as the dataset grows?

Writes demo data at N and 10 x N images, trains a small autoencoder for one epoch on the first, then
embeds each dataset in a separate process and prints, for both, images/s (the whole `embed_latents`
call: the validation pass over every row, decoding, encoding and writing) and the process's peak
resident memory, with its resident memory after importing torch and ldmflow for reference, and the
ratio of peak memory 10N / N (flat memory: close to 1).

    PYTHONPATH=src python benchmarks/embed_memory.py --n 500 --size 32 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def child(checkpoint: str, manifest: str, out: str, threads: int, batch_size: int) -> None:
    """Embed one dataset in this process and print its timing and peak memory as JSON."""
    import zarr

    from ldmflow.stages.embed import embed_latents

    baseline_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmRSS:"))
    t0 = time.perf_counter()
    embed_latents(checkpoint, manifest, out, threads=threads, batch_size=batch_size, device="cpu")
    seconds = time.perf_counter() - t0
    n = zarr.open_group(out, mode="r").attrs["n"]
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    print(json.dumps({"n": n, "seconds": seconds, "images_per_s": n / seconds, "peak_mib": peak_kb / 1024,
                      "baseline_mib": baseline_kb / 1024}))


def run_child(checkpoint: Path, manifest: Path, out: Path, threads: int, batch_size: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.run([sys.executable, __file__, "--child", str(checkpoint), str(manifest), str(out),
                           "--threads", str(threads), "--batch-size", str(batch_size)],
                          env=env, capture_output=True, text=True, check=False)
    if proc.returncode:
        raise SystemExit(f"embedding {manifest} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=500, help="images in the small dataset (the large has 10 x N)")
    parser.add_argument("--size", type=int, default=32, help="image side in pixels")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workdir", help="keep the data here (default: a temporary folder)")
    parser.add_argument("--child", nargs=3, metavar=("CHECKPOINT", "MANIFEST", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child, threads=args.threads, batch_size=args.batch_size)
        return

    from ldmflow.config.loading import load_config
    from ldmflow.data.demo import write_demo_data
    from ldmflow.stages.train_autoencoder import train_autoencoder

    work = Path(args.workdir or tempfile.mkdtemp(prefix="ldmflow-embed-bench-"))
    sizes = (args.n, 10 * args.n)
    manifests = {}
    for n in sizes:
        t0 = time.perf_counter()
        manifests[n] = write_demo_data(work / f"data_{n}", n=n, size=args.size, seed=1)
        print(f"wrote {n} demo images ({args.size} px) in {time.perf_counter() - t0:.1f} s", flush=True)
    cfg = load_config(REPO / "config/autoencoders/demo_kl_c4_f4.yaml",
                      overrides=[f"data.image_size={args.size}", "train.epochs=1"])
    train_autoencoder(cfg, manifests[args.n], work / "ae", threads=args.threads, progress=False)
    checkpoint = work / "ae/checkpoints" / f"{cfg.name}_checkpoint_best.pt"

    results = {n: run_child(checkpoint, manifests[n], work / f"latents_{n}.zarr", args.threads, args.batch_size)
               for n in sizes}
    print(f"\nautoencoder {cfg.name} ({cfg.model.variant}, f{cfg.model.downsample}, c{cfg.model.latent_channels}), "
          f"{args.size} px, batch {args.batch_size}, {args.threads} threads, CPU")
    print(f"{'images':>8} {'seconds':>8} {'images/s':>9} {'peak MiB':>9} {'after imports MiB':>18}")
    for n, r in results.items():
        print(f"{n:>8} {r['seconds']:>8.1f} {r['images_per_s']:>9.0f} {r['peak_mib']:>9.0f} {r['baseline_mib']:>18.0f}")
    small, large = results[sizes[0]], results[sizes[1]]
    print(f"peak memory ratio {sizes[1]} / {sizes[0]}: {large['peak_mib'] / small['peak_mib']:.3f}")


if __name__ == "__main__":
    main()
