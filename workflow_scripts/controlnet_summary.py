"""Rule controlnet_summary: one table of every ControlNet's control fidelity against its uncontrolled base."""

from ldmflow.cli import setup_logging
from ldmflow.stages.summaries import summarize_control_fidelity


def main(smk) -> None:
    setup_logging(smk.log[0])
    summarize_control_fidelity(smk.input.fidelity, smk.output.table)


if __name__ == "__main__":
    main(snakemake)  # noqa: F821 (injected by Snakemake)
