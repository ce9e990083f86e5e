"""Rule train_controlnet: train one ControlNet experiment on the latent store and its base diffusion checkpoint."""

import os

from ldmflow.launch import run_training


def main(smk) -> None:
    run_training("controlnet", gpus=int(smk.resources.gpu), environ=os.environ, log_file=smk.log[0],
                 threads=smk.threads, config=smk.input.config, latents=smk.input.latents,
                 base=smk.params.base_checkpoint, out_dir=smk.params.run_dir)


if __name__ == "__main__":
    main(snakemake)  # noqa: F821 (injected by Snakemake)
