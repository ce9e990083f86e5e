"""Rule train_autoencoder: train one autoencoder experiment (resuming from its latest checkpoint)."""

import os

from ldmflow.cli import setup_logging
from ldmflow.devices import claim_gpu
from ldmflow.train_ae import train_autoencoder


def main(smk) -> None:
    setup_logging(smk.log[0])
    with claim_gpu(os.environ) as device:
        train_autoencoder(smk.input.config, smk.input.manifest, smk.params.run_dir, device=device,
                          threads=smk.threads, progress=False)


if __name__ == "__main__":
    main(snakemake)  # noqa: F821 (injected by Snakemake)
