"""Rule train_diffusion: train one diffusion experiment on the latent store (resuming from its latest)."""

import os

from ldmflow.training.distributed import run_training


def main(smk) -> None:
    run_training(["--log-file", smk.log[0], "train-diffusion", "--config", smk.input.config, "--latents",
                  smk.input.latents, "--out", smk.params.run_dir, "--threads", str(smk.threads)],
                 gpus=int(smk.resources.gpu), environ=os.environ)


if __name__ == "__main__":
    main(snakemake)  # noqa: F821 (injected by Snakemake)
