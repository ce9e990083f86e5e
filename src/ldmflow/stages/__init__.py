"""One module per workflow stage; each is what a Snakemake rule and an ``ldmflow`` subcommand call."""
