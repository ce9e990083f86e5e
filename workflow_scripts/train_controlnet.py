"""Rule train_controlnet: train one ControlNet experiment on the latent store and its base diffusion checkpoint."""

from ldmflow.cli import setup_logging
from ldmflow.train_controlnet import train_controlnet


def main(smk) -> None:
    setup_logging(smk.log[0])
    train_controlnet(smk.input.config, smk.input.latents, smk.input.base, smk.params.run_dir, threads=smk.threads,
                     progress=False)


if __name__ == "__main__":
    main(snakemake)  # noqa: F821 (injected by Snakemake)
