"""Rule demo_data: write the built-in demo dataset."""

from ldmflow.cli import setup_logging
from ldmflow.data.demo import write_demo_data


def main(smk) -> None:
    setup_logging(smk.log[0])
    write_demo_data(smk.params.out_dir, n=smk.params.n, size=smk.params.size, seed=smk.params.seed)


if __name__ == "__main__":
    main(snakemake)  # noqa: F821 (injected by Snakemake)
