rule train_diffusion:
    input:
        config=diffusion_config,
        latents="results/latents/latents.zarr",
    output:
        metrics="results/diffusion/{name}/{name}_metrics.csv",
        best="results/diffusion/{name}/checkpoints/{name}_checkpoint_best.pt",
    log:
        "logs/diffusion/{name}.log",
    benchmark:
        "results/benchmarks/diffusion/{name}.tsv"
    conda:
        "../envs/ldmflow.yaml"
    threads: 2
    params:
        # the latest checkpoint is not a declared output, so a failed job keeps it and a rerun resumes
        run_dir=parent_of_output,
    script:
        "../workflow_scripts/train_diffusion.py"


rule sample_diffusion:
    input:
        checkpoint="results/diffusion/{name}/checkpoints/{name}_checkpoint_best.pt",
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
    threads: 2
    params:
        out_dir=parent_of_output,
        n=config["sampling"]["n"],
        seed=config["sampling"]["seed"],
    script:
        "../workflow_scripts/sample_diffusion.py"
