"""Rule training_curves: plot a run's metrics CSV."""

from ldmflow.cli import setup_logging
from ldmflow.stages.summaries import plot_training_curves


def main(smk) -> None:
    setup_logging(smk.log[0])
    plot_training_curves(smk.input.metrics, smk.output.plot)


if __name__ == "__main__":
    main(snakemake)  # noqa: F821 (injected by Snakemake)
