from pathlib import Path

from ldmflow.workflow import (
    controlnet_bases,
    controlnets_for_data,
    experiments,
    manifest_path,
)

AUTOENCODERS = experiments(config["autoencoders"], "autoencoder")
DIFFUSION = experiments(config["diffusion"], "diffusion")
CONTROLNETS = controlnets_for_data(
    experiments(config["controlnets"], "controlnet"), manifest_path(config)
)
CONTROLNET_BASES = controlnet_bases(CONTROLNETS, DIFFUSION)


wildcard_constraints:
    name="[A-Za-z0-9_.-]+",
    stage="autoencoder|diffusion|controlnet",


def manifest():
    return manifest_path(config)


def autoencoder_config(wildcards):
    return AUTOENCODERS[wildcards.name]


def diffusion_config(wildcards):
    return DIFFUSION[wildcards.name]


def controlnet_config(wildcards):
    return CONTROLNETS[wildcards.name]


def controlnet_base_metrics(wildcards):
    """The metrics CSV of the diffusion run a ControlNet experiment names as its base (it stands for the run)."""
    base = CONTROLNET_BASES[wildcards.name]
    return f"results/diffusion/{base}/{base}_metrics.csv"


def controlnet_base_checkpoint(wildcards):
    """The best checkpoint of a ControlNet experiment's base diffusion run."""
    base = CONTROLNET_BASES[wildcards.name]
    return f"results/diffusion/{base}/checkpoints/{base}_checkpoint_best.pt"


def evaluated_experiments():
    """Every experiment whose samples are checked for memorization, as 'stage/name'."""
    return [f"diffusion/{name}" for name in DIFFUSION] + [
        f"controlnet/{name}" for name in CONTROLNETS
    ]


def memorization_summaries():
    return [
        f"results/memorization/{exp}/summary.json" for exp in evaluated_experiments()
    ]


def parent_of_input_grid(wildcards, input):
    """The folder of a rule's sample grid (the evaluation samples folder)."""
    return str(Path(input.grid).parent)


def all_outputs():
    return [
        "results/autoencoder/selected.json",
        *expand("results/diffusion/{name}/eval_samples/grid.png", name=DIFFUSION),
        "results/memorization/summary.csv",
        *expand("results/autoencoder/{name}/{name}_curves.png", name=AUTOENCODERS),
        *expand("results/diffusion/{name}/{name}_curves.png", name=DIFFUSION),
        "results/latents/latents.zarr",
        *expand("results/controlnet/{name}/control_fidelity.json", name=CONTROLNETS),
        *expand("results/controlnet/{name}/eval_samples/grid.png", name=CONTROLNETS),
        *expand("results/controlnet/{name}/{name}_curves.png", name=CONTROLNETS),
        *(["results/controlnet/control_fidelity.csv"] if CONTROLNETS else []),
    ]


def parent_of_output(wildcards, output):
    """The folder of a rule's first output (a run folder, the demo data folder)."""
    return str(Path(output[0]).parent)


def best_checkpoint_of_metrics(wildcards, input):
    """The best checkpoint beside a run's metrics CSV (RUN/NAME_metrics.csv -> RUN/checkpoints/NAME_...)."""
    metrics = Path(input.metrics)
    name = metrics.name.removesuffix("_metrics.csv")
    return str(metrics.parent / "checkpoints" / f"{name}_checkpoint_best.pt")


def run_dirs_of_metrics(wildcards, input):
    """The run folders of the metrics files a rule takes as input."""
    return [str(Path(p).parent) for p in input.metrics]
