"""The training commands: ``train-ae``, ``select-ae``, ``train-diffusion`` and ``train-controlnet``."""

from __future__ import annotations

from ldmflow.cli.arguments import (
    _apply_sets,
    add_command,
    add_device_and_threads,
    existing_file,
    existing_path,
    output_dir,
    output_file,
)

LATENTS = (existing_path, "latent store (latents.zarr) from `ldmflow embed`")


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


def add_train_command(sub, name: str, stage: str, help: str, inputs: dict[str, tuple]) -> None:
    """A training command: its experiment file, its ``inputs`` (flag -> (type, help)), the run folder,
    device and threads, and ``--init`` for fine-tuning."""
    p = add_command(sub, name, cmd_train, help)
    p.add_argument("--config", type=existing_file, required=True, help=f"{stage} experiment YAML")
    for flag, (kind, text) in inputs.items():
        p.add_argument(flag, type=kind, required=True, help=text)
    p.add_argument("--out", type=output_dir, required=True, help="run folder RUN_DIR")
    add_device_and_threads(p)
    p.add_argument("--init", default=None, metavar="CHECKPOINT",
                   help="start from this checkpoint's weights (overrides the config's init.from; fresh optimizer)")
    p.set_defaults(stage=stage)


def add_select_ae(sub) -> None:
    p = add_command(sub, "select-ae", cmd_select_ae, "pick the best autoencoder run; write selected.json and a plot")
    p.add_argument("--runs", type=existing_path, nargs="+", required=True, help="autoencoder run folders")
    p.add_argument("--out", type=output_file, required=True, help="path of selected.json")
    p.add_argument("--metric", default="val_loss", help="metrics column to compare (default val_loss)")
    p.add_argument("--mode", default="min", choices=("min", "max"))


def add_commands(sub) -> None:
    add_train_command(sub, "train-ae", "autoencoder",
                      "train one autoencoder experiment (resumes from RUN_DIR's latest)",
                      {"--data": (existing_path, "manifest CSV or folder of images")})
    add_select_ae(sub)
    add_train_command(sub, "train-diffusion", "diffusion",
                      "train one diffusion experiment on a latent store (resumes from RUN_DIR's latest)",
                      {"--latents": LATENTS})
    add_train_command(sub, "train-controlnet", "controlnet",
                      "train one ControlNet experiment on a latent store and a diffusion checkpoint (resumes from "
                      "RUN_DIR)",
                      {"--latents": LATENTS, "--base": (existing_file, "the base diffusion checkpoint (.pt), e.g. "
                                                        "NAME_checkpoint_best.pt")})
