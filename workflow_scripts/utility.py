"""Rule utility: a synthetic set's usefulness, measured by training on it and testing on the real val images."""

import os

import torch

from ldmflow.cli import setup_logging
from ldmflow.devices import claim_gpu
from ldmflow.stages.utility import utility_stage


def main(smk) -> None:
    setup_logging(smk.log[0])
    torch.set_num_threads(smk.threads)
    with claim_gpu(os.environ, requested_gpus=smk.resources.gpu) as device:
        utility_stage(smk.input.real, smk.input.synthetic, smk.params.out_dir, smk.params.options, smk.params.judge,
                      device=device, threads=smk.threads)


if __name__ == "__main__":
    main(snakemake)  # noqa: F821 (injected by Snakemake)
