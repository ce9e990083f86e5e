"""Rule evaluate_samples: one diffusion experiment's evaluation samples scored in pixel space by the judge."""

import os

import torch

from ldmflow.cli import setup_logging
from ldmflow.devices import claim_gpu
from ldmflow.stages.evaluate import evaluate_samples


def main(smk) -> None:
    setup_logging(smk.log[0])
    torch.set_num_threads(smk.threads)
    with claim_gpu(os.environ, requested_gpus=smk.resources.gpu) as device:
        evaluate_samples(smk.input.judge, smk.input.samples, smk.params.out_dir, options=smk.params.options,
                         device=device, threads=smk.threads)


if __name__ == "__main__":
    main(snakemake)  # noqa: F821 (injected by Snakemake)
