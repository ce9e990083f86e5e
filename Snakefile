from snakemake.utils import min_version, validate

min_version("9.0")


configfile: "config/config.yaml"


validate(config, "config/schemas/config.schema.yaml")


include: "rules/common.smk"
include: "rules/data.smk"
include: "rules/autoencoder.smk"
include: "rules/diffusion.smk"
include: "rules/latents.smk"
include: "rules/controlnet.smk"
include: "rules/memorization.smk"
include: "rules/evaluation.smk"
include: "rules/report.smk"


rule all:
    default_target: True
    input:
        all_outputs(),
