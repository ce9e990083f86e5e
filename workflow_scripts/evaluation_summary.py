"""Rule evaluation_summary: one table (and plot) of every experiment's pixel-space scores beside the judge's own."""

from ldmflow.cli import setup_logging
from ldmflow.stages.evaluate import evaluation_summary


def main(smk) -> None:
    setup_logging(smk.log[0])
    evaluation_summary(smk.input.scores, smk.params.names, smk.output.table, smk.output.plot)


if __name__ == "__main__":
    main(snakemake)  # noqa: F821 (injected by Snakemake)
