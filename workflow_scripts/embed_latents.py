"""Rule embed_latents: encode every image with the selected autoencoder into the zarr latent store."""

import os

from ldmflow.cli import setup_logging
from ldmflow.devices import claim_gpu
from ldmflow.stages.embed import embed_latents


def main(smk) -> None:
    setup_logging(smk.log[0])
    with claim_gpu(os.environ, requested_gpus=smk.resources.gpu) as device:
        embed_latents(smk.input.selected, smk.input.manifest, smk.output.store, batch_size=smk.params.batch_size,
                      dtype=smk.params.dtype, device=device, threads=smk.threads)


if __name__ == "__main__":
    main(snakemake)  # noqa: F821 (injected by Snakemake)
