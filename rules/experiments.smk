rule grid_experiment:
    # the experiment file of one grid combination, written from its mapping: Snakemake reruns this rule (and
    # the training that reads the file) when the mapping changes, and a dry run writes nothing
    output:
        experiment="results/experiments/{stage}/{name}.yaml",
    log:
        "logs/experiments/{stage}/{name}.log",
    localrule: True
    conda:
        "../envs/ldmflow.yaml"
    params:
        data=grid_data,
        base=grid_base,
    script:
        "../workflow_scripts/grid_experiment.py"
