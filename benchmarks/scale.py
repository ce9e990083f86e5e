"""How each stage a user waits on grows with the number of images N: seconds and peak memory on a ladder of N.

For every N it times, each in a fresh subprocess (so that the peak resident memory, VmHWM, is the stage's
own), the library's public functions for:

- ``manifest``: validating the manifest (``data.manifest.read_manifest``);
- ``embed``: encoding every image into a latent store (``stages.embed.embed_latents``, a tiny autoencoder);
- ``reads``: one epoch of random batches of 64 read from that store (``data.latent_store.LatentDataset``
  with ``max_gb=0``: streamed from the store, as a store larger than memory is read);
- ``search``: the memorization search of 2,048 samples in N training images (``evaluation.search.
  blocked_search``, pixel features at 64 px as ``memorization.image_size``, 16 tiles, the training features
  in a file);
- ``judge``: decoding the N images and scoring them with a tiny judge (``evaluation.judge.judge_outputs`` on
  ``evaluation.judge.ImageFiles``: read a batch at a time; of each image's segmentation it keeps the pixel count of
  each class).

It then fits the log-log slope of seconds against N for each stage (1: linear; the search does N x 2,048
pairs, so it is linear in N too) and prints a markdown table; ``--out`` writes it as JSON. The data
(random 64 px PNGs, their masks and labels, a manifest CSV) are generated in a temporary folder.

    PYTHONPATH=src python benchmarks/scale.py                        # CPU: 1k, 4k, 16k images of 64 px
    PYTHONPATH=src python benchmarks/scale.py --gpu                  # CUDA: 256 px, 10k, 30k, 100k
    PYTHONPATH=src python benchmarks/scale.py --sizes 32 64 --out /tmp/scale.json
"""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
STAGES = ("manifest", "embed", "reads", "search", "judge")
CLASSES = ["circle", "square", "triangle"]


def peak_rss_mib() -> float:
    """This process's high-water mark of resident memory (VmHWM), in MiB."""
    with open("/proc/self/status") as fh:
        return int(re.search(r"VmHWM:\s+(\d+) kB", fh.read()).group(1)) / 1024


def write_data(folder: Path, n: int, size: int, seed: int = 0) -> Path:
    """N random PNGs of ``size`` px with 4-class masks and 3 class labels, and ``manifest.csv``; returns it."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(exist_ok=True)
    rows = ["image,mask,label"]
    for i in range(n):
        coarse = rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)  # smooth images, small files
        Image.fromarray(coarse).resize((size, size), Image.BILINEAR).save(folder / "images" / f"{i:06d}.png")
        mask = rng.integers(0, 4, (size // 16, size // 16), dtype=np.uint8).repeat(16, 0).repeat(16, 1)
        Image.fromarray(mask).save(folder / "masks" / f"{i:06d}.png")
        rows.append(f"images/{i:06d}.png,masks/{i:06d}.png,{CLASSES[i % 3]}")
    (folder / "dataset.json").write_text(json.dumps({"classes": CLASSES, "mask_classes": 4}))
    manifest = folder / "manifest.csv"
    manifest.write_text("\n".join(rows) + "\n")
    return manifest


def prefix_manifest(manifest: Path, n: int) -> Path:
    """The first N rows of the manifest, beside it (so that dataset.json applies to it too)."""
    out = manifest.with_name(f"manifest_{n}.csv")
    out.write_text("".join(manifest.read_text().splitlines(keepends=True)[:n + 1]))
    return out


def write_autoencoder(path: Path, size: int, device: str) -> Path:
    """A freshly initialised tiny KL autoencoder (base width 8) checkpoint that ``embed_latents`` loads."""
    import torch

    from ldmflow.artifacts import CHECKPOINT_FORMAT, save_checkpoint
    from ldmflow.config.loading import load_config
    from ldmflow.config.schema import to_dict
    from ldmflow.models.autoencoder import build_autoencoder

    cfg = load_config(REPO / "config/autoencoders/demo_kl_c4_f4.yaml",
                      overrides=[f"data.image_size={size}", "model.base_channels=8", "data.batch_size=64",
                                 "data.classes=[circle, square, triangle]", "data.mask_classes=4"])
    torch.manual_seed(0)
    model = build_autoencoder(cfg)
    save_checkpoint({"format": CHECKPOINT_FORMAT, "stage": "autoencoder", "name": cfg.name, "config": to_dict(cfg),
                     "model": model.state_dict(), "ema": None, "extra": {}}, path)
    return path


# -------------------------------------------------------------------------------------------------
# One stage, in a child process: untimed set-up, then the timed call
# -------------------------------------------------------------------------------------------------

def stage_manifest(work: Path, n: int, args) -> float:
    from ldmflow.data.manifest import read_manifest

    t0 = time.perf_counter()
    read_manifest(work / "data" / f"manifest_{n}.csv")
    return time.perf_counter() - t0


def stage_embed(work: Path, n: int, args) -> float:
    from ldmflow.stages.embed import embed_latents

    t0 = time.perf_counter()
    embed_latents(work / "ae.pt", work / "data" / f"manifest_{n}.csv", work / f"store_{n}.zarr", batch_size=64,
                  device=args.device)
    return time.perf_counter() - t0


def stage_reads(work: Path, n: int, args) -> float:
    from ldmflow.data.latent_store import LatentDataset

    data = LatentDataset(work / f"store_{n}.zarr", split=None, max_gb=0.0)  # streamed: not held in memory
    order = np.random.default_rng(0).permutation(len(data))
    t0 = time.perf_counter()
    for i in range(0, len(order), 64):
        data.__getitems__(order[i:i + 64].tolist())
    return time.perf_counter() - t0


def stage_search(work: Path, n: int, args) -> float:
    import torch

    from ldmflow.evaluation.features import Features
    from ldmflow.evaluation.search import blocked_search

    tiles, d = 16, 3 * args.feature_size**2 // 16  # pixel features, 4 x 4 tiles
    rng = np.random.default_rng(0)

    def rows(count: int) -> np.ndarray:  # unit-norm rows, (count, T, d)
        x = rng.standard_normal((count, tiles, d), np.float32)
        return (x / np.linalg.norm(x.reshape(count, -1), axis=1)[:, None, None]).astype(np.float16)

    train = Features(n, tiles, d, work / f"train_{n}.f16")  # in a file, as the memorization stage keeps them
    for s in range(0, n, 1024):
        train.write(s, rows(min(1024, n - s)))
    queries = rows(args.samples)
    device = torch.device(args.device or "cpu")
    t0 = time.perf_counter()
    blocked_search(queries, train, k=5, n=50, memory_gb=1.0, device=device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def stage_judge(work: Path, n: int, args) -> float:
    import pandas as pd
    import torch

    from ldmflow.evaluation.judge import ImageFiles, judge_outputs
    from ldmflow.models.judge import Judge

    manifest = work / "data" / f"manifest_{n}.csv"
    paths = [str(manifest.parent / p) for p in pd.read_csv(manifest)["image"]]
    torch.manual_seed(0)
    model = Judge(3, len(CLASSES), 4, width=8, image_size=args.image_size).to(args.device or "cpu")

    def areas(seg: torch.Tensor, rows: slice) -> torch.Tensor:  # (b, H, W) -> (b, 4) pixels of each mask class
        ids = seg + 4 * torch.arange(len(seg))[:, None, None]  # one bincount for the batch, not a one-hot
        return torch.bincount(ids.flatten(), minlength=4 * len(seg)).view(-1, 4)

    t0 = time.perf_counter()
    with torch.inference_mode():
        judge_outputs(model, ImageFiles(paths, args.image_size, 3, None, str(manifest)), seg=areas)
    return time.perf_counter() - t0


def run_child(args) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    seconds = globals()[f"stage_{args.child}"](Path(args.workdir), args.n, args)
    print(json.dumps({"seconds": seconds, "peak_rss_mib": peak_rss_mib()}))


# -------------------------------------------------------------------------------------------------
# The ladder
# -------------------------------------------------------------------------------------------------

def slope(ns: list[int], values: list[float]) -> float | None:
    """Least-squares slope of log(value) against log(N)."""
    if len(ns) < 2 or min(values) <= 0:
        return None
    return float(np.polyfit(np.log(ns), np.log(values), 1)[0])


def measure(stage: str, n: int, args, work: Path) -> dict:
    """Seconds and peak RSS of one stage at one N, in a fresh process (or in this one with --same-process,
    for quick checks: the peak is then this process's so far)."""
    if args.same_process:
        return {"seconds": globals()[f"stage_{stage}"](work, n, args), "peak_rss_mib": peak_rss_mib()}
    cmd = [sys.executable, __file__, "--child", stage, "--n", str(n), "--workdir", str(work),
           "--image-size", str(args.image_size), "--feature-size", str(args.feature_size), "--samples",
           str(args.samples)]
    cmd += (["--device", args.device] if args.device else []) + (["--threads", str(args.threads)]
                                                                if args.threads else [])
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def ladder(args, work: Path) -> dict:
    sizes = sorted(args.sizes)
    manifest = write_data(work / "data", max(sizes), args.image_size)
    write_autoencoder(work / "ae.pt", args.image_size, args.device or "cpu")
    rows = []
    for n in sizes:
        prefix_manifest(manifest, n)
        row = {"n": n}
        for stage in args.stages:
            row[stage] = measure(stage, n, args, work)
            print(f"N={n} {stage}: {row[stage]['seconds']:.3f} s, {row[stage]['peak_rss_mib']:.0f} MiB",
                  file=sys.stderr, flush=True)
        rows.append(row)
    ns = [r["n"] for r in rows]
    slopes = {s: {"seconds": slope(ns, [r[s]["seconds"] for r in rows]),
                  "peak_rss_mib": slope(ns, [r[s]["peak_rss_mib"] for r in rows])} for s in args.stages}
    return {"stages": list(args.stages), "rows": rows, "slopes": slopes, "image_size": args.image_size,
            "feature_size": args.feature_size, "samples": args.samples, "device": args.device or "cpu",
            "threads": args.threads}


def markdown(result: dict) -> str:
    """The table: one row per N (seconds and peak RSS MiB of each stage), then the slopes."""
    stages = result["stages"]
    head = "| N | " + " | ".join(f"{s} s | {s} MiB" for s in stages) + " |"
    lines = [head, "|" + "---|" * (1 + 2 * len(stages))]
    for r in result["rows"]:
        lines.append(f"| {r['n']} | " + " | ".join(f"{r[s]['seconds']:.3g} | {r[s]['peak_rss_mib']:.0f}"
                                                 for s in stages) + " |")

    def fmt(x: float | None) -> str:
        return "n/a" if x is None or math.isnan(x) else f"{x:.2f}"

    lines.append("| slope | " + " | ".join(f"{fmt(result['slopes'][s]['seconds'])} | "
                                          f"{fmt(result['slopes'][s]['peak_rss_mib'])}" for s in stages) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=None, help="the ladder of N (images)")
    parser.add_argument("--gpu", action="store_true",
                        help="CUDA and the research preset's shapes: 256 px images, N = 10k, 30k, 100k")
    parser.add_argument("--device", default=None, help="torch device (default: cpu; cuda with --gpu)")
    parser.add_argument("--image-size", type=int, default=None, help="image side (default 64; 256 with --gpu)")
    parser.add_argument("--feature-size", type=int, default=64,
                        help="side of the search's pixel features (memorization.image_size, default 64)")
    parser.add_argument("--samples", type=int, default=2048, help="generated samples in the search")
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads in each stage")
    parser.add_argument("--workdir", default=None, help="keep the data here (default: a temporary folder)")
    parser.add_argument("--out", default=None, help="write the result as JSON here")
    parser.add_argument("--same-process", action="store_true",
                        help="measure every stage in this process (quick; the peak memory is then cumulative)")
    parser.add_argument("--child", choices=STAGES, help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.gpu:
        args.device = args.device or "cuda"
    args.image_size = args.image_size or (256 if args.gpu else 64)
    if args.child:
        run_child(args)
        return None
    args.sizes = args.sizes or ([10_000, 30_000, 100_000] if args.gpu else [1000, 4000, 16000])
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        result = ladder(args, Path(tmp))
    print(markdown(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
