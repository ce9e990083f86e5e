"""The ``export`` command: a checkpoint as a folder others can load, without ldmflow's checkpoint format.

Usage::

    ldmflow export --checkpoint results/diffusion/NAME/checkpoints/NAME_checkpoint_best.pt --out exported/NAME \\
        [--memorization results/memorization/diffusion/NAME/summary.json]

or, for every diffusion and ControlNet experiment of the workflow, ``snakemake export`` (folders under
``results/export/<stage>/NAME/``). A diffusion UNet becomes a diffusers folder (``config.json`` +
``diffusion_pytorch_model.safetensors``, loaded by ``UNet2DModel.from_pretrained(DIR)``, with
``scheduler/scheduler_config.json`` for ``DDIMScheduler.from_pretrained(DIR, subfolder="scheduler")``) when
its architecture maps exactly, which needs ``model.channel_mult[0] = 1``, level widths of 128 or more that
are multiples of 32 (one GroupNorm group count) and attention widths that are multiples of
``model.head_channels``; otherwise the log names the option and the weights go out as ``model.safetensors``.
A class-conditional UNet takes ``class_labels`` in diffusers; id ``num_classes`` is the unconditional label
of classifier-free guidance. Autoencoders and ControlNets go out as ``model.safetensors`` + ``config.json``
(no diffusers class matches them exactly). Every folder holds ``ldmflow.json`` (config, metadata, checkpoint
sha256, latent scale factor, intensity range, data fingerprint, memorization figures) and a model card
``README.md``, and loads with ``ldmflow.api.load_pretrained(DIR)``; a diffusion or ControlNet folder holds
its autoencoder in ``DIR/autoencoder/``.
"""

from __future__ import annotations

from ldmflow.cli.arguments import _apply_sets, add_command, existing_file, output_dir


def cmd_export(args) -> None:
    from ldmflow.stages.export import export_checkpoint

    _apply_sets(args, ())
    info = export_checkpoint(args.checkpoint, args.out, memorization=args.memorization,
                             autoencoder=args.autoencoder)
    print(f"exported {info.stage} {info.name} to {args.out} ({info.diffusers or 'ldmflow safetensors'})")


def add_commands(sub) -> None:
    p = add_command(sub, "export", cmd_export,
                    "export a checkpoint as safetensors (a diffusers folder for a diffusion UNet) with a model card")
    p.add_argument("--checkpoint", type=existing_file, required=True,
                   help="autoencoder, diffusion or ControlNet checkpoint (.pt)")
    p.add_argument("--out", type=output_dir, required=True, help="output folder (replaced whole)")
    p.add_argument("--memorization", type=existing_file, default=None,
                   help="the memorization audit's summary.json, whose figures go into the model card")
    p.add_argument("--autoencoder", type=existing_file, default=None,
                   help="a moved copy of the autoencoder the model was trained with (default: the recorded path)")
