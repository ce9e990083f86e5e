rule training_curves:
    input:
        metrics="results/{stage}/{name}/{name}_metrics.csv",
    output:
        plot=report(
            "results/{stage}/{name}/{name}_curves.png",
            category="Training curves",
            subcategory="{stage}",
            labels={"experiment": "{name}"},
        ),
    log:
        "logs/{stage}/{name}_curves.log",
    localrule: True
    conda:
        "../envs/ldmflow.yaml"
    script:
        "../workflow_scripts/training_curves.py"
