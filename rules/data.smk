rule demo_data:
    output:
        manifest="results/data/demo/manifest.csv",
    log:
        "logs/data/demo_data.log",
    localrule: True
    conda:
        "../envs/ldmflow.yaml"
    params:
        out_dir=parent_of_output,
        n=config["data"]["demo"]["n"],
        size=config["data"]["demo"]["size"],
        seed=config["data"]["demo"]["seed"],
    script:
        "../workflow_scripts/demo_data.py"
