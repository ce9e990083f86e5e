"""Bytes and seconds of one best and one latest checkpoint save of a large UNet, as the loop writes them now
and as it wrote them before (every checkpoint the whole state, serialised into memory first, then written).

    PYTHONPATH=src python benchmarks/checkpoint_save.py --preset capacity_unet128_d4 --dir /dev/shm/ckpt
"""

from __future__ import annotations

import argparse
import io
import shutil
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from ldmflow.artifacts import CHECKPOINT_FORMAT, RunPaths, atomic_write_bytes
from ldmflow.config.loading import load_config
from ldmflow.devices import rng_state
from ldmflow.models.unet import build_unet, count_parameters
from ldmflow.training.loop import FitConfig, save_state
from ldmflow.training.optim import Ema, build_optimizer
from ldmflow.training.state import LoopState


def fake_run(preset: str, out: Path) -> SimpleNamespace:
    """What save_state reads of a run: a UNet with EMA and AdamW moments after one step."""
    cfg = load_config({"name": "bench", "model": {"preset": preset}, "train": {"ema": {"decay": 0.999}}}, "diffusion")
    model = build_unet(cfg, 4, 10)
    fc = FitConfig("diffusion", 0, cfg.data, cfg.optim, cfg.train, resolved={"preset": preset}, extra={})
    optimizer = build_optimizer(model, fc)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    return SimpleNamespace(fc=fc, name="bench", paths=RunPaths(out, "bench"), device=torch.device("cpu"), world=1,
                           writer=True, model=model, ema=Ema(model, 0.999, 0), optimizer=optimizer,
                           scaler=torch.amp.GradScaler("cpu", enabled=False), state=LoopState(), last_save=0.0)


def save_before(run, path: Path) -> None:
    """The earlier writer, for best and latest alike: the whole state, serialised into memory, then written."""
    fc = run.fc
    state = {"format": CHECKPOINT_FORMAT, "stage": fc.stage, "name": run.name, "config": fc.resolved, "extra": {},
             "model": run.model.state_dict(), "ema": run.ema.model.state_dict(), **run.state.to_checkpoint(),
             "optimizer": run.optimizer.state_dict(), "scaler": None, "rng": [rng_state(run.device)]}
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def timed(fn, repeats: int) -> float:
    """Median seconds of ``repeats`` calls."""
    seconds = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - t0)
    return statistics.median(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="capacity_unet128_d4")
    parser.add_argument("--dir", default="/dev/shm/ldmflow-ckpt-bench")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    run = fake_run(args.preset, Path(args.dir))
    print(f"{args.preset}: {count_parameters(run.model) / 1e6:.1f}M parameters; writing under {args.dir}")
    paths, before = run.paths, Path(args.dir) / "before.pt"
    rows = {"before (best or latest)": (timed(lambda: save_before(run, before), args.repeats), before),
            "now latest": (timed(lambda: save_state(run, paths.latest), args.repeats), paths.latest),
            "now best": (timed(lambda: save_state(run, paths.best, resumable=False), args.repeats), paths.best)}
    for name, (seconds, path) in rows.items():
        print(f"{name:<24} {path.stat().st_size / 1e6:8.1f} MB {seconds:7.2f} s (median of {args.repeats})")
    shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
