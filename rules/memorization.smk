rule evaluate_memorization:
    input:
        grid="results/{stage}/{name}/eval_samples/grid.png",
        samples="results/{stage}/{name}/eval_samples/samples.zarr",
        train="results/latents/latents.zarr",
    output:
        summary=report(
            "results/memorization/{stage}/{name}/summary.json",
            category="Memorization",
            subcategory="{stage}",
            labels={"experiment": "{name}", "figure": "summary"},
        ),
        per_sample="results/memorization/{stage}/{name}/per_sample.csv",
        histogram=report(
            "results/memorization/{stage}/{name}/histogram.png",
            category="Memorization",
            subcategory="{stage}",
            labels={"experiment": "{name}", "figure": "similarity histogram"},
        ),
        top_matches=report(
            "results/memorization/{stage}/{name}/top_matches.png",
            category="Memorization",
            subcategory="{stage}",
            labels={"experiment": "{name}", "figure": "top matches"},
        ),
    log:
        "logs/memorization/{stage}/{name}.log",
    benchmark:
        "results/benchmarks/memorization/{stage}/{name}.tsv"
    conda:
        "../envs/ldmflow.yaml"
    threads: 1
    resources:
        gpu=GPU_PER_JOB,
    params:
        samples_dir=parent_of_input_grid,
        out_dir=parent_of_output,
        options=MEMORIZATION,
    script:
        "../workflow_scripts/evaluate_memorization.py"


rule memorization_summary:
    input:
        summaries=memorization_summaries(),
    output:
        table=report(
            "results/memorization/summary.csv",
            category="Summary",
            labels={"figure": "memorization and quality table"},
        ),
        plot=report(
            "results/memorization/summary.png",
            category="Summary",
            labels={"figure": "memorization per experiment"},
        ),
    log:
        "logs/memorization/summary.log",
    localrule: True
    conda:
        "../envs/ldmflow.yaml"
    params:
        names=evaluated_experiments(),
    script:
        "../workflow_scripts/memorization_summary.py"
