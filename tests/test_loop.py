"""The training loop on a toy task of its own: a linear regression with a known optimum, trained by ``fit``
in one go and cut by preemption signals and ``kill -9``, which must end bit-identical on CPU."""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from ldmflow.artifacts import RunPaths, load_checkpoint
from ldmflow.config.common import DataConfig, EarlyStoppingConfig, EmaConfig, OptimConfig, TrainConfig
from ldmflow.devices import set_deterministic
from ldmflow.errors import Preempted, TrainingError
from ldmflow.training import loop
from ldmflow.training.loop import FitConfig, fit
from ldmflow.training.optim import lr_factor

from .host_syncs import HostSyncs, count_host_syncs

REPO = Path(__file__).resolve().parents[1]
TRUE_W, TRUE_B = [1.0, -2.0, 0.5], 0.3
EPOCHS, STEPS_PER_EPOCH = 6, 8  # 64 samples, batches of 4, 2 micro-batches per step
# a mid-epoch checkpoint (SIGUSR1 at step 10) written by the loop whose state was a dict (9188aae)
OLD_LAYOUT = REPO / "tests/data/loop_checkpoint_v1_latest.pt"


class Regression(torch.utils.data.Dataset):
    """y = x @ TRUE_W + TRUE_B exactly (no noise): the optimum is known and its loss is 0."""

    def __init__(self, n: int, seed: int):
        gen = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 3, generator=gen)  # (n, 3)
        self.y = self.x @ torch.tensor(TRUE_W) + TRUE_B  # (n,)

    def __len__(self) -> int:
        return len(self.x)

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        return {"x": self.x[indices], "y": self.y[indices]}


class LinearTask:
    """A :class:`ldmflow.training.loop.Task` of three weights and a bias, starting at zero.

    ``signal_at`` / ``kill_at``: the task sends itself SIGUSR1 (a scheduler's warning) or SIGKILL during the
    forward pass of that optimizer step, so the loop is cut where a test wants it."""

    def __init__(self, signal_at: int | None = None, kill_at: int | None = None):
        self.model = nn.Linear(3, 1)
        nn.init.zeros_(self.model.weight)
        nn.init.zeros_(self.model.bias)
        self.signal_at, self.kill_at = signal_at, kill_at
        self.sampled: list[int] = []

    def loss(self, model, batch, step):
        if step == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        if step == self.signal_at:
            signal.raise_signal(signal.SIGUSR1)
        mse = (model(batch["x"]).squeeze(1) - batch["y"]).pow(2).mean()
        return mse, {"abs_err": (model(batch["x"]).squeeze(1) - batch["y"]).abs().mean()}

    def validate(self, model, loader) -> dict[str, float]:
        errors = torch.cat([model(b["x"]).squeeze(1) - b["y"] for b in loader])
        return {"val_loss": float(errors.pow(2).mean()), "val_distance": distance(model)}

    def write_samples(self, model, epoch, path) -> None:
        self.sampled.append(epoch)  # a regression has no picture to draw


def distance(model: nn.Module) -> float:
    """Euclidean distance of the weights and bias from the optimum."""
    w = torch.cat([model.weight.detach().flatten(), model.bias.detach()])
    return float((w - torch.tensor([*TRUE_W, TRUE_B])).norm())


def toy_config(epochs: int = EPOCHS, **train_keys) -> FitConfig:
    optim = OptimConfig(lr=0.1, weight_decay=0.0, warmup_steps=4, schedule="cosine", min_lr_ratio=0.05,
                        grad_clip=10.0, accumulate=2)
    train = TrainConfig(**{"epochs": epochs, "precision": "fp32", "ema": EmaConfig(decay=0.5, warmup=0),
                           "log_every": 1, "checkpoint_every_steps": 1,
                           "early_stopping": EarlyStoppingConfig(patience=0), **train_keys})
    # only what the loop is told; a resume compares it with the checkpoint's copy
    resolved = {"task": "linear-regression", "optim": {"lr": 0.1, "accumulate": 2}, "train": {"epochs": epochs}}
    return FitConfig(stage="toy", seed=7, data=DataConfig(batch_size=4), optim=optim, train=train, resolved=resolved)


def fit_toy(out: Path, epochs: int = EPOCHS, task: LinearTask | None = None, **train_keys) -> dict:
    return fit(task or LinearTask(), Regression(64, seed=1), Regression(16, seed=2), toy_config(epochs, **train_keys),
               out, "toy", device=torch.device("cpu"), progress=False)


def latest(out: Path) -> dict:
    return load_checkpoint(RunPaths(out, "toy").latest)


def assert_identical(a: dict, b: dict) -> None:
    """Two checkpoints with the same weights, EMA, AdamW moments and metrics, bit for bit."""
    for part in ("model", "ema"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    for i, moments in a["optimizer"]["state"].items():
        assert all(torch.equal(v, b["optimizer"]["state"][i][k]) for k, v in moments.items())
    drop = ("seconds", "samples_per_s")
    assert [{k: v for k, v in r.items() if k not in drop} for r in a["history"]] == \
        [{k: v for k, v in r.items() if k not in drop} for r in b["history"]]
    assert (a["epoch"], a["step"], a["best"], a["best_epoch"]) == (b["epoch"], b["step"], b["best"], b["best_epoch"])


def fit_toy_killed(out: Path, kill_at: int, **train_keys) -> None:
    """Run :func:`fit_toy` in a child process that SIGKILLs itself at step ``kill_at`` (no handler runs)."""
    code = (f"import sys; sys.path[:0] = [{str(REPO / 'src')!r}, {str(REPO)!r}]; from pathlib import Path; "
            "from tests.test_loop import LinearTask, fit_toy; "
            f"fit_toy(Path({str(out)!r}), task=LinearTask(kill_at={kill_at}), **{train_keys!r})")
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def whole(tmp_path_factory) -> tuple[dict, dict]:
    """The toy trained for EPOCHS epochs in one go: fit's result and its latest checkpoint."""
    out = tmp_path_factory.mktemp("whole")
    return fit_toy(out), latest(out)


def test_fit_drives_a_linear_regression_to_its_known_optimum(whole):
    result, ckpt = whole
    rows = result["history"]
    start = float(torch.tensor(TRUE_W).pow(2).sum() + TRUE_B**2)  # E[(x @ w + b)^2] at zero weights, x ~ N(0, 1)
    val = [r["val_loss"] for r in rows]
    assert len(rows) == EPOCHS and ckpt["step"] == EPOCHS * STEPS_PER_EPOCH
    assert all(b < a for a, b in zip(val, val[1:])), val  # every epoch ends nearer the optimum
    assert val[0] < start and val[-1] < 0.01 * start, (start, val)
    assert rows[-1]["val_distance"] < 0.15 and [r["val_distance"] for r in rows] == sorted(
        [r["val_distance"] for r in rows], reverse=True)
    assert result["best"] == {"metric": "val_loss", "value": val[-1], "epoch": EPOCHS}


def test_the_metrics_rows_report_the_scheduled_learning_rate_and_mean_losses(whole):
    result, _ = whole
    cfg = toy_config().optim
    for row in result["history"]:
        last_step = row["step"] - 1  # the row's lr is the one the epoch's last optimizer step used
        assert row["lr"] == pytest.approx(cfg.lr * lr_factor(last_step, EPOCHS * STEPS_PER_EPOCH, cfg))
        assert math.isfinite(row["train_loss"]) and row["train_abs_err"] ** 2 <= row["train_loss"] * 1.0001
    assert result["history"][0]["lr"] > result["history"][-1]["lr"]  # the cosine decay ran


@pytest.mark.parametrize("signal_at", [10, STEPS_PER_EPOCH * 3 - 1], ids=["mid-epoch", "last-step-of-an-epoch"])
def test_a_preempted_fit_resumes_to_bit_identical_weights_and_metrics(tmp_path, whole, signal_at):
    with pytest.raises(Preempted, match="signal 10 received"):
        fit_toy(tmp_path, task=LinearTask(signal_at=signal_at))
    cut = latest(tmp_path)
    assert cut["step"] == signal_at + 1 and cut["epoch"] < EPOCHS
    resumed = fit_toy(tmp_path)
    assert resumed["resumed_from"] == {"epoch": cut["epoch"], "step": cut["step"], "micro": cut["micro"]}
    assert_identical(whole[1], latest(tmp_path))


def test_a_fit_killed_with_sigkill_resumes_to_bit_identical_weights_and_metrics(tmp_path, whole):
    fit_toy_killed(tmp_path, kill_at=19)
    cut = latest(tmp_path)
    assert (cut["epoch"], cut["step"], cut["micro"]) == (2, 19, 6)  # the checkpoint of the step before the kill
    assert fit_toy(tmp_path)["resumed_from"]["step"] == 19
    assert_identical(whole[1], latest(tmp_path))


EVERY_2_EPOCHS = {"checkpoint_every_epochs": 2, "checkpoint_every_steps": 0, "checkpoint_every_minutes": 0.0}


def test_a_kill_between_latest_checkpoints_every_2_epochs_resumes_from_the_last_one_bit_identical(tmp_path, whole):
    kill_at = 3 * STEPS_PER_EPOCH + 1  # in epoch 4, after epoch 3 ended without a latest checkpoint
    fit_toy_killed(tmp_path, kill_at=kill_at, **EVERY_2_EPOCHS)
    paths = RunPaths(tmp_path, "toy")
    cut = latest(tmp_path)
    assert (cut["epoch"], cut["step"], cut["micro"]) == (2, 2 * STEPS_PER_EPOCH, 0)
    assert len(paths.metrics.read_text().splitlines()) == 1 + 3  # the CSV ran one epoch ahead of the checkpoint
    best = load_checkpoint(paths.best)
    assert best["best_epoch"] == 3 and "optimizer" not in best and "rng" not in best  # weights and EMA only
    resumed = fit_toy(tmp_path, **EVERY_2_EPOCHS)
    assert resumed["resumed_from"] == {"epoch": 2, "step": 2 * STEPS_PER_EPOCH, "micro": 0}
    assert len(paths.metrics.read_text().splitlines()) == 1 + EPOCHS
    assert_identical(whole[1], latest(tmp_path))


def test_more_epochs_continue_a_finished_run(tmp_path):
    fit_toy(tmp_path, epochs=EPOCHS - 2)
    more = fit_toy(tmp_path)
    assert more["resumed_from"] == {"epoch": EPOCHS - 2, "step": (EPOCHS - 2) * STEPS_PER_EPOCH, "micro": 0}
    assert [r["epoch"] for r in more["history"]] == list(range(1, EPOCHS + 1))


def test_a_checkpoint_of_the_dict_state_loop_resumes_mid_epoch_to_the_same_weights(tmp_path, whole):
    paths = RunPaths(tmp_path, "toy")
    paths.latest.parent.mkdir(parents=True)
    shutil.copyfile(OLD_LAYOUT, paths.latest)
    old = load_checkpoint(paths.latest)
    assert old["micro"] > 0 and old["partial"]["n_seen"] == old["micro"]  # cut mid-epoch, with running sums
    result = fit_toy(tmp_path)
    assert result["resumed_from"] == {"epoch": old["epoch"], "step": old["step"], "micro": old["micro"]}
    assert_identical(whole[1], latest(tmp_path))


@pytest.fixture
def host_syncs(monkeypatch) -> HostSyncs:
    return count_host_syncs(monkeypatch)


def quiet_config(epochs: int, log_every: int, **train) -> FitConfig:
    """The toy's config without per-step checkpoints: what a long run between log points does."""
    fc = toy_config(epochs)
    fc.train = dataclasses.replace(fc.train, log_every=log_every, checkpoint_every_steps=0,
                                   checkpoint_every_minutes=0.0, **train)
    return fc


def syncs_per_epoch(tmp_path: Path, host_syncs, samples: int, log_every: int) -> int:
    """Host reads counted while the toy trains one epoch of ``samples`` (batches of 4, 2 per optimizer step)."""
    def counted_epoch(*args):
        with host_syncs.counting():
            return train_epoch(*args)

    train_epoch = loop.train_epoch
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loop, "train_epoch", counted_epoch)
        host_syncs.count = 0
        fit(LinearTask(), Regression(samples, seed=1), Regression(16, seed=2), quiet_config(1, log_every),
            tmp_path / f"{samples}-{log_every}", "toy", device=torch.device("cpu"), progress=False)
    return host_syncs.count


def test_training_steps_between_log_points_never_wait_for_the_device(tmp_path, host_syncs):
    # 4 and 16 optimizer steps with one log point (the epoch's last step): the same reads, none per step
    short = syncs_per_epoch(tmp_path, host_syncs, 32, log_every=1000)
    assert syncs_per_epoch(tmp_path, host_syncs, 128, log_every=1000) == short, host_syncs.where
    # what is left is per epoch (its running sums start from the host) and per log point; a log point at every
    # step shows that the counter sees them
    assert syncs_per_epoch(tmp_path, host_syncs, 128, log_every=1) >= short + 15


def test_a_nan_loss_still_stops_the_run_when_it_is_read_only_at_log_points(tmp_path):
    class Diverging(LinearTask):
        def loss(self, model, batch, step):
            mse, parts = super().loss(model, batch, step)
            return (mse * float("nan") if step == 5 else mse), parts

    with pytest.raises(TrainingError, match="1 optimizer step"):
        fit(Diverging(), Regression(128, seed=1), Regression(16, seed=2), quiet_config(1, 1000), tmp_path, "toy",
            device=torch.device("cpu"), progress=False)


@pytest.mark.parametrize(("value", "expected"), [(None, True), (True, True), (False, False)])
def test_train_deterministic_defaults_to_on_for_a_cpu_run(tmp_path, monkeypatch, value, expected):
    seen = []
    monkeypatch.setattr(loop, "set_deterministic", lambda seed, deterministic: seen.append(deterministic))
    try:
        fit(LinearTask(), Regression(32, seed=1), Regression(16, seed=2), quiet_config(1, 1000, deterministic=value),
            tmp_path, "toy", device=torch.device("cpu"), progress=False)
    finally:
        set_deterministic(0)
    assert seen == [expected]


def test_accumulating_k_micro_batches_gives_the_update_of_one_batch_k_times_larger(tmp_path):
    """The presets fit smaller cards by optim.accumulate at the same effective batch: the weights must be those
    of the large batch (fp32, a task without batch statistics)."""
    def trained(batch_size: int, accumulate: int) -> dict:
        fc = toy_config(epochs=1)
        fc.optim.accumulate, fc.data.batch_size = accumulate, batch_size
        fc.train.ema.decay = 0.0
        out = tmp_path / f"b{batch_size}x{accumulate}"
        fit(LinearTask(), Regression(32, seed=1), Regression(8, seed=2), fc, out, "toy", device=torch.device("cpu"),
            progress=False)
        return latest(out)

    whole, accumulated = trained(8, 1), trained(4, 2)
    assert whole["step"] == accumulated["step"] == 4
    for k, v in whole["model"].items():
        torch.testing.assert_close(accumulated["model"][k], v)
    assert not torch.equal(whole["model"]["weight"], torch.zeros(1, 3))
