"""The evaluation commands: ``memorization`` (samples against the training set), ``judge`` (train the pixel-space
judge) and ``evaluate`` (score samples with it)."""

from __future__ import annotations

import argparse

from ldmflow.cli.arguments import (
    MAX_IMAGES,
    MAX_SEED,
    _apply_sets,
    add_command,
    add_device,
    add_device_and_threads,
    existing_path,
    int_range,
    output_dir,
)


def cmd_memorization(args) -> None:
    from ldmflow.config.memorization import option_names
    from ldmflow.stages.memorization import evaluate_memorization

    keys = option_names()
    _apply_sets(args, keys)
    options = {k: getattr(args, k) for k in keys if hasattr(args, k)}
    summary = evaluate_memorization(args.train, args.samples, args.out, reference=args.reference,
                                    device=args.device, **options)
    m = summary["memorized"]
    ref = m["reference_false_flag_rate"]
    print(f"{m['count']} of {summary['counts']['generated']} samples memorized ({m['criterion']}, {summary['feature']} "
          f"space; 95% CI {m['ci_low']:.1%}-{m['ci_high']:.1%}; "
          + (f"{'calibrated' if m['calibrated'] else 'UNCALIBRATED'}, held-out false flags {ref['fraction']:.1%})"
             if ref else "UNCALIBRATED: no held-out reference)")
          + f"; wrote {args.out}")


def _judge_options(args: argparse.Namespace) -> dict:
    """The judge options a command's ``--set KEY=VALUE`` gives (nested keys as YAML: ``augment={shift: 3}``)."""
    from ldmflow.config.judge import option_names

    keys = option_names()
    _apply_sets(args, keys, {})
    return {k: getattr(args, k) for k in keys if hasattr(args, k)}


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def cmd_judge(args: argparse.Namespace) -> None:
    import torch

    from ldmflow.stages.evaluate import train_judge_stage

    if args.threads:
        torch.set_num_threads(args.threads)
    record = train_judge_stage(args.data, args.out, _judge_options(args), device=args.device,
                               threads=args.threads or 4)
    v = record["real_val"]
    print(f"judge: real-val accuracy {_fmt(v.get('accuracy'))}, mIoU {_fmt(v.get('miou'))} on {v['n']} "
          f"{record['held_out_split']} images; wrote {args.out}/judge.pt")


def cmd_evaluate(args: argparse.Namespace) -> None:
    from ldmflow.stages.evaluate import evaluate_controlnet, evaluate_samples

    options = _judge_options(args)
    if (args.samples is None) == (args.controlnet is None):
        from ldmflow.errors import ConfigError

        raise ConfigError("give one of --samples (a samples folder or samples.zarr) or --controlnet (a checkpoint)")
    if args.samples is not None:
        scores = evaluate_samples(args.judge, args.samples, args.out, options=options, device=args.device)
    else:
        scores = evaluate_controlnet(args.controlnet, args.judge, args.out, n=args.n, seed=args.seed,
                                     options=options, device=args.device)
    j, cf, ts = scores["judge"], scores["class_fidelity"], scores["two_sample"]
    gen = scores["features"].get("generated") or {}
    print(f"judge (real-val accuracy {_fmt(j['real_val_accuracy'])}, mIoU {_fmt(j['real_val_miou'])}): "
          f"class fidelity {_fmt(cf.get('accuracy')) if cf['available'] else cf['reason']}, "
          f"two-sample accuracy {_fmt(ts.get('accuracy'))} (0.5 = indistinguishable), FD {_fmt(gen.get('fd'))}")
    ctl = scores.get("control_fidelity")
    if ctl is not None:
        base = ctl.get("uncontrolled_base") or {}
        print(f"control fidelity (pixel-space mIoU): {_fmt(ctl['controlled']['miou'])} against "
              f"{_fmt(base.get('miou'))} for the uncontrolled base" if ctl["available"] else ctl["reason"])


def add_memorization(sub) -> None:
    p = add_command(sub, "memorization", cmd_memorization,
                    "compare generated samples with the training set: memorized copies, similarity, quality")
    p.add_argument("--train", type=existing_path, required=True, help="training manifest CSV or latent store (*.zarr)")
    p.add_argument("--samples", type=existing_path, required=True,
                   help="folder of sample PNGs (and samples.zarr), or a samples store")
    p.add_argument("--out", type=output_dir, required=True, help="output folder (per_sample.csv, summary.json, plots)")
    p.add_argument("--reference", type=existing_path, default=None,
                   help="held-out real images (manifest or store); default: the training input's val split")
    add_device(p)


def add_judge(sub) -> None:
    p = add_command(sub, "judge", cmd_judge,
                    "train the pixel-space judge on the real train split (judge.pt, judge.json)")
    p.add_argument("action", choices=("train",), help="train: train a judge and check it on the real val split")
    p.add_argument("--data", type=existing_path, required=True,
                   help="latent store (latents.zarr: its split, labels, masks) or manifest CSV")
    p.add_argument("--out", type=output_dir, required=True, help="output folder (judge.pt, judge.json, judge_val.png)")
    add_device_and_threads(p)


def add_evaluate(sub) -> None:
    p = add_command(sub, "evaluate", cmd_evaluate,
                    "score samples in pixel space with a judge: class fidelity, two-sample test, FD, control fidelity")
    p.add_argument("--judge", type=existing_path, required=True, help="judge.pt from `ldmflow judge train`")
    p.add_argument("--samples", type=existing_path, default=None,
                   help="a samples folder (sample_*.png, samples.zarr) or a samples.zarr")
    p.add_argument("--controlnet", type=existing_path, default=None,
                   help="a ControlNet checkpoint: sample it and its base under the same noise on val-split masks")
    p.add_argument("--n", type=int_range(1, MAX_IMAGES), default=48, help="--controlnet: paired samples (default 48)")
    p.add_argument("--seed", type=int_range(0, MAX_SEED), default=42, help="--controlnet: sampling seed")
    p.add_argument("--out", type=output_dir, default=None, help="output folder (scores.json, grid.png)")
    add_device(p)


def add_commands(sub) -> None:
    add_memorization(sub)
    add_judge(sub)
    add_evaluate(sub)
