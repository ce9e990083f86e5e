rule train_judge:
    input:
        latents="results/latents/latents.zarr",
    output:
        judge="results/judge/judge.pt",
        record=report(
            "results/judge/judge.json",
            category="Evaluation",
            labels={"figure": "judge: real-val accuracy, mIoU, training curve"},
        ),
        grid=report(
            "results/judge/judge_val.png",
            category="Evaluation",
            labels={"figure": "judge on real val images (image | mask | judge)"},
        ),
    log:
        "logs/judge/train.log",
    benchmark:
        "results/benchmarks/judge/train.tsv"
    conda:
        "../envs/ldmflow.yaml"
    threads: 1
    resources:
        gpu=GPU_PER_JOB,
    params:
        out_dir=parent_of_output,
        options=JUDGE,
    script:
        "../workflow_scripts/train_judge.py"


rule evaluate_samples:
    input:
        judge="results/judge/judge.pt",
        grid="results/diffusion/{name}/eval_samples/grid.png",
        samples="results/diffusion/{name}/eval_samples/samples.zarr",
    output:
        scores=report(
            "results/evaluation/diffusion/{name}/scores.json",
            category="Evaluation",
            subcategory="diffusion",
            labels={"experiment": "{name}", "figure": "pixel-space scores"},
        ),
        grid=report(
            "results/evaluation/diffusion/{name}/grid.png",
            category="Evaluation",
            subcategory="diffusion",
            labels={
                "experiment": "{name}",
                "figure": "samples as the judge reads them",
            },
        ),
    log:
        "logs/evaluation/diffusion/{name}.log",
    benchmark:
        "results/benchmarks/evaluation/diffusion/{name}.tsv"
    conda:
        "../envs/ldmflow.yaml"
    threads: 1
    resources:
        gpu=GPU_PER_JOB,
    params:
        out_dir=parent_of_output,
        options=JUDGE,
    script:
        "../workflow_scripts/evaluate_samples.py"


rule evaluate_controlnet:
    input:
        judge="results/judge/judge.pt",
        # the metrics CSVs stand for the runs: the ControlNet's best checkpoint and its base's
        metrics="results/controlnet/{name}/{name}_metrics.csv",
        base_metrics=controlnet_base_metrics,
    output:
        scores=report(
            "results/evaluation/controlnet/{name}/scores.json",
            category="Evaluation",
            subcategory="controlnet",
            labels={"experiment": "{name}", "figure": "pixel-space scores"},
        ),
        grid=report(
            "results/evaluation/controlnet/{name}/grid.png",
            category="Evaluation",
            subcategory="controlnet",
            labels={
                "experiment": "{name}",
                "figure": "controlled | mask | judge | base | judge",
            },
        ),
    log:
        "logs/evaluation/controlnet/{name}.log",
    benchmark:
        "results/benchmarks/evaluation/controlnet/{name}.tsv"
    conda:
        "../envs/ldmflow.yaml"
    threads: 1
    resources:
        gpu=GPU_PER_JOB,
    params:
        checkpoint=best_checkpoint_of_metrics,
        out_dir=parent_of_output,
        n=controlnet_evaluation_n(),
        seed=config["sampling"]["seed"],
        options=JUDGE,
    script:
        "../workflow_scripts/evaluate_controlnet.py"


rule evaluation_summary:
    input:
        scores=evaluation_scores(),
    output:
        table=report(
            "results/evaluation/summary.csv",
            category="Summary",
            labels={"figure": "pixel-space scores and the judge's real-val figures"},
        ),
        plot=report(
            "results/evaluation/summary.png",
            category="Summary",
            labels={"figure": "pixel-space scores per experiment"},
        ),
    log:
        "logs/evaluation/summary.log",
    localrule: True
    conda:
        "../envs/ldmflow.yaml"
    params:
        names=evaluated_experiments(),
    script:
        "../workflow_scripts/evaluation_summary.py"
