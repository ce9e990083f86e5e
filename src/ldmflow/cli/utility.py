"""The ``utility`` command: how useful a synthetic set is, measured by training on it (train on synthetic, test on
real) with networks of the judge's recipe."""

from __future__ import annotations

import argparse

from ldmflow.cli.arguments import (
    _apply_sets,
    add_command,
    add_device_and_threads,
    existing_file,
    existing_path,
    int_range,
    output_dir,
)


def _range(entry: dict | None) -> str:
    if entry is None:
        return "n/a"
    ci = entry["ci95"]
    return f"{entry['value']:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def cmd_utility(args: argparse.Namespace) -> None:
    import dataclasses

    import torch

    from ldmflow.config.judge import UtilityConfig
    from ldmflow.stages.utility import utility_stage

    keys = (*(f.name for f in dataclasses.fields(UtilityConfig)), "judge")
    _apply_sets(args, keys, {})
    options = {k: getattr(args, k) for k in keys if k != "judge" and hasattr(args, k)}
    if args.threads:
        torch.set_num_threads(args.threads)
    report = utility_stage(args.real, args.synthetic, args.out, options, getattr(args, "judge", None),
                           device=args.device, threads=args.threads or 4, image_size=args.image_size)
    for r in report["synthetic_only_over_real_only"]:
        print(f"synthetic only / real only at {r['ratio']:g}:1: "
              + ", ".join(f"{m} {_range(r[m])}" for m in report["metrics"]))
    for r in report["real_plus_synthetic_gain"]:
        print(f"real + synthetic gain at {r['ratio']:g}:1: "
              + ", ".join(f"{m} {_range(r[m])} ({r[m]['reads']})" for m in report["metrics"]))
    for s in report["skipped"]:
        print(f"ratio {s['ratio']:g}:1 {s['reason']}")
    print(f"wrote {args.out}/utility.json, utility.csv, utility.png (95% intervals: {report['interval']})")


def add_commands(sub) -> None:
    p = add_command(sub, "utility", cmd_utility,
                    "train on a synthetic set, test on real: ratios to real-trained models and gains, with intervals")
    p.add_argument("--real", type=existing_path, required=True,
                   help="the real data: manifest CSV or latent store (its train and val splits)")
    p.add_argument("--synthetic", type=existing_file, required=True,
                   help="the synthetic set's manifest.csv (every row is used, whatever its split)")
    p.add_argument("--out", type=output_dir, required=True, help="output folder (utility.json, .csv, .png)")
    p.add_argument("--image-size", type=int_range(8, 4096), default=None,
                   help="side the images are read at (default: the synthetic images' own)")
    add_device_and_threads(p)
