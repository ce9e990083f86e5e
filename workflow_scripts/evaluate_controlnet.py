"""Rule evaluate_controlnet: a ControlNet and its uncontrolled base, same noise, scored in pixel space by the judge."""

import os

import torch

from ldmflow.cli import setup_logging
from ldmflow.devices import claim_gpu
from ldmflow.stages.evaluate import evaluate_controlnet


def main(smk) -> None:
    setup_logging(smk.log[0])
    torch.set_num_threads(smk.threads)
    with claim_gpu(os.environ, requested_gpus=smk.resources.gpu) as device:
        evaluate_controlnet(smk.params.checkpoint, smk.input.judge, smk.params.out_dir, n=smk.params.n,
                            seed=smk.params.seed, options=smk.params.options, device=device, threads=smk.threads)


if __name__ == "__main__":
    main(snakemake)  # noqa: F821 (injected by Snakemake)
