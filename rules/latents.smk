rule embed_latents:
    input:
        selected="results/autoencoder/selected.json",
        manifest=manifest(),
    output:
        store=directory("results/latents/latents.zarr"),
    log:
        "logs/latents/embed.log",
    benchmark:
        "results/benchmarks/latents/embed.tsv"
    conda:
        "../envs/ldmflow.yaml"
    threads: 2
    resources:
        gpu=GPU_PER_JOB,
    params:
        batch_size=config["latents"]["batch_size"],
        dtype=config["latents"]["dtype"],
    script:
        "../workflow_scripts/embed_latents.py"
