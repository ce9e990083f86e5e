"""The ``ldmflow`` command line: one subcommand per stage, each calling the same function as its rule."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import yaml

from ldmflow.errors import ConfigError

log = logging.getLogger("ldmflow")


def setup_logging(log_file: str | Path | None = None, level: int = logging.INFO) -> None:
    """Log to stderr, and to ``log_file`` too when given (the rules pass their ``log:`` file).

    Under DDP only rank 0 logs below WARNING, so a log file reads like a single-process run's.
    """
    from ldmflow.training.distributed import rank

    if rank() > 0:
        level = max(level, logging.WARNING)
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file, mode="a"))
    logging.basicConfig(level=level, handlers=handlers, force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def _apply_sets(args: argparse.Namespace, allowed: tuple[str, ...]) -> None:
    """For commands without a config file, ``--set key=value`` sets one of the command's options."""
    for item in args.set or []:
        key, sep, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in allowed:
            raise ConfigError(f"--set {item!r}: allowed keys for this command: {', '.join(allowed)}")
        setattr(args, key, yaml.safe_load(raw))


def cmd_demo_data(args) -> None:
    from ldmflow.data.demo import write_demo_data

    _apply_sets(args, ("n", "size", "seed"))
    path = write_demo_data(args.out, n=args.n, size=args.size, seed=args.seed)
    print(path)


def print_best(result: dict) -> None:
    """The best epoch of a training run, printed once (by rank 0 under DDP)."""
    from ldmflow.training.distributed import rank

    if rank() == 0:
        best = result["best"]
        print(f"best {best['metric']} = {best['value']:.6g} at epoch {best['epoch']}")


def cmd_train_ae(args) -> None:
    from ldmflow.stages.train_autoencoder import train_autoencoder

    result = train_autoencoder(args.config, args.data, args.out, overrides=args.set or (), device=args.device,
                               threads=args.threads)
    print_best(result)


def cmd_select_ae(args) -> None:
    from ldmflow.stages.select_autoencoder import select_autoencoder

    _apply_sets(args, ("metric", "mode"))
    result = select_autoencoder(args.runs, args.out, metric=args.metric, mode=args.mode)
    print(f"selected {result['name']} ({result['metric']} = {result['value']:.6g}): {result['checkpoint']}")


def cmd_train_diffusion(args) -> None:
    from ldmflow.stages.train_diffusion import train_diffusion

    result = train_diffusion(args.config, args.latents, args.out, overrides=args.set or (), device=args.device,
                             threads=args.threads)
    print_best(result)


def cmd_train_controlnet(args) -> None:
    from ldmflow.stages.train_controlnet import train_controlnet

    result = train_controlnet(args.config, args.latents, args.base, args.out, overrides=args.set or (),
                              device=args.device, threads=args.threads)
    print_best(result)
    fidelity = result["control_fidelity"]
    if fidelity["available"] and "controlled" in fidelity:
        print(f"control mIoU {fidelity['controlled']['miou']:.4f} (uncontrolled base "
              f"{fidelity['uncontrolled_base']['miou']:.4f})")


def parse_scale(text: str | float | list | None) -> float | list[float] | None:
    """``--scale``: one number, or comma-separated numbers, one per UNet level."""
    if text is None:
        return None
    try:
        values = [float(v) for v in (text if isinstance(text, list) else str(text).split(","))]
    except ValueError:
        raise ConfigError(f"--scale {text!r}: give a number or comma-separated numbers (one per UNet level)") from None
    if min(values) < 0:
        raise ConfigError(f"--scale {text!r}: conditioning scales must be >= 0")
    return values[0] if len(values) == 1 else values


def cmd_sample(args) -> None:
    from ldmflow.errors import SamplingError
    from ldmflow.stages.sample import sample_checkpoint
    from ldmflow.stages.sample_controlnet import checkpoint_stage, sample_controlnet

    _apply_sets(args, ("n", "class_id", "guidance", "sampler", "steps", "seed", "batch_size", "control", "scale"))
    if checkpoint_stage(args.checkpoint) == "controlnet":
        if args.control is None:
            raise SamplingError(f"{args.checkpoint} is a ControlNet checkpoint: give --control (a row index of its "
                                "latent store, or an image file)")
        result = sample_controlnet(args.checkpoint, args.control, args.n, args.out, scale=parse_scale(args.scale),
                                   class_id=args.class_id, guidance=args.guidance, sampler=args.sampler,
                                   steps=args.steps, seed=args.seed, device=args.device, batch_size=args.batch_size)
        print(f"wrote {result['n']} samples to {result['out']}")
        return
    if args.control is not None or args.scale is not None:
        raise SamplingError("--control and --scale need a ControlNet checkpoint")
    result = sample_checkpoint(args.checkpoint, args.n, args.out, class_id=args.class_id, guidance=args.guidance,
                               sampler=args.sampler, steps=args.steps, seed=args.seed, device=args.device,
                               batch_size=args.batch_size)
    print(f"wrote {result['n']} samples to {result['out']}")


def cmd_embed(args) -> None:
    from ldmflow.stages.embed import embed_latents

    _apply_sets(args, ("batch_size", "dtype"))
    print(embed_latents(args.checkpoint, args.data, args.out, batch_size=args.batch_size, dtype=args.dtype,
                        device=args.device, threads=args.threads))
def cmd_memorization(args) -> None:
    from ldmflow.config.memorization import option_names
    from ldmflow.stages.memorization import evaluate_memorization

    keys = option_names()
    _apply_sets(args, keys)
    options = {k: getattr(args, k) for k in keys if hasattr(args, k)}
    summary = evaluate_memorization(args.train, args.samples, args.out, reference=args.reference,
                                    device=args.device, **options)
    flagged = summary["memorized"]
    print(f"{flagged['count']} of {summary['counts']['generated']} samples memorized ({flagged['criterion']}, "
          f"{summary['feature']} space); wrote {args.out}")


def cmd_status(args) -> None:
    import time

    from rich.console import Console

    from ldmflow.status import as_json, render, workflow_status

    console = Console()
    if not console.is_terminal:  # a pipe or a file: whole rows, no wrapping at 80 columns
        console = Console(width=160)
    try:
        while True:
            rows = workflow_status(args.config, args.results)
            if args.json:
                import json

                print(json.dumps(as_json(rows), indent=1), flush=True)
            else:
                title = f"{args.results}  {time.strftime('%Y-%m-%d %H:%M:%S')}"
                if args.watch:
                    title += f"  (every {args.watch:g} s; Ctrl-C stops)"
                    if console.is_terminal:
                        console.clear()
                console.print(render(rows, title=title))
            if not args.watch:
                return
            time.sleep(args.watch)
    except KeyboardInterrupt:
        return


def cmd_schemas(args) -> None:
    from ldmflow.config.loading import schema_documents

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, text in schema_documents().items():
        (out / name).write_text(text)
        print(out / name)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ldmflow", description=__doc__)
    parser.add_argument("--log-file", help="also write the log to this file")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, func, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(func=func)
        p.add_argument("--set", action="append", metavar="KEY=VALUE",
                       help="override a config key (dotted.key=value, value parsed as YAML); repeatable")
        return p

    def training(p: argparse.ArgumentParser) -> None:
        p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: CUDA when present)")
        p.add_argument("--threads", type=int, default=None, help="CPU threads for torch and data loading")

    p = command("demo-data", cmd_demo_data, "write the built-in procedural demo dataset and its manifest.csv")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--n", type=int, default=256, help="number of images")
    p.add_argument("--size", type=int, default=32, help="image side in pixels")
    p.add_argument("--seed", type=int, default=42)

    p = command("train-ae", cmd_train_ae, "train one autoencoder experiment (resumes from RUN_DIR's latest)")
    p.add_argument("--config", required=True, help="autoencoder experiment YAML")
    p.add_argument("--data", required=True, help="manifest CSV or folder of images")
    p.add_argument("--out", required=True, help="run folder RUN_DIR")
    training(p)

    p = command("select-ae", cmd_select_ae, "pick the best autoencoder run; write selected.json and a plot")
    p.add_argument("--runs", nargs="+", required=True, help="autoencoder run folders")
    p.add_argument("--out", required=True, help="path of selected.json")
    p.add_argument("--metric", default="val_loss", help="metrics column to compare (default val_loss)")
    p.add_argument("--mode", default="min", choices=("min", "max"))

    p = command("train-diffusion", cmd_train_diffusion,
                "train one diffusion experiment on a latent store (resumes from RUN_DIR's latest)")
    p.add_argument("--config", required=True, help="diffusion experiment YAML")
    p.add_argument("--latents", required=True, help="latent store (latents.zarr) from `ldmflow embed`")
    p.add_argument("--out", required=True, help="run folder RUN_DIR")
    training(p)

    p = command("train-controlnet", cmd_train_controlnet,
                "train one ControlNet experiment on a latent store and a diffusion checkpoint (resumes from RUN_DIR)")
    p.add_argument("--config", required=True, help="ControlNet experiment YAML")
    p.add_argument("--latents", required=True, help="latent store (latents.zarr) from `ldmflow embed`")
    p.add_argument("--base", required=True, help="the base diffusion checkpoint (.pt), e.g. NAME_checkpoint_best.pt")
    p.add_argument("--out", required=True, help="run folder RUN_DIR")
    training(p)

    p = command("sample", cmd_sample,
                "generate images from a diffusion or ControlNet checkpoint (PNGs, grid.png, samples.zarr)")
    p.add_argument("--checkpoint", required=True, help="diffusion or ControlNet checkpoint (.pt)")
    p.add_argument("--n", type=int, default=16, help="number of samples")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--class", dest="class_id", default=None, help="class name or index (default: cycle classes)")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (default: config)")
    p.add_argument("--sampler", choices=("ddpm", "ddim", "dpmpp_2m"), default=None, help="default: config")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: config)")
    p.add_argument("--control", default=None, metavar="PATH_OR_INDEX",
                   help="ControlNet checkpoints: the control, a row index of the latent store or an image file "
                   "(a mask PNG, an image for edges, or a control image) of the autoencoder's image size")
    p.add_argument("--scale", default=None, metavar="S",
                   help="ControlNet conditioning scale: a number, or one per UNet level as 1,0.5 (default: config)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: CUDA when present)")

    p = command("embed", cmd_embed, "encode every image with an autoencoder into a zarr latent store")
    p.add_argument("--checkpoint", required=True, help="autoencoder checkpoint .pt, or the selected.json naming one")
    p.add_argument("--data", required=True, help="manifest CSV or folder of images")
    p.add_argument("--out", required=True, help="the store to write, e.g. latents.zarr")
    p.add_argument("--batch-size", type=int, default=64, help="images per encoder batch (default 64)")
    p.add_argument("--dtype", default="float16", choices=("float16", "float32"), help="latent dtype (default float16)")
    training(p)

    p = command("memorization", cmd_memorization,
                "compare generated samples with the training set: memorized copies, similarity, quality")
    p.add_argument("--train", required=True, help="training manifest CSV or latent store (*.zarr)")
    p.add_argument("--samples", required=True, help="folder of sample PNGs (and samples.zarr), or a samples store")
    p.add_argument("--out", required=True, help="output folder (per_sample.csv, summary.json, plots)")
    p.add_argument("--reference", default=None,
                   help="held-out real images (manifest or store); default: the training input's val split")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: CUDA when present)")

    p = command("status", cmd_status, "one table of every experiment of the workflow: state, epoch, best, ETA")
    p.add_argument("--results", default="results", help="the workflow's results folder (default results)")
    p.add_argument("--config", default="config/config.yaml", help="workflow config (default config/config.yaml)")
    p.add_argument("--watch", type=float, default=None, metavar="SECONDS", help="refresh every SECONDS")
    p.add_argument("--json", action="store_true", help="print JSON (one object per experiment) for scripts")

    p = command("schemas", cmd_schemas, "write the JSON schemas of the experiment files (for editors and docs)")
    p.add_argument("--out", default="config/schemas", help="output folder (default config/schemas)")

    return parser


def main(argv: list[str] | None = None) -> int:
    from ldmflow.errors import Preempted, exit_code
    from ldmflow.training.distributed import init_from_env, shutdown

    args = build_parser().parse_args(argv)
    try:
        init_from_env(os.environ)  # first: under torchrun, logging is quieter on ranks > 0
        setup_logging(args.log_file, logging.DEBUG if args.verbose else logging.INFO)
        args.func(args)
    except Exception as exc:
        code = exit_code(exc)
        if code is None:
            raise
        (log.warning if isinstance(exc, Preempted) else log.error)("%s", exc)
        return code
    finally:
        shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
