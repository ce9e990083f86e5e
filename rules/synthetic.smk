# Synthetic labelled data sets (config `synthetic:`, helpers in common.smk), their memorization audit, and the
# release of the audited sets with a dataset card (`snakemake release`).


rule synthesize:
    input:
        metrics=synthetic_metrics,
        latents="results/latents/latents.zarr",
    output:
        manifest="results/synthetic/{name}/manifest.csv",
        record="results/synthetic/{name}/dataset.json",
        grid=report(
            "results/synthetic/{name}/grid.png",
            category="Synthetic data",
            labels={"set": "{name}", "figure": "first images (beside their masks)"},
        ),
    log:
        "logs/synthetic/{name}.log",
    benchmark:
        "results/benchmarks/synthetic/{name}.tsv"
    conda:
        "../envs/ldmflow.yaml"
    threads: 1
    resources:
        gpu=GPU_PER_JOB,
    params:
        checkpoint=best_checkpoint_of_metrics,
        out_dir=parent_of_output,
        options=synthetic_options,
    script:
        "../workflow_scripts/synthesize.py"


rule audit_synthetic:
    input:
        manifest="results/synthetic/{name}/manifest.csv",
        train="results/latents/latents.zarr",
    output:
        summary="results/synthetic/{name}/audit/summary.json",
        per_sample="results/synthetic/{name}/audit/per_sample.csv",
        histogram="results/synthetic/{name}/audit/histogram.png",
        top_matches=report(
            "results/synthetic/{name}/audit/top_matches.png",
            category="Synthetic data",
            labels={
                "set": "{name}",
                "figure": "audit: closest images to the training set",
            },
        ),
    log:
        "logs/synthetic/{name}_audit.log",
    benchmark:
        "results/benchmarks/synthetic/{name}_audit.tsv"
    conda:
        "../envs/ldmflow.yaml"
    threads: 1
    resources:
        gpu=GPU_PER_JOB,
    params:
        out_dir=parent_of_output,
        options=MEMORIZATION,
    script:
        "../workflow_scripts/audit_synthetic.py"


rule release_synthetic:
    input:
        manifest="results/synthetic/{name}/manifest.csv",
        record="results/synthetic/{name}/dataset.json",
        summary="results/synthetic/{name}/audit/summary.json",
        per_sample="results/synthetic/{name}/audit/per_sample.csv",
        # the proof of use the card reports: models trained on the set, tested on real val images
        utility="results/synthetic/{name}/utility.json",
    output:
        card="results/release/{name}/card.json",
        markdown=report(
            "results/release/{name}/DATASET_CARD.md",
            category="Synthetic data",
            labels={"set": "{name}", "figure": "dataset card"},
        ),
        manifest="results/release/{name}/manifest.csv",
        withheld="results/release/{name}/withheld.csv",
    log:
        "logs/release/{name}.log",
    localrule: True
    conda:
        "../envs/ldmflow.yaml"
    params:
        folders=parent_of_input,
        out_dir=parent_of_output,
    script:
        "../workflow_scripts/release.py"


rule release:
    input:
        expand("results/release/{name}/card.json", name=SYNTHETIC),
    localrule: True


rule synthetic_utility:
    input:
        expand("results/synthetic/{name}/utility.json", name=SYNTHETIC),
    localrule: True
