"""Rule sample_controlnet: evaluation samples of a ControlNet, each under the next held-out control."""

import os

import torch

from ldmflow.cli import setup_logging
from ldmflow.devices import claim_gpu
from ldmflow.stages.sample_controlnet import sample_controlnet


def main(smk) -> None:
    setup_logging(smk.log[0])
    torch.set_num_threads(smk.threads)
    with claim_gpu(os.environ, requested_gpus=smk.resources.gpu) as device:
        sample_controlnet(smk.params.checkpoint, "val", smk.params.n, smk.params.out_dir, seed=smk.params.seed,
                          device=device)


if __name__ == "__main__":
    main(snakemake)  # noqa: F821 (injected by Snakemake)
