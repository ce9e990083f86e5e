"""Rule select_autoencoder: pick the best autoencoder checkpoint."""

from ldmflow.cli import setup_logging
from ldmflow.stages.select_autoencoder import select_autoencoder


def main(smk) -> None:
    setup_logging(smk.log[0])
    select_autoencoder(smk.params.run_dirs, smk.output.selected, metric=smk.params.metric, mode=smk.params.mode)


if __name__ == "__main__":
    main(snakemake)  # noqa: F821 (injected by Snakemake)
