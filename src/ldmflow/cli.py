"""The ``ldmflow`` command line: one subcommand per stage, each calling the same function as its rule."""

from __future__ import annotations

import argparse
import logging
import math
import os
import re
import sys
from pathlib import Path

import yaml

from ldmflow.errors import ConfigError

log = logging.getLogger("ldmflow")

# Upper bounds of the plain commands' numbers: far above any real use, low enough that a typo (an extra
# zero, a pasted timestamp) fails at once instead of allocating memory or running for days.
MAX_IMAGES = 1_000_000
MAX_IMAGE_SIZE = 4096
MAX_SEED = 2**32 - 1  # numpy's and torch's seeds both accept 0..2**32-1
MAX_GUIDANCE = 100.0  # classifier-free guidance beyond ~20 saturates every pixel; 100 leaves room for experiments


# --------------------------------------------------------------------------------------------------
# Argument types: every value is checked when the command line is parsed, so a bad one is a usage error
# (exit 2, one line naming the option and what is allowed) before any work starts.
# --------------------------------------------------------------------------------------------------


def number_range(kind: type, minimum: float, maximum: float):
    """An argparse ``type=``: an ``int`` or a finite ``float`` in ``minimum..maximum`` (NaN and infinity are
    refused)."""
    word, fmt = ("an integer", "{}") if kind is int else ("a number", "{:g}")
    allowed = f"allowed: {fmt.format(minimum)}..{fmt.format(maximum)}"

    def parse(text: str):
        try:
            value = kind(str(text).strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {word}; {allowed}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number; {allowed}")
        if not minimum <= value <= maximum:
            raise argparse.ArgumentTypeError(f"{fmt.format(value)} is out of range; {allowed}")
        return value

    return parse


def int_range(minimum: int, maximum: int):
    """An argparse ``type=``: an integer in ``minimum..maximum``."""
    return number_range(int, minimum, maximum)


def float_range(minimum: float, maximum: float):
    """An argparse ``type=``: a finite number in ``minimum..maximum``."""
    return number_range(float, minimum, maximum)


def _path(text: str) -> Path:
    text = str(text)
    if not text.strip() or "\0" in text:
        raise argparse.ArgumentTypeError(f"{text!r} is not a path")
    return Path(text)


def existing_path(text: str) -> Path:
    """An argparse ``type=``: a file or folder that exists."""
    path = _path(text)
    if not path.exists():
        raise argparse.ArgumentTypeError(f"{text!r} does not exist")
    return path


def existing_file(text: str) -> Path:
    """An argparse ``type=``: a file that exists (not a folder)."""
    path = existing_path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{text!r} is a folder; give a file")
    return path


def _creatable(path: Path, text: str) -> None:
    """The nearest existing parent of ``path`` must be a writable folder."""
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} cannot be created: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"{text!r} cannot be created: {parent} is not writable")


def output_dir(text: str) -> Path:
    """An argparse ``type=``: an output folder that exists, or can be created (never an existing file)."""
    path = _path(text)
    if path.exists():
        if not path.is_dir():
            raise argparse.ArgumentTypeError(f"{text!r} is a file; give a folder (existing or new)")
        if not os.access(path, os.W_OK | os.X_OK):
            raise argparse.ArgumentTypeError(f"{text!r} is not writable")
    else:
        _creatable(path, text)
    return path


def output_file(text: str) -> Path:
    """An argparse ``type=``: an output file (replaced when it exists) whose folder exists or can be created."""
    path = _path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a folder; give a file name")
    if not path.exists():
        _creatable(path, text)
    return path


DEVICE = re.compile(r"(auto|cpu|mps|cuda(:\d+)?)")


def device_name(text: str) -> str:
    """An argparse ``type=``: auto, cpu, mps, cuda or cuda:N, refused when this machine lacks it."""
    text = str(text).strip()
    if not DEVICE.fullmatch(text):
        raise argparse.ArgumentTypeError(f"{text!r}; allowed: auto, cpu, cuda, cuda:N, mps")
    if text.startswith("cuda"):
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(text.partition(":")[2] or 0)
        if index >= count:
            raise argparse.ArgumentTypeError(f"{text!r}: this machine has {count} CUDA device(s)")
    if text == "mps":
        import torch

        if not torch.backends.mps.is_available():
            raise argparse.ArgumentTypeError("'mps': not available on this machine")
    return text


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


def _apply_sets(args: argparse.Namespace, allowed: tuple[str, ...],
                types: dict[str, argparse.Action] | None = None) -> None:
    """For commands without a config file, ``--set key=value`` sets one of the command's options.

    A key that is also an option of the command is checked like the option (``--set steps=0`` is refused
    as ``--steps 0`` is); other keys (the memorization options) are parsed as YAML and validated later.
    """
    types = types if types is not None else getattr(args, "set_types", None) or {}
    for item in args.set or []:
        key, sep, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in allowed:
            raise ConfigError(f"--set {item!r}: allowed keys for this command: {', '.join(allowed)}")
        action = types.get(key)
        if action is not None:
            try:
                value = action.type(raw) if action.type else raw
            except argparse.ArgumentTypeError as exc:
                raise ConfigError(f"--set {key}: {exc}") from None
            if action.choices is not None and value not in action.choices:
                raise ConfigError(f"--set: key {key!r} has value {value!r}; allowed: "
                                  f"{', '.join(map(str, action.choices))}")
        else:
            try:
                value = yaml.safe_load(raw)
            except yaml.YAMLError as exc:
                raise ConfigError(f"--set {item!r}: not a YAML value ({str(exc).splitlines()[0]})") from None
        setattr(args, key, value)


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


def cmd_train(args) -> None:
    """train-ae, train-diffusion, train-controlnet: one experiment of the command's stage."""
    from ldmflow.stages import trainer

    inputs = {"manifest": args.data} if args.stage == "autoencoder" else {"latents": args.latents}
    if args.stage == "controlnet":
        inputs["base"] = args.base
    result = trainer(args.stage)(args.config, **inputs, out_dir=args.out, overrides=args.set or (),
                                 device=args.device, threads=args.threads, init=args.init)
    print_best(result)
    fidelity = result.get("control_fidelity") or {}
    if fidelity.get("available") and "controlled" in fidelity:
        print(f"control mIoU {fidelity['controlled']['miou']:.4f} (uncontrolled base "
              f"{fidelity['uncontrolled_base']['miou']:.4f})")


def cmd_select_ae(args) -> None:
    from ldmflow.stages.select_autoencoder import select_autoencoder

    _apply_sets(args, ("metric", "mode"))
    result = select_autoencoder(args.runs, args.out, metric=args.metric, mode=args.mode)
    print(f"selected {result['name']} ({result['metric']} = {result['value']:.6g}): {result['checkpoint']}")


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
    from ldmflow.checkpoints import checkpoint_stage
    from ldmflow.errors import SamplingError
    from ldmflow.stages.sample import sample_checkpoint
    from ldmflow.stages.sample_controlnet import sample_controlnet

    _apply_sets(args, ("n", "class_id", "guidance", "sampler", "steps", "seed", "batch_size", "control", "scale"))
    if checkpoint_stage(args.checkpoint) == "controlnet":
        if args.control is None:
            raise SamplingError(f"{args.checkpoint} is a ControlNet checkpoint: give --control (a row index of its "
                                "latent store, or an image file)")
        result = sample_controlnet(args.checkpoint, args.control, args.n, args.out, scale=parse_scale(args.scale),
                                   class_id=args.class_id, guidance=args.guidance, sampler=args.sampler,
                                   steps=args.steps, seed=args.seed, device=args.device, batch_size=args.batch_size,
                                   data_values=args.data_values)
        print(f"wrote {result['n']} samples to {result['out']}")
        return
    if args.control is not None or args.scale is not None:
        raise SamplingError("--control and --scale need a ControlNet checkpoint")
    result = sample_checkpoint(args.checkpoint, args.n, args.out, class_id=args.class_id, guidance=args.guidance,
                               sampler=args.sampler, steps=args.steps, seed=args.seed, device=args.device,
                               batch_size=args.batch_size, data_values=args.data_values)
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
    m = summary["memorized"]
    ref = m["reference_false_flag_rate"]
    print(f"{m['count']} of {summary['counts']['generated']} samples memorized ({m['criterion']}, {summary['feature']} "
          f"space; 95% CI {m['ci_low']:.1%}-{m['ci_high']:.1%}; "
          + (f"{'calibrated' if m['calibrated'] else 'UNCALIBRATED'}, held-out false flags {ref['fraction']:.1%})"
             if ref else "UNCALIBRATED: no held-out reference)")
          + f"; wrote {args.out}")


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
    parser.add_argument("--log-file", type=output_file, help="also write the log to this file")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--debug", action="store_true",
                        help="show the Python traceback of a user error too (or set LDMFLOW_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, func, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(func=func)
        p.add_argument("--set", action="append", metavar="KEY=VALUE",
                       help="override a config key (dotted.key=value, value parsed as YAML); repeatable")
        return p

    def training(p: argparse.ArgumentParser) -> None:
        p.add_argument("--device", type=device_name, default=None, help="cpu, cuda, cuda:N (default: CUDA when present)")
        p.add_argument("--threads", type=int_range(1, 1024), default=None, help="CPU threads for torch and data loading")

    def train_command(name: str, stage: str, help: str, inputs: dict[str, tuple]) -> None:
        """A training command: its experiment file, its ``inputs`` (flag -> (type, help)), the run folder,
        device and threads, and ``--init`` for fine-tuning."""
        p = command(name, cmd_train, help)
        p.add_argument("--config", type=existing_file, required=True, help=f"{stage} experiment YAML")
        for flag, (kind, text) in inputs.items():
            p.add_argument(flag, type=kind, required=True, help=text)
        p.add_argument("--out", type=output_dir, required=True, help="run folder RUN_DIR")
        training(p)
        p.add_argument("--init", default=None, metavar="CHECKPOINT",
                       help="start from this checkpoint's weights (overrides the config's init.from; fresh optimizer)")
        p.set_defaults(stage=stage)

    latents = (existing_path, "latent store (latents.zarr) from `ldmflow embed`")

    p = command("demo-data", cmd_demo_data, "write the built-in procedural demo dataset and its manifest.csv")
    p.add_argument("--out", type=output_dir, required=True, help="output folder")
    p.add_argument("--n", type=int_range(2, MAX_IMAGES), default=256, help="number of images")
    p.add_argument("--size", type=int_range(8, MAX_IMAGE_SIZE), default=32, help="image side in pixels")
    p.add_argument("--seed", type=int_range(0, MAX_SEED), default=42)

    train_command("train-ae", "autoencoder", "train one autoencoder experiment (resumes from RUN_DIR's latest)",
                  {"--data": (existing_path, "manifest CSV or folder of images")})

    p = command("select-ae", cmd_select_ae, "pick the best autoencoder run; write selected.json and a plot")
    p.add_argument("--runs", type=existing_path, nargs="+", required=True, help="autoencoder run folders")
    p.add_argument("--out", type=output_file, required=True, help="path of selected.json")
    p.add_argument("--metric", default="val_loss", help="metrics column to compare (default val_loss)")
    p.add_argument("--mode", default="min", choices=("min", "max"))

    train_command("train-diffusion", "diffusion",
                  "train one diffusion experiment on a latent store (resumes from RUN_DIR's latest)",
                  {"--latents": latents})
    train_command("train-controlnet", "controlnet",
                  "train one ControlNet experiment on a latent store and a diffusion checkpoint (resumes from RUN_DIR)",
                  {"--latents": latents, "--base": (existing_file, "the base diffusion checkpoint (.pt), e.g. "
                                                    "NAME_checkpoint_best.pt")})

    p = command("sample", cmd_sample,
                "generate images from a diffusion or ControlNet checkpoint (PNGs, grid.png, samples.zarr)")
    p.add_argument("--checkpoint", type=existing_file, required=True, help="diffusion or ControlNet checkpoint (.pt)")
    p.add_argument("--n", type=int_range(1, MAX_IMAGES), default=16, help="number of samples")
    p.add_argument("--out", type=output_dir, required=True,
                   help="output folder (sample PNGs, grid.png and samples.zarr of an earlier call are replaced)")
    p.add_argument("--class", dest="class_id", default=None,
                   help="class name or index (default: cycle classes); class-conditional models only")
    p.add_argument("--guidance", type=float_range(0.0, MAX_GUIDANCE), default=None,
                   help="classifier-free guidance scale (default: config); class-conditional models only")
    p.add_argument("--sampler", choices=("ddpm", "ddim", "dpmpp_2m"), default=None, help="default: config")
    p.add_argument("--steps", type=int_range(1, 100_000), default=None,
                   help="sampling steps, at most the model's trained timesteps (default: config)")
    p.add_argument("--control", default=None, metavar="PATH_OR_INDEX",
                   help="ControlNet checkpoints: the control, a row index of the latent store or an image file "
                   "(a mask PNG, an image for edges, or a control image) of the autoencoder's image size")
    p.add_argument("--scale", default=None, metavar="S",
                   help="ControlNet conditioning scale: a number, or one per UNet level as 1,0.5 (default: config)")
    p.add_argument("--seed", type=int_range(0, MAX_SEED), default=42)
    p.add_argument("--batch-size", type=int_range(1, 65536), default=64)
    p.add_argument("--device", type=device_name, default=None, help="cpu, cuda, cuda:N (default: CUDA when present)")
    p.add_argument("--data-values", action="store_true",
                   help="also write OUT/data/ samples in the data's own bit depth and channels (16-bit PNG, "
                   "multi-page TIFF)")

    p = command("embed", cmd_embed, "encode every image with an autoencoder into a zarr latent store")
    p.add_argument("--checkpoint", type=existing_file, required=True,
                   help="autoencoder checkpoint .pt, or the selected.json naming one")
    p.add_argument("--data", type=existing_path, required=True, help="manifest CSV or folder of images")
    p.add_argument("--out", type=output_dir, required=True, help="the store to write, e.g. latents.zarr")
    p.add_argument("--batch-size", type=int_range(1, 65536), default=64, help="images per encoder batch (default 64)")
    p.add_argument("--dtype", default="float16", choices=("float16", "float32"), help="latent dtype (default float16)")
    training(p)

    p = command("memorization", cmd_memorization,
                "compare generated samples with the training set: memorized copies, similarity, quality")
    p.add_argument("--train", type=existing_path, required=True, help="training manifest CSV or latent store (*.zarr)")
    p.add_argument("--samples", type=existing_path, required=True,
                   help="folder of sample PNGs (and samples.zarr), or a samples store")
    p.add_argument("--out", type=output_dir, required=True, help="output folder (per_sample.csv, summary.json, plots)")
    p.add_argument("--reference", type=existing_path, default=None,
                   help="held-out real images (manifest or store); default: the training input's val split")
    p.add_argument("--device", type=device_name, default=None, help="cpu, cuda, cuda:N (default: CUDA when present)")

    from ldmflow.cli_evaluate import add_commands

    add_commands(command, apply_sets=_apply_sets, existing_path=existing_path, output_dir=output_dir,
                 int_range=int_range, device_name=device_name, training=training)

    p = command("status", cmd_status, "one table of every experiment of the workflow: state, epoch, best, ETA")
    p.add_argument("--results", default="results", help="the workflow's results folder (default results)")
    p.add_argument("--config", default="config/config.yaml", help="workflow config (default config/config.yaml)")
    p.add_argument("--watch", type=float, default=None, metavar="SECONDS", help="refresh every SECONDS")
    p.add_argument("--json", action="store_true", help="print JSON (one object per experiment) for scripts")

    p = command("schemas", cmd_schemas, "write the JSON schemas of the experiment files (for editors and docs)")
    p.add_argument("--out", type=output_dir, default="config/schemas", help="output folder (default config/schemas)")

    for p in sub.choices.values():  # --set KEY=VALUE of a plain command is checked like its option --KEY
        p.set_defaults(set_types={a.dest: a for a in p._actions if a.type is not None or a.choices is not None})
    return parser


def debug_requested(args: argparse.Namespace, environ) -> bool:
    """``--debug`` or ``LDMFLOW_DEBUG=1``: user errors show their traceback too."""
    return bool(getattr(args, "debug", False)) or environ.get("LDMFLOW_DEBUG", "").strip().lower() not in (
        "", "0", "false", "no")


def main(argv: list[str] | None = None) -> int:
    """Run one command; return its exit code (see ``ldmflow.errors``: 0 done, 2 user error, 143 preempted,
    1 training cannot go on). A bug (any other exception) propagates with its traceback."""
    from ldmflow.errors import Preempted, exit_code
    from ldmflow.training.distributed import init_from_env, shutdown

    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse printed the usage line and the error (exit 2), or --help (exit 0)
        return exc.code if isinstance(exc.code, int) else 2
    debug = debug_requested(args, os.environ)
    try:
        init_from_env(os.environ)  # first: under torchrun, logging is quieter on ranks > 0
        setup_logging(args.log_file, logging.DEBUG if args.verbose else logging.INFO)
        args.func(args)
    except Exception as exc:
        code = exit_code(exc)
        if code is None:
            raise
        (log.warning if isinstance(exc, Preempted) else log.error)("%s", exc, exc_info=debug)
        return code
    finally:
        shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
