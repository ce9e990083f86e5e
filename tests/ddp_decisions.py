"""Run by torchrun from tests/test_distributed.py: the toy regression of tests/test_loop.py on 2 ranks whose
validation metrics disagree, then each rank's share of a validation pass. Writes RANK.json to argv[1]."""

import dataclasses
import json
import os
import sys
from pathlib import Path

import torch

from ldmflow.config.common import EarlyStoppingConfig
from ldmflow.training.batching import EpochBatchSampler, make_loader
from ldmflow.training.distributed import ShardBatches, init_from_env, rank, shutdown, validate
from ldmflow.training.loop import fit

from .test_loop import LinearTask, Regression, toy_config


class DisagreeingTask(LinearTask):
    """Validation that adds up over batches, plus a per-rank term: rank 0's val_loss falls every epoch, rank 1's
    rises, so rank 1 on its own would keep only epoch 1 as best and stop early after epoch 3."""

    epoch = 0

    def validation_sums(self, model, batches):
        sums = {"squared": torch.zeros((), dtype=torch.float64), "n": torch.zeros((), dtype=torch.float64),
                "batches": torch.zeros((), dtype=torch.float64)}
        for _, batch in batches:
            sums["squared"] += (model(batch["x"]).squeeze(1) - batch["y"]).double().pow(2).sum()
            sums["n"] += len(batch["y"])
            sums["batches"] += 1
        return sums

    def validation_metrics(self, model, sums):
        self.epoch += 1
        skew = 100.0 * (-self.epoch if rank() == 0 else self.epoch)
        mse = float(sums["squared"] / sums["n"])
        return {"val_loss": 1000.0 + skew + mse, "val_mse": mse}

    def validate(self, model, loader):
        return self.validation_metrics(model, self.validation_sums(model, enumerate(loader)))


def main(out: Path) -> None:
    init_from_env(os.environ)
    cfg = toy_config(epochs=5)
    cfg.train = dataclasses.replace(cfg.train, early_stopping=EarlyStoppingConfig(patience=2))
    task = DisagreeingTask()
    result = fit(task, Regression(64, seed=1), Regression(10, seed=2), cfg, out, "toy", device=torch.device("cpu"),
                 progress=False)
    # a validation pass shared out: 10 samples in batches of 4 make 3 batches, 2 on rank 0 and 1 on rank 1
    val = Regression(10, seed=2)
    whole = make_loader(val, EpochBatchSampler(len(val), 4, 0, drop_last=False, shuffle=False))
    shard = make_loader(val, ShardBatches(EpochBatchSampler(len(val), 4, 0, drop_last=False, shuffle=False),
                                          rank(), 2))
    with torch.no_grad():
        mine = task.validation_sums(task.model, zip(shard.batch_sampler.numbers(), shard))
        sharded, alone = validate(task, task.model, shard), task.validate(task.model, whole)
    (out / f"{rank()}.json").write_text(json.dumps({
        "epoch": result["epoch"], "best": result["best"], "val_loss": [r["val_loss"] for r in result["history"]],
        "batches_scored": int(mine["batches"]), "sharded_mse": sharded["val_mse"], "whole_mse": alone["val_mse"]}))
    shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
