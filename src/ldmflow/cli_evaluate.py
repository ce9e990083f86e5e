"""The ``ldmflow judge`` and ``ldmflow evaluate`` commands (pixel-space evaluation by the judge), added to the parser
by :mod:`ldmflow.cli`, which passes in its argument types so that both modules check values alike."""

from __future__ import annotations

import argparse


def _options(args: argparse.Namespace, apply_sets) -> dict:
    """The judge options a command's ``--set KEY=VALUE`` gives (nested keys as YAML: ``augment={shift: 3}``)."""
    from ldmflow.config.judge import option_names

    keys = option_names()
    apply_sets(args, keys, {})
    return {k: getattr(args, k) for k in keys if hasattr(args, k)}


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def cmd_judge(args: argparse.Namespace) -> None:
    import torch

    from ldmflow.stages.evaluate import train_judge_stage

    if args.threads:
        torch.set_num_threads(args.threads)
    record = train_judge_stage(args.data, args.out, _options(args, args.apply_sets), device=args.device,
                               threads=args.threads or 4)
    v = record["real_val"]
    print(f"judge: real-val accuracy {_fmt(v.get('accuracy'))}, mIoU {_fmt(v.get('miou'))} on {v['n']} "
          f"{record['held_out_split']} images; wrote {args.out}/judge.pt")


def cmd_evaluate(args: argparse.Namespace) -> None:
    from ldmflow.stages.evaluate import evaluate_controlnet, evaluate_samples

    options = _options(args, args.apply_sets)
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


def add_commands(command, *, apply_sets, existing_path, output_dir, int_range, device_name, training) -> None:
    """Add ``judge`` and ``evaluate`` with ``command(name, func, help)`` (the parser's factory, which adds --set)."""
    p = command("judge", cmd_judge, "train the pixel-space judge on the real train split (judge.pt, judge.json)")
    p.add_argument("action", choices=("train",), help="train: train a judge and check it on the real val split")
    p.add_argument("--data", type=existing_path, required=True,
                   help="latent store (latents.zarr: its split, labels, masks) or manifest CSV")
    p.add_argument("--out", type=output_dir, required=True, help="output folder (judge.pt, judge.json, judge_val.png)")
    training(p)
    p.set_defaults(apply_sets=apply_sets)

    p = command("evaluate", cmd_evaluate,
                "score samples in pixel space with a judge: class fidelity, two-sample test, FD, control fidelity")
    p.add_argument("--judge", type=existing_path, required=True, help="judge.pt from `ldmflow judge train`")
    p.add_argument("--samples", type=existing_path, default=None,
                   help="a samples folder (sample_*.png, samples.zarr) or a samples.zarr")
    p.add_argument("--controlnet", type=existing_path, default=None,
                   help="a ControlNet checkpoint: sample it and its base under the same noise on val-split masks")
    p.add_argument("--n", type=int_range(1, 1_000_000), default=48, help="--controlnet: paired samples (default 48)")
    p.add_argument("--seed", type=int_range(0, 2**32 - 1), default=42, help="--controlnet: sampling seed")
    p.add_argument("--out", type=output_dir, default=None, help="output folder (scores.json, grid.png)")
    p.add_argument("--device", type=device_name, default=None, help="cpu, cuda, cuda:N (default: CUDA when present)")
    p.set_defaults(apply_sets=apply_sets)
