"""Rule train_diffusion: train one diffusion experiment on the latent store (resuming from its latest)."""

import os

from ldmflow.launch import run_training


def main(smk) -> None:
    run_training("diffusion", gpus=int(smk.resources.gpu), environ=os.environ, log_file=smk.log[0],
                 threads=smk.threads, config=smk.input.config, latents=smk.input.latents,
                 out_dir=smk.params.run_dir)


if __name__ == "__main__":
    main(snakemake)  # noqa: F821 (injected by Snakemake)
