"""Every same-work speed comparison (``same_work.py``) in one run, written as one JSON-lines file.

Two scales. ``gpu``: the realistic one, for a CUDA machine (unet128_d4 UNet on 32x32x4 latents, batches 64
and 256, modes eager fp32, eager bf16, torch.compile (bf16) and CUDA graphs (bf16, compile's
reduce-overhead mode) on both sides; the KL-f4 autoencoder at 128 px; embedding of 1,024 demo images;
DDIM 25 and 50 steps; the memorization search at 4,096 x 32,768). ``cpu``: a reduced copy of it
(demo_tiny UNet on 8x8x4 latents, eager fp32, a few steps) so that the suite itself is tested without a
GPU. Each case times a fixed number of steps after a fixed warm-up; cases run in order of importance
(every stage eager first, then compile, then CUDA graphs); once ``--budget-s`` seconds have passed the
rest are written as skipped, and a case still running at ``--hard-limit-s`` is stopped and written as
such, so the run ends in a known time. A case that fails is written with its error and the suite goes on;
a case whose optional package is missing (zarr for the embedding) is written as skipped, with the reason.

    PYTHONPATH=src python3 benchmarks/suite.py --scale cpu --out /tmp/suite.jsonl [--cases embedding ...]
    bash benchmarks/gpu_suite.sh             # on a GPU machine: installs from .whl/, picks the scale
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib
import json
import os
import platform
import signal
import sys
import tempfile
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import same_work as sw  # a sibling script, not a package


@dataclasses.dataclass
class Scale:
    preset: str
    latent: int
    batches: tuple[int, ...]
    modes: tuple[str, ...]
    warmup: int  # untimed steps before each timed run (compilation, CUDA graph capture, allocator)
    steps: int  # timed training steps per side and round
    rounds: int  # timed rounds, the sides in turn; the best round of each side counts
    sample_batch: tuple[int, ...]
    sample_repeats: int
    ae_image: int
    ae_base: int
    embed_images: int
    embed_image: int
    search: tuple[int, int, int]  # queries, training images, image side
    budget_s: float  # start no case after this many seconds
    hard_limit_s: float  # stop the case running at this many seconds
    threads: int | None = None  # torch's CPU threads; None: torch's default


SCALES = {
    "gpu": Scale("capacity_unet128_d4", 32, (64, 256), tuple(sw.MODES), warmup=3, steps=10, rounds=2,
                 sample_batch=(64, 256), sample_repeats=2, ae_image=128, ae_base=32, embed_images=1024, embed_image=128,
                 search=(4096, 32768, 32), budget_s=330.0, hard_limit_s=430.0),
    "cpu": Scale("demo_tiny", 8, (8,), ("eager_fp32",), warmup=2, steps=8, rounds=3,
                 sample_batch=(4,), sample_repeats=3,
                 ae_image=16, ae_base=16, embed_images=256, embed_image=16, search=(256, 1024, 16),
                 budget_s=300.0, hard_limit_s=600.0,
                 # one thread: on a busy shared machine two threads wait on each other (10x slower here)
                 threads=1),
}


def cases(s: Scale, device: torch.device, workdir: Path) -> list[tuple[str, object]]:
    """(name, thunk) pairs in the order they run; each thunk returns one record or a list of them.

    Order of importance, so that a short budget cuts the least: every stage in the eager modes; then, in
    each compiled mode, the headline cases (diffusion training and DDIM 50 at the largest batch); then the
    rest of the compiled cases.
    """
    todo = []  # (tier, name, thunk)
    for mode_name in s.modes:
        mode = sw.MODES[mode_name]
        compiled = mode.compile
        for batch in s.batches:
            headline = batch == max(s.batches)
            todo.append((1 + compiled * (1 if headline else 2), f"diffusion training {mode_name} batch {batch}",
                         lambda mode=mode, batch=batch: sw.compare_diffusion_training(
                             s.preset, s.latent, batch, mode, device, warmup=s.warmup, steps=s.steps,
                             rounds=s.rounds)))
            todo.append((1 + 2 * compiled, f"autoencoder training {mode_name} batch {batch}",
                         lambda mode=mode, batch=batch: sw.compare_autoencoder_training(
                             s.ae_image, s.ae_base, batch, mode, device, warmup=s.warmup, steps=s.steps,
                             rounds=s.rounds)))
        for batch in s.sample_batch:
            for steps in (25, 50):
                headline = batch == max(s.sample_batch) and steps == 50
                todo.append((1 + compiled * (1 if headline else 2), f"sampling DDIM {steps} {mode_name} batch {batch}",
                             lambda mode=mode, batch=batch, steps=steps: sw.compare_sampling(
                                 s.preset, s.latent, batch, steps, mode, device, repeats=s.sample_repeats)))
        if mode_name == s.modes[0]:  # embedding and the search have one mode: the stage's own
            todo.append((1, "embedding", needs("zarr", lambda: sw.compare_embedding(
                s.ae_image, s.ae_base, s.embed_images, 64, device, repeats=s.rounds, workdir=workdir))))
            todo.append((1, "memorization search",
                         lambda: sw.compare_search(*s.search, 4, device, repeats=s.rounds)))
    return [(name, thunk) for _, name, thunk in sorted(todo, key=lambda item: item[0])]  # stable within a tier


class CaseSkipped(Exception):
    """Raised by a case that cannot run here (an optional package is missing); written as skipped."""


def needs(module: str, thunk):
    """``thunk``, or a case that is skipped with a note when ``module`` cannot be imported."""

    def run():
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise CaseSkipped(f"{module} is not installed ({exc}); add its wheels (benchmarks/gpu_wheels.sh)") from None
        return thunk()

    return run


def machine(device: torch.device) -> dict:
    import diffusers

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or 'x86'})"
    return {"device_name": name, "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
            # a busy shared machine slows both sides: the load says how busy it was when the suite started
            "load_average_1m": os.getloadavg()[0], "torch": torch.__version__, "diffusers": diffusers.__version__,
            "python": platform.python_version()}


def line(r: dict) -> str:
    o, b, ratio = r["ours"], r["baseline"], r["ratio"]
    flops = "GFLOP/s" if o["tflop_per_s"] < 1 else "TFLOP/s"
    k = 1e3 if flops == "GFLOP/s" else 1.0
    return (f"{r['stage']:<24} {r['mode']:<16} {r['batch']:>5}  {o['items_per_s']:>12.4g} {b['items_per_s']:>12.4g} "
            f"{ratio['items_per_s']:>6.2f}x  {o['tflop_per_s'] * k:>8.3g} {b['tflop_per_s'] * k:>8.3g} {flops}  "
            f"GFLOP/step {o['gflop_per_step']:.4g} / {b['gflop_per_step']:.4g}  params {o['params'] / 1e6:.3g}M / "
            f"{b['params'] / 1e6:.3g}M")


class CaseStopped(BaseException):
    """Raised in a case that runs past the suite's hard limit (a BaseException: no case code catches it)."""


def _stop_case(signum, frame):
    raise CaseStopped


def markdown(records: list[dict]) -> str:
    """The records of one run as a Markdown table (the README's), skipped and failed cases included."""
    header = ("| stage | mode | batch | ldmflow | baseline | ratio | achieved, ldmflow / baseline | "
              "GFLOP per step, ldmflow / baseline | parameters, ldmflow / baseline |")
    rows = [header, "|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        if "ours" not in r:
            rows.append(f"| {r['case']} | | | {r.get('skipped') or r.get('error')} | | | | | |")
            continue
        o, b = r["ours"], r["baseline"]
        unit, k = ("GFLOP/s", 1e3) if o["tflop_per_s"] < 1 else ("TFLOP/s", 1.0)
        params = f"{o['params'] / 1e6:.3g}M / {b['params'] / 1e6:.3g}M" if b["params"] else "-"
        rows.append(f"| {r['stage']} | {r['mode']} | {r['batch']} | {o['items_per_s']:.4g} {r['unit']} | "
                    f"{b['items_per_s']:.4g} {r['unit']} | **{r['ratio']['items_per_s']:.2f}x** | "
                    f"{o['tflop_per_s'] * k:.3g} / {b['tflop_per_s'] * k:.3g} {unit} | "
                    f"{o['gflop_per_step']:.4g} / {b['gflop_per_step']:.4g} | {params} |")
    return "\n".join(rows)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", choices=sorted(SCALES), help="default: gpu on a CUDA device, cpu otherwise")
    parser.add_argument("--out", help="JSON-lines file to write (one record per comparison)")
    parser.add_argument("--show", metavar="JSONL", help="print an earlier run's records as a Markdown table")
    parser.add_argument("--budget-s", type=float, help="start no case after this many seconds (default: the scale's)")
    parser.add_argument("--hard-limit-s", type=float, help="stop the running case at this many seconds")
    parser.add_argument("--since", type=float, metavar="EPOCH_S",
                        help="count the budget and the limit from this Unix time (gpu_suite.sh: its own start)")
    parser.add_argument("--modes", nargs="+", choices=sorted(sw.MODES), help="override the scale's modes")
    parser.add_argument("--threads", type=int, help="torch's CPU threads (default: the scale's)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--cases", nargs="+", metavar="TEXT",
                        help="run only the cases whose name contains one of these (e.g. embedding 'DDIM 50')")
    args = parser.parse_args(argv)
    if args.show:
        print(markdown([json.loads(line) for line in Path(args.show).read_text().splitlines()]))
        return
    if not args.out:
        parser.error("--out is required (or --show)")

    device = sw.pick_device(args.device)
    scale = SCALES[args.scale or ("gpu" if device.type == "cuda" else "cpu")]
    if args.modes:
        scale = dataclasses.replace(scale, modes=tuple(args.modes))
    budget = args.budget_s if args.budget_s is not None else scale.budget_s
    hard = args.hard_limit_s if args.hard_limit_s is not None else scale.hard_limit_s
    if args.threads or scale.threads:
        torch.set_num_threads(args.threads or scale.threads)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    info = machine(device)
    started = datetime.now(UTC).isoformat(timespec="seconds")
    print(f"scale {args.scale or scale.preset}: {info}; budget {budget:.0f} s, hard limit {hard:.0f} s; "
          f"writing {out}", flush=True)
    print(f"{'stage':<24} {'mode':<16} {'batch':>5}  {'ours/s':>12} {'baseline/s':>12} {'ratio':>7}  "
          f"{'ours':>8} {'baseline':>8}", flush=True)
    # seconds already spent before this point (installs, imports) count against the budget and the limit
    t_start = time.perf_counter() - (time.time() - args.since if args.since else 0.0)
    with tempfile.TemporaryDirectory(prefix="ldmflow-suite-") as tmp, open(out, "w") as fh:
        for name, thunk in cases(scale, device, Path(tmp)):
            if args.cases and not any(text in name for text in args.cases):
                continue
            base = {"case": name, "started": started, **info}
            if time.perf_counter() - t_start > min(budget, hard):
                fh.write(json.dumps({**base, "skipped": f"time budget of {budget:.0f} s spent"}) + "\n")
                print(f"{name}: skipped (budget)", flush=True)
                continue
            t0 = time.perf_counter()
            signal.signal(signal.SIGALRM, _stop_case)
            signal.setitimer(signal.ITIMER_REAL, max(1.0, hard - (t0 - t_start)))
            try:
                result = thunk()
            except CaseSkipped as exc:
                fh.write(json.dumps({**base, "skipped": str(exc)}) + "\n")
                print(f"{name}: skipped ({exc})", flush=True)
                continue
            except CaseStopped:
                fh.write(json.dumps({**base, "skipped": f"stopped at the hard limit of {hard:.0f} s"}) + "\n")
                print(f"{name}: stopped (hard limit)", flush=True)
                continue
            except Exception as exc:  # noqa: BLE001  (a failing case, e.g. a compile error, must not lose the others)
                fh.write(json.dumps({**base, "error": f"{type(exc).__name__}: {exc}",
                                     "traceback": traceback.format_exc()[-4000:]}) + "\n")
                print(f"{name}: FAILED {type(exc).__name__}: {exc}", flush=True)
                continue
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
                # drop the case's compiled graphs and CUDA-graph memory pools before the next case
                torch._dynamo.reset()
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            for r in result if isinstance(result, list) else [result]:
                fh.write(json.dumps({**base, **r, "case_seconds": time.perf_counter() - t0}) + "\n")
                print(line(r), flush=True)
            fh.flush()
    print(f"suite wall time {time.perf_counter() - t_start:.1f} s; records in {out}", flush=True)


if __name__ == "__main__":
    main()
