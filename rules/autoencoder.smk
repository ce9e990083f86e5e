rule train_autoencoder:
    input:
        config=autoencoder_config,
        manifest=manifest(),
    output:
        metrics="results/autoencoder/{name}/{name}_metrics.csv",
        best="results/autoencoder/{name}/checkpoints/{name}_checkpoint_best.pt",
    log:
        "logs/autoencoder/{name}.log",
    benchmark:
        "results/benchmarks/autoencoder/{name}.tsv"
    conda:
        "../envs/ldmflow.yaml"
    threads: 2
    params:
        # the latest checkpoint is not a declared output, so a failed job keeps it and a rerun resumes
        run_dir=parent_of_output,
    script:
        "../workflow_scripts/train_autoencoder.py"


rule select_autoencoder:
    input:
        best=expand(
            "results/autoencoder/{name}/checkpoints/{name}_checkpoint_best.pt",
            name=AUTOENCODERS,
        ),
        metrics=expand(
            "results/autoencoder/{name}/{name}_metrics.csv", name=AUTOENCODERS
        ),
    output:
        selected="results/autoencoder/selected.json",
        plot=report(
            "results/autoencoder/validation_curves.png",
            category="Autoencoder comparison",
            labels={"figure": "validation curves of every autoencoder"},
        ),
    log:
        "logs/autoencoder/select.log",
    localrule: True
    conda:
        "../envs/ldmflow.yaml"
    params:
        run_dirs=run_dirs_of_metrics,
        metric=config["selection"]["metric"],
        mode=config["selection"]["mode"],
    script:
        "../workflow_scripts/select_autoencoder.py"
