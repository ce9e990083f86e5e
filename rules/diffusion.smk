rule train_diffusion:
    input:
        config=diffusion_config,
        # fine-tuning: the parent run (init.from) is trained first
        init=diffusion_init,
        latents="results/latents/latents.zarr",
    # Only the metrics CSV is declared (see train_autoencoder): the checkpoints survive a failed job.
    output:
        metrics="results/diffusion/{name}/{name}_metrics.csv",
    log:
        "logs/diffusion/{name}.log",
    benchmark:
        "results/benchmarks/diffusion/{name}.tsv"
    # the long jobs first: the short scoring jobs fill the gaps (the judge after the UNets, not before)
    priority: 1
    conda:
        "../envs/ldmflow.yaml"
    threads: 1
    resources:
        gpu=GPU_PER_JOB,
    params:
        stage="diffusion",
        inputs=training_inputs,
        run_dir=parent_of_output,
    script:
        "../workflow_scripts/train.py"


rule sample_diffusion:
    input:
        # the metrics CSV stands for the run; its best checkpoint is beside it
        metrics="results/diffusion/{name}/{name}_metrics.csv",
    output:
        grid=report(
            "results/diffusion/{name}/eval_samples/grid.png",
            category="Sample grids",
            subcategory="diffusion",
            labels={"experiment": "{name}"},
        ),
        samples=directory("results/diffusion/{name}/eval_samples/samples.zarr"),
    log:
        "logs/diffusion/{name}_sample.log",
    benchmark:
        "results/benchmarks/diffusion/{name}_sample.tsv"
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
        "../workflow_scripts/sample_diffusion.py"
