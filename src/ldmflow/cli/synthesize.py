"""The ``synthesize`` command: a synthetic labelled set of a diffusion or mask ControlNet checkpoint, in the input's
own format, and with ``--release`` its calibrated memorization audit and the release of the audited set."""

from __future__ import annotations

from pathlib import Path

from ldmflow.cli.arguments import (
    MAX_IMAGES,
    MAX_SEED,
    _apply_sets,
    add_command,
    add_device,
    existing_file,
    int_range,
    output_dir,
)
from ldmflow.errors import ConfigError


def parse_classes(text: str) -> str | dict[str, float]:
    """``--classes``: balanced, train, or a table ``name=fraction,name=fraction``."""
    if text in ("balanced", "train"):
        return text
    table = {}
    for item in str(text).split(","):
        name, sep, value = item.partition("=")
        try:
            table[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep or not name.strip():
            raise ConfigError(f"--classes {text!r}: give balanced, train, or name=fraction,name=fraction")
    return table


def parse_augment(text: str | None) -> list[str]:
    """``--augment hflip,rot90`` (ControlNets): the flips and turns of the drawn control masks."""
    return [a.strip() for a in str(text).split(",") if a.strip()] if text else []


def cmd_synthesize(args) -> None:
    from ldmflow.artifacts import load_checkpoint
    from ldmflow.checkpoints import checkpoint_stage
    from ldmflow.config.memorization import option_names
    from ldmflow.stages.memorization import evaluate_memorization
    from ldmflow.stages.release import release
    from ldmflow.stages.synthesize import synthesize

    keys = option_names()
    _apply_sets(args, keys)
    experiment = load_checkpoint(args.checkpoint).get("config", {}).get("name", Path(args.out).name)
    options = {"model": f"{checkpoint_stage(args.checkpoint)}/{experiment}", "name": Path(args.out).name,
               "n": args.n, "classes": parse_classes(args.classes), "seed": args.seed,
               "augment": parse_augment(args.augment), "batch_size": args.batch_size}
    record = synthesize(args.checkpoint, args.out, options, device=args.device)
    print(f"wrote {record['n']} synthetic images of {record['model']} to {args.out} ("
          + ", ".join(f"{k} {v}" for k, v in record["counts"].items()) + ")")
    if args.release is None:
        return
    audit = Path(args.out) / "audit"
    memorization = {k: getattr(args, k) for k in keys if hasattr(args, k)}
    evaluate_memorization(record["latents"], Path(args.out) / "manifest.csv", audit, device=args.device,
                          **{"criterion": "calibrated", **memorization})
    card = release(args.out, audit, args.release, utility=Path(args.out) / "utility.json")
    a = card["audit"]
    print(f"released {sum(card['counts']['released'].values())} images to {args.release}; {a['flagged']} withheld "
          f"by the audit (flagged {a['flagged_fraction']:.1%}, 95% CI {a['flagged_ci95'][0]:.1%}-"
          f"{a['flagged_ci95'][1]:.1%}; false-flag bound {a['false_flag_bound']:.1%})")


def add_commands(sub) -> None:
    p = add_command(sub, "synthesize", cmd_synthesize,
                    "write a synthetic labelled data set (images, masks, manifest.csv, dataset.json) of a checkpoint; "
                    "--release DIR also audits it for memorization and publishes the audited set with a card")
    p.add_argument("--checkpoint", type=existing_file, required=True,
                   help="diffusion or mask ControlNet checkpoint (.pt)")
    p.add_argument("--out", type=output_dir, required=True, help="output folder (replaced whole)")
    p.add_argument("--n", type=int_range(1, MAX_IMAGES), default=64, help="images in the set")
    p.add_argument("--classes", default="balanced",
                   help="class mix: balanced, train (the train split's frequencies) or name=fraction,name=fraction")
    p.add_argument("--augment", default=None, metavar="hflip,rot90",
                   help="ControlNets: flip and/or turn the drawn train masks at random")
    p.add_argument("--seed", type=int_range(0, MAX_SEED), default=0)
    p.add_argument("--batch-size", type=int_range(1, 65536), default=64)
    p.add_argument("--release", type=output_dir, default=None, metavar="DIR",
                   help="audit the set (calibrated memorization test, --set KEY=VALUE for its options) and publish it "
                   "to DIR, flagged images withheld; stops, publishing nothing, when the set looks memorized")
    add_device(p)
