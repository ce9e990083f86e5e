"""Rule synthesize: a synthetic labelled set of one model, in the input's own format."""

import os

import torch

from ldmflow.cli import setup_logging
from ldmflow.devices import claim_gpu
from ldmflow.stages.synthesize import synthesize


def main(smk) -> None:
    setup_logging(smk.log[0])
    torch.set_num_threads(smk.threads)
    with claim_gpu(os.environ, requested_gpus=smk.resources.gpu) as device:
        synthesize(smk.params.checkpoint, smk.params.out_dir, smk.params.options, device=device)


if __name__ == "__main__":
    main(snakemake)  # noqa: F821 (injected by Snakemake)
