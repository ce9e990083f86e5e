"""Rule export_model: an experiment's best checkpoint as a folder others can load (diffusers, safetensors)."""

from ldmflow.cli import setup_logging
from ldmflow.stages.export import export_checkpoint


def main(smk) -> None:
    setup_logging(smk.log[0])
    export_checkpoint(smk.params.checkpoint, smk.output.folder, memorization=smk.input.memorization)


if __name__ == "__main__":
    main(snakemake)  # noqa: F821 (injected by Snakemake)
