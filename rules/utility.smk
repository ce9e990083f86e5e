from ldmflow.config.judge import utility_options

UTILITY = utility_options(config)


rule utility:
    input:
        synthetic="results/synthetic/{name}/manifest.csv",
        real=manifest(),
    output:
        record=report(
            "results/synthetic/{name}/utility.json",
            category="Synthetic data",
            subcategory="{name}",
            labels={"figure": "utility: train on synthetic, test on real"},
        ),
        table="results/synthetic/{name}/utility.csv",
        plot=report(
            "results/synthetic/{name}/utility.png",
            category="Synthetic data",
            subcategory="{name}",
            labels={"figure": "utility against the synthetic : real ratio"},
        ),
    log:
        "logs/synthetic/{name}/utility.log",
    benchmark:
        "results/benchmarks/synthetic/{name}/utility.tsv"
    conda:
        "../envs/ldmflow.yaml"
    threads: 1
    resources:
        gpu=GPU_PER_JOB,
    params:
        out_dir=parent_of_output,
        options=UTILITY,
        judge=JUDGE,
    script:
        "../workflow_scripts/utility.py"
