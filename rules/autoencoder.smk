rule train_autoencoder:
    input:
        config=autoencoder_config,
        # fine-tuning: the parent run (init.from) is trained first
        init=autoencoder_init,
        manifest=manifest(),
    # Only the metrics CSV is declared: Snakemake deletes the declared outputs of a failed job and of a
    # job it reruns, and the run rebuilds this file from its latest checkpoint. The checkpoints (best
    # and latest) are not declared, so a killed or preempted job resumes, with its best checkpoint.
    output:
        metrics="results/autoencoder/{name}/{name}_metrics.csv",
    log:
        "logs/autoencoder/{name}.log",
    benchmark:
        "results/benchmarks/autoencoder/{name}.tsv"
    # the long jobs first: the short scoring jobs fill the gaps (the judge after the UNets, not before)
    priority: 1
    conda:
        "../envs/ldmflow.yaml"
    threads: 1
    resources:
        # a GPU-class rule: profiles/ size it (gpu, memory, runtime, partition) per machine
        gpu=GPU_PER_JOB,
    params:
        stage="autoencoder",
        inputs=training_inputs,
        run_dir=parent_of_output,
    script:
        "../workflow_scripts/train.py"


rule select_autoencoder:
    input:
        # each run folder's metrics CSV stands for the run (its best checkpoint is beside it)
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
