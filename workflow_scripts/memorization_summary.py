"""Rule memorization_summary: one table and one plot over every experiment's memorization summary."""

from ldmflow.cli import setup_logging
from ldmflow.stages.summaries import gather_memorization


def main(smk) -> None:
    setup_logging(smk.log[0])
    gather_memorization(smk.input.summaries, smk.params.names, smk.output.table, smk.output.plot)


if __name__ == "__main__":
    main(snakemake)  # noqa: F821 (injected by Snakemake)
