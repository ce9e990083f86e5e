rule export_model:
    input:
        # the metrics CSV stands for the run; its best checkpoint is beside it
        metrics="results/{stage}/{name}/{name}_metrics.csv",
        memorization="results/memorization/{stage}/{name}/summary.json",
    output:
        folder=directory("results/export/{stage}/{name}"),
    log:
        "logs/export/{stage}/{name}.log",
    benchmark:
        "results/benchmarks/export/{stage}/{name}.tsv"
    wildcard_constraints:
        stage="diffusion|controlnet",
    conda:
        "../envs/ldmflow.yaml"
    threads: 1
    params:
        checkpoint=best_checkpoint_of_metrics,
    script:
        "../workflow_scripts/export.py"


# `snakemake export`: every diffusion and ControlNet experiment as a folder others can load
rule export:
    input:
        expand("results/export/diffusion/{name}", name=DIFFUSION),
        expand("results/export/controlnet/{name}", name=CONTROLNETS),
