"""Rule audit_synthetic: the calibrated memorization audit of exactly the images of a synthetic set."""

import os

import torch

from ldmflow.cli import setup_logging
from ldmflow.devices import claim_gpu
from ldmflow.stages.memorization import evaluate_memorization


def main(smk) -> None:
    setup_logging(smk.log[0])
    torch.set_num_threads(smk.threads)
    with claim_gpu(os.environ, requested_gpus=smk.resources.gpu) as device:
        evaluate_memorization(smk.input.train, smk.input.manifest, smk.params.out_dir, device=device,
                              **smk.params.options)


if __name__ == "__main__":
    main(snakemake)  # noqa: F821 (injected by Snakemake)
