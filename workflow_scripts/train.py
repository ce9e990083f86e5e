"""Rules train_autoencoder, train_diffusion, train_controlnet: train one experiment of the rule's stage on the
job's GPUs, resuming from its latest checkpoint."""

import os

from ldmflow.launch import run_training


def main(smk) -> None:
    run_training(smk.params.stage, gpus=int(smk.resources.gpu), environ=os.environ, log_file=smk.log[0],
                 threads=smk.threads, out_dir=smk.params.run_dir, **smk.params.inputs)


if __name__ == "__main__":
    main(snakemake)  # noqa: F821 (injected by Snakemake)
