"""Throughput of the blocked nearest-neighbour search, against a bare matrix product of the same size.

Both run on the same device in the same process: the blocked search (fp16 features in host memory,
streamed block by block, per-tile products, running top-k by similarity and top-n by tiled L2) and one
fp32 matrix product (queries x training) of the same shapes with both operands already on the device.
The ratio says what the blocking, the tiles and the top lists cost over the arithmetic alone.

    PYTHONPATH=src python benchmarks/memorization_search.py              # CPU here, CUDA when present
    PYTHONPATH=src python benchmarks/memorization_search.py --queries 8192 --train 100000 --size 64
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from ldmflow.devices import get_device
from ldmflow.evaluation.search import blocked_search, plan_blocks


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_time(fn, device: torch.device, repeats: int) -> float:
    fn()  # warm-up: kernels, allocator
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", type=int, default=2048, help="generated samples")
    parser.add_argument("--train", type=int, default=8192, help="training images")
    parser.add_argument("--size", type=int, default=32, help="image side of the pixel features (3 x size x size)")
    parser.add_argument("--tiles", type=int, default=4, help="tiles per side")
    parser.add_argument("--memory-gb", type=float, default=1.0, help="the search's working-memory budget")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default=None)
    args = parser.parse_args()

    device = get_device(args.device)
    tiles = args.tiles * args.tiles
    dim = 3 * args.size * args.size
    d = dim // tiles
    rng = np.random.default_rng(0)
    # unit-norm rows, tile-major (N, T, d), stored fp16 in host memory as the evaluation holds them
    queries = (rng.standard_normal((args.queries, tiles, d), np.float32) / np.sqrt(dim)).astype(np.float16)
    train = (rng.standard_normal((args.train, tiles, d), np.float32) / np.sqrt(dim)).astype(np.float16)
    q_block, t_block = plan_blocks(args.queries, args.train, tiles, tiles * d, 5, 50, args.memory_gb * 2**30)

    a = torch.from_numpy(queries.reshape(args.queries, -1)).to(device).float()
    b = torch.from_numpy(train.reshape(args.train, -1)).to(device).float()
    t_matmul = best_time(lambda: a @ b.T, device, args.repeats)  # noqa: F821 (a, b are deleted after)
    del a, b
    result = {}

    def search():
        result["nb"] = blocked_search(queries, train, k=5, n=50, memory_gb=args.memory_gb, device=device)

    t_search = best_time(search, device, args.repeats)
    pairs = args.queries * args.train
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} thread(s)"
    print(f"device: {device} ({name}); torch {torch.__version__}")
    print(f"{args.queries} queries x {args.train} training images, {dim} values each ({tiles} tiles of {d}); "
          f"blocks {q_block} x {t_block} within {args.memory_gb} GiB")
    print(f"blocked search: {t_search:.4f} s = {pairs / t_search:.3e} query-training pairs/s")
    print(f"bare fp32 matrix product (operands on the device): {t_matmul:.4f} s = {pairs / t_matmul:.3e} pairs/s")
    print(f"ratio (search time / matrix product time): {t_search / t_matmul:.2f}")
    stats = result["nb"].stats
    cuda = stats.get("cuda_peak_bytes")
    print(f"working set: {stats['peak_bytes'] / 2**20:.1f} MiB counted"
          + (f", {cuda / 2**20:.1f} MiB by the CUDA allocator" if cuda is not None else ""))


if __name__ == "__main__":
    main()
