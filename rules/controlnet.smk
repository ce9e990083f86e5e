rule train_controlnet:
    input:
        config=controlnet_config,
        latents="results/latents/latents.zarr",
        base=controlnet_base_checkpoint,
    output:
        metrics="results/controlnet/{name}/{name}_metrics.csv",
        best="results/controlnet/{name}/checkpoints/{name}_checkpoint_best.pt",
        fidelity="results/controlnet/{name}/control_fidelity.json",
    log:
        "logs/controlnet/{name}.log",
    benchmark:
        "results/benchmarks/controlnet/{name}.tsv"
    conda:
        "../envs/ldmflow.yaml"
    threads: 2
    params:
        # the latest checkpoint is not a declared output, so a failed job keeps it and a rerun resumes
        run_dir=parent_of_output,
    script:
        "../workflow_scripts/train_controlnet.py"


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
