"""Rule train_diffusion: train one diffusion experiment on the latent store (resuming from its latest)."""

from ldmflow.cli import setup_logging
from ldmflow.train_diffusion import train_diffusion


def main(smk) -> None:
    setup_logging(smk.log[0])
    train_diffusion(smk.input.config, smk.input.latents, smk.params.run_dir, threads=smk.threads, progress=False)


if __name__ == "__main__":
    main(snakemake)  # noqa: F821 (injected by Snakemake)
