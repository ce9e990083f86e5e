"""Rule train_autoencoder: train one autoencoder experiment (resuming from its latest checkpoint)."""

import os

from ldmflow.launch import run_training


def main(smk) -> None:
    run_training("autoencoder", gpus=int(smk.resources.gpu), environ=os.environ, log_file=smk.log[0],
                 threads=smk.threads, config=smk.input.config, manifest=smk.input.manifest,
                 out_dir=smk.params.run_dir)


if __name__ == "__main__":
    main(snakemake)  # noqa: F821 (injected by Snakemake)
