"""Rule train_autoencoder: train one autoencoder experiment (resuming from its latest checkpoint)."""

import os

from ldmflow.training.distributed import run_training


def main(smk) -> None:
    run_training(["--log-file", smk.log[0], "train-ae", "--config", smk.input.config, "--data", smk.input.manifest,
                  "--out", smk.params.run_dir, "--threads", str(smk.threads)],
                 gpus=int(smk.resources.gpu), environ=os.environ)


if __name__ == "__main__":
    main(snakemake)  # noqa: F821 (injected by Snakemake)
