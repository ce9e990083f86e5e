from snakemake.utils import min_version, validate

from ldmflow.workflow import workflow_config

min_version("9.0")


configfile: "config/config.yaml"


# Snakemake's YAML 1.1 reads `lr: 1e-4` as a string: the same files, re-read as users write numbers
config.update(
    workflow_config(
        "config/config.yaml",
        workflow.overwrite_configfiles,
        workflow.config_settings.config,
        workflow.config_settings.replace_workflow_config,
    )
)

validate(config, "config/schemas/config.schema.yaml")


include: "rules/common.smk"
include: "rules/experiments.smk"
include: "rules/data.smk"
include: "rules/autoencoder.smk"
include: "rules/diffusion.smk"
include: "rules/latents.smk"
include: "rules/controlnet.smk"
include: "rules/memorization.smk"
include: "rules/evaluation.smk"
include: "rules/utility.smk"
include: "rules/synthetic.smk"
include: "rules/report.smk"
include: "rules/phases.smk"
include: "rules/export.smk"


rule all:
    default_target: True
    input:
        all_outputs(),
        synthetic_outputs(),
