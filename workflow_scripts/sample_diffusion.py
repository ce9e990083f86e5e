"""Rule sample_diffusion: generate the evaluation samples of a diffusion experiment's best checkpoint."""

import os

import torch

from ldmflow.cli import setup_logging
from ldmflow.devices import claim_gpu
from ldmflow.stages.sample import sample_checkpoint


def main(smk) -> None:
    setup_logging(smk.log[0])
    torch.set_num_threads(smk.threads)
    with claim_gpu(os.environ, requested_gpus=smk.resources.gpu) as device:
        sample_checkpoint(smk.params.checkpoint, smk.params.n, smk.params.out_dir, seed=smk.params.seed,
                          device=device)


if __name__ == "__main__":
    main(snakemake)  # noqa: F821 (injected by Snakemake)
