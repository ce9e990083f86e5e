"""Rule release_synthetic: publish an audited synthetic set (flagged images withheld) with its dataset card."""

from ldmflow.cli import setup_logging
from ldmflow.stages.release import release


def main(smk) -> None:
    setup_logging(smk.log[0])
    release(smk.params.folders["manifest"], smk.params.folders["summary"], smk.params.out_dir,
            utility=smk.input.utility)


if __name__ == "__main__":
    main(snakemake)  # noqa: F821 (injected by Snakemake)
