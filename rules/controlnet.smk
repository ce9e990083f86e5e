rule train_controlnet:
    input:
        config=controlnet_config,
        # fine-tuning: the parent run (init.from) is trained first
        init=controlnet_init,
        latents="results/latents/latents.zarr",
        # the base diffusion run's metrics CSV stands for the run; its best checkpoint is beside it
        base_metrics=controlnet_base_metrics,
    # Only files written at the end are declared (see train_autoencoder): the checkpoints survive a
    # failed job, which resumes from its latest.
    output:
        metrics="results/controlnet/{name}/{name}_metrics.csv",
        fidelity="results/controlnet/{name}/control_fidelity.json",
    log:
        "logs/controlnet/{name}.log",
    benchmark:
        "results/benchmarks/controlnet/{name}.tsv"
    # the long jobs first: the short scoring jobs fill the gaps (the judge after the UNets, not before)
    priority: 1
    conda:
        "../envs/ldmflow.yaml"
    threads: 1
    resources:
        gpu=GPU_PER_JOB,
    params:
        stage="controlnet",
        inputs=controlnet_training_inputs,
        run_dir=parent_of_output,
    script:
        "../workflow_scripts/train.py"


rule controlnet_summary:
    input:
        fidelity=expand(
            "results/controlnet/{name}/control_fidelity.json", name=CONTROLNETS
        ),
    output:
        table=report(
            "results/controlnet/control_fidelity.csv",
            category="Summary",
            labels={"figure": "ControlNet control fidelity (mIoU) against the base"},
        ),
    log:
        "logs/controlnet/summary.log",
    localrule: True
    conda:
        "../envs/ldmflow.yaml"
    script:
        "../workflow_scripts/controlnet_summary.py"


rule sample_controlnet:
    input:
        # the metrics CSV stands for the run; its best checkpoint is beside it
        metrics="results/controlnet/{name}/{name}_metrics.csv",
    output:
        grid=report(
            "results/controlnet/{name}/eval_samples/grid.png",
            category="Sample grids",
            subcategory="controlnet",
            labels={"experiment": "{name}"},
        ),
        samples=directory("results/controlnet/{name}/eval_samples/samples.zarr"),
    log:
        "logs/controlnet/{name}_sample.log",
    benchmark:
        "results/benchmarks/controlnet/{name}_sample.tsv"
    conda:
        "../envs/ldmflow.yaml"
    threads: 1
    resources:
        gpu=GPU_PER_JOB,
    params:
        checkpoint=best_checkpoint_of_metrics,
        out_dir=parent_of_output,
        n=config["sampling"]["n"],
        seed=config["sampling"]["seed"],
    script:
        "../workflow_scripts/sample_controlnet.py"
