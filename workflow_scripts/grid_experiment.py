"""Rule grid_experiment: write the experiment file of one grid combination."""

from ldmflow.cli import setup_logging
from ldmflow.workflow import write_grid_experiment


def main(smk) -> None:
    setup_logging(smk.log[0])
    write_grid_experiment(smk.output.experiment, data=smk.params.data, base=smk.params.base)


if __name__ == "__main__":
    main(snakemake)  # noqa: F821 (injected by Snakemake)
