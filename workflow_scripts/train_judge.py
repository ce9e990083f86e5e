"""Rule train_judge: the pixel-space judge, trained on the real train split of the latent store's images."""

import os

import torch

from ldmflow.cli import setup_logging
from ldmflow.devices import claim_gpu
from ldmflow.stages.evaluate import train_judge_stage


def main(smk) -> None:
    setup_logging(smk.log[0])
    torch.set_num_threads(smk.threads)
    with claim_gpu(os.environ, requested_gpus=smk.resources.gpu) as device:
        train_judge_stage(smk.input.latents, smk.params.out_dir, smk.params.options, device=device,
                          threads=smk.threads)


if __name__ == "__main__":
    main(snakemake)  # noqa: F821 (injected by Snakemake)
