from pathlib import Path

from ldmflow.workflow import experiments, manifest_path

AUTOENCODERS = experiments(config["autoencoders"], "autoencoder")
DIFFUSION = experiments(config["diffusion"], "diffusion")


wildcard_constraints:
    name="[A-Za-z0-9_.-]+",
    stage="autoencoder|diffusion|controlnet",


def manifest():
    return manifest_path(config)


def autoencoder_config(wildcards):
    return AUTOENCODERS[wildcards.name]


def diffusion_config(wildcards):
    return DIFFUSION[wildcards.name]


def evaluated_experiments():
    """Every experiment whose samples are checked for memorization, as 'stage/name'."""
    return [f"diffusion/{name}" for name in DIFFUSION]


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
