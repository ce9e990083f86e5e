from pathlib import Path

from ldmflow.config.common import STAGE_NAMES
from ldmflow.config.judge import judge_options
from ldmflow.workflow import (
    EXPERIMENT_LISTS,
    best_checkpoint,
    controlnet_bases,
    controlnets_for_data,
    experiments,
    gpus_per_local_job,
    init_checkpoint_of,
    init_parent,
    manifest_path,
    metrics_file,
    selection_warnings,
    check_config_files,
    check_default_profile,
    memorization_options,
    phase_members,
    synthetic_sets,
)

check_config_files(workflow.overwrite_configfiles)
check_default_profile(Path(workflow.basedir, "profiles"))

# stage -> name -> experiment (ldmflow.workflow.Experiment); a grid entry of a list expands to one experiment
# per combination, whose file rule grid_experiment writes to results/experiments/STAGE/NAME.yaml
DECLARED = {
    stage: experiments(config[key], stage, key)
    for key, stage in EXPERIMENT_LISTS.items()
}
AUTOENCODERS = DECLARED["autoencoder"]
DIFFUSION = DECLARED["diffusion"]
DECLARED_CONTROLNETS = DECLARED["controlnet"]
# without masks in the data, the mask-controlled ControlNets are left out
CONTROLNETS = controlnets_for_data(DECLARED_CONTROLNETS, manifest_path(config))
CONTROLNET_BASES = controlnet_bases(CONTROLNETS, DIFFUSION)
WORKFLOW = {
    "autoencoder": AUTOENCODERS,
    "diffusion": DIFFUSION,
    "controlnet": CONTROLNETS,
}
selection_warnings(AUTOENCODERS, config["selection"])
# phase name -> its experiments as (stage, name); rules/phases.smk makes each a target rule
PHASES = phase_members(
    config["phases"], WORKFLOW, {**WORKFLOW, "controlnet": DECLARED_CONTROLNETS}
)
MEMORIZATION = memorization_options(config)
# name -> entry of the config's synthetic sets (rules/synthetic.smk), each checked against the experiments
SYNTHETIC = synthetic_sets(config.get("synthetic"), WORKFLOW)
JUDGE = judge_options(config)


# The GPUs a GPU-class rule asks for, unless a profile's set-resources says otherwise (the cluster
# profiles do): one on a machine with an NVIDIA GPU, none on a CPU machine (there only --cores limits
# how many run at once). Locally each job takes a GPU no other job holds (ldmflow.devices).
GPU_PER_JOB = gpus_per_local_job()


wildcard_constraints:
    name="[A-Za-z0-9_.-]+",
    stage="|".join(STAGE_NAMES),


def manifest():
    return manifest_path(config)


def autoencoder_config(wildcards):
    return AUTOENCODERS[wildcards.name].path


def diffusion_config(wildcards):
    return DIFFUSION[wildcards.name].path


def controlnet_config(wildcards):
    return CONTROLNETS[wildcards.name].path


def grid_combination(wildcards):
    """The grid combination a results/experiments/STAGE/NAME.yaml file is written from."""
    experiment = DECLARED[wildcards.stage][wildcards.name]
    if experiment.data is None:
        raise ValueError(
            f"{wildcards.stage}/{wildcards.name} is not a grid combination: its file is {experiment.path}"
        )
    return experiment


def grid_data(wildcards):
    """The mapping a grid combination's experiment file holds (a params: a change reruns the rule)."""
    return grid_combination(wildcards).data


def grid_base(wildcards):
    return grid_combination(wildcards).base


def experiment_of_file(path):
    """The planned experiment whose file is PATH (a grid combination's file may not be written yet)."""
    return next(
        e for stage in DECLARED.values() for e in stage.values() if e.path == str(path)
    )


def controlnet_base_metrics(wildcards):
    """The metrics CSV of the diffusion run a ControlNet experiment names as its base (it stands for the run)."""
    return metrics_file("diffusion", CONTROLNET_BASES[wildcards.name])


def controlnet_base_checkpoint(wildcards):
    """The best checkpoint of a ControlNet experiment's base diffusion run."""
    return best_checkpoint(controlnet_base_metrics(wildcards))


def autoencoder_init(wildcards):
    """What a fine-tuned autoencoder starts from (its init.from): the parent run's metrics CSV, or nothing."""
    return init_parent(AUTOENCODERS[wildcards.name], "autoencoder", WORKFLOW)


def diffusion_init(wildcards):
    return init_parent(DIFFUSION[wildcards.name], "diffusion", WORKFLOW)


def controlnet_init(wildcards):
    return init_parent(CONTROLNETS[wildcards.name], "controlnet", WORKFLOW)


def training_inputs(wildcards, input):
    """The named inputs a stage's training function takes: its config, its manifest or latents, and the
    checkpoint a fine-tuned experiment starts from."""
    named = {k: v for k, v in input.items() if k in ("config", "manifest", "latents")}
    init = init_checkpoint_of(
        experiment_of_file(input.config), list(input.get("init", []))
    )
    return {**named, **({"init": init} if init else {})}


def controlnet_training_inputs(wildcards, input):
    """A ControlNet's training inputs, with its base run's best checkpoint."""
    return {
        **training_inputs(wildcards, input),
        "base": controlnet_base_checkpoint(wildcards),
    }


def evaluated_experiments():
    """Every experiment whose samples are checked for memorization, as 'stage/name'."""
    return [f"diffusion/{name}" for name in DIFFUSION] + [
        f"controlnet/{name}" for name in CONTROLNETS
    ]


def memorization_summaries():
    return [
        f"results/memorization/{exp}/summary.json" for exp in evaluated_experiments()
    ]


def evaluation_scores():
    """The judge's pixel-space scores of every evaluated experiment."""
    return [f"results/evaluation/{exp}/scores.json" for exp in evaluated_experiments()]


def controlnet_evaluation_n():
    """Paired samples per ControlNet evaluation: judge.controlnet_n, else sampling.n."""
    return JUDGE.get("controlnet_n") or config["sampling"]["n"]


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
        "results/judge/judge.json",
        "results/evaluation/summary.csv",
    ]


def experiment_outputs(stage, name):
    """What building one experiment means: its training curves, and for a diffusion or ControlNet experiment its
    evaluation samples, its memorization summary and its pixel-space scores by the judge (a ControlNet's
    control fidelity too).
    """
    outputs = [f"results/{stage}/{name}/{name}_curves.png"]
    if stage != "autoencoder":
        outputs += [
            f"results/{stage}/{name}/eval_samples/grid.png",
            f"results/memorization/{stage}/{name}/summary.json",
            f"results/evaluation/{stage}/{name}/scores.json",
        ]
    if stage == "controlnet":
        outputs.append(f"results/controlnet/{name}/control_fidelity.json")
    return outputs


def phase_outputs(phase):
    """What the target of a phase builds: each of its experiments' outputs, and the autoencoder selection and
    latent store when the phase holds every autoencoder experiment."""
    members = PHASES[phase]
    outputs = [
        out for stage, name in members for out in experiment_outputs(stage, name)
    ]
    if AUTOENCODERS and {("autoencoder", n) for n in AUTOENCODERS} <= set(members):
        outputs += ["results/autoencoder/selected.json", "results/latents/latents.zarr"]
    return outputs


def parent_of_output(wildcards, output):
    """The folder of a rule's first output (a run folder, the demo data folder)."""
    return str(Path(output[0]).parent)


def best_checkpoint_of_metrics(wildcards, input):
    """The best checkpoint beside a run's metrics CSV (RUN/NAME_metrics.csv -> RUN/checkpoints/NAME_...)."""
    return best_checkpoint(input.metrics)


def run_dirs_of_metrics(wildcards, input):
    """The run folders of the metrics files a rule takes as input."""
    return [str(Path(p).parent) for p in input.metrics]


def synthetic_metrics(wildcards):
    """The metrics CSV of the run a synthetic set is sampled from (it stands for the run)."""
    model = SYNTHETIC[wildcards.name]["model"]
    stage, _, name = model.partition("/")
    return metrics_file(stage, name)


def synthetic_options(wildcards):
    return SYNTHETIC[wildcards.name]


def synthetic_outputs():
    """What `snakemake all` builds of the synthetic sets: each set and its audit."""
    return [
        *expand("results/synthetic/{name}/manifest.csv", name=SYNTHETIC),
        *expand("results/synthetic/{name}/audit/summary.json", name=SYNTHETIC),
    ]


def parent_of_input(wildcards, input):
    """The folders of a rule's inputs, by name (a synthetic set, its audit)."""
    return {key: str(Path(value).parent) for key, value in input.items()}
