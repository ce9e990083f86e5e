import doctest
import math
import os
import signal
from pathlib import Path

import pytest
import torch
import yaml

from ldmflow.artifacts import load_checkpoint, save_checkpoint
from ldmflow.config.common import OptimConfig
from ldmflow.errors import EXIT_PREEMPTED, TrainingError
from ldmflow.stages.train_autoencoder import train_autoencoder
from ldmflow.training.batching import EpochBatchSampler, class_weights
from ldmflow.training.optim import Ema, lr_factor
from ldmflow.training.state import LoopState, PartialEpoch

from .conftest import run_cli, start_cli, wait_for


def test_autoencoder_trains_and_writes_its_outputs(tmp_path, demo_manifest, tiny_ae):
    tiny_ae["train"]["epochs"] = 4
    result = train_autoencoder(tiny_ae, demo_manifest, tmp_path)
    rows = result["history"]
    assert len(rows) == 4 and rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert rows[-1]["val_loss"] < rows[0]["val_loss"]
    for name in ("checkpoints/tiny_checkpoint_best.pt", "checkpoints/tiny_checkpoint_latest.pt", "tiny_metrics.csv",
                 "samples/epoch_001.png", "samples/epoch_004.png"):
        assert (tmp_path / name).is_file(), name
    header = (tmp_path / "tiny_metrics.csv").read_text().splitlines()[0].split(",")
    for col in ("train_rgb", "train_seg", "train_cls", "val_rgb", "val_seg", "val_cls", "val_psnr", "val_miou",
                "val_acc", "val_psnr_border", "val_psnr_interior", "val_psnr_border_bg", "val_psnr_interior_bg", "lr",
                "seconds"):
        assert col in header
    ckpt = load_checkpoint(tmp_path / "checkpoints/tiny_checkpoint_latest.pt")
    assert ckpt["config"]["data"]["classes"] == ["circle", "square", "triangle"]
    assert ckpt["epoch"] == 4 and "optimizer" in ckpt and "torch" in ckpt["rng"][0]


def test_same_seed_same_weights_and_rerun_is_a_noop(tmp_path, demo_manifest, tiny_ae):
    train_autoencoder(tiny_ae, demo_manifest, tmp_path / "a")
    train_autoencoder(tiny_ae, demo_manifest, tmp_path / "b")
    a = load_checkpoint(tmp_path / "a/checkpoints/tiny_checkpoint_latest.pt")["model"]
    b = load_checkpoint(tmp_path / "b/checkpoints/tiny_checkpoint_latest.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    again = train_autoencoder(tiny_ae, demo_manifest, tmp_path / "a")
    assert again["resumed_from"]["epoch"] == 2 and len(again["history"]) == 2


def test_changed_config_starts_fresh_more_epochs_continue(tmp_path, demo_manifest, tiny_ae):
    train_autoencoder(tiny_ae, demo_manifest, tmp_path)
    tiny_ae["train"]["epochs"] = 3
    more = train_autoencoder(tiny_ae, demo_manifest, tmp_path)
    assert more["resumed_from"]["epoch"] == 2 and len(more["history"]) == 3
    tiny_ae["optim"]["lr"] = 1e-3
    fresh = train_autoencoder(tiny_ae, demo_manifest, tmp_path)
    assert fresh["resumed_from"] is None and len(fresh["history"]) == 3


def test_early_stopping_stops(tmp_path, demo_manifest, tiny_ae):
    tiny_ae["train"].update(epochs=20, early_stopping={"metric": "val_loss", "patience": 1, "min_delta": 10.0})
    result = train_autoencoder(tiny_ae, demo_manifest, tmp_path)
    assert len(result["history"]) == 2 and result["best"]["epoch"] == 1


def test_non_finite_loss_stops_with_a_clear_error(tmp_path, demo_manifest, tiny_ae):
    tiny_ae["optim"]["lr"] = 1e30
    tiny_ae["optim"]["grad_clip"] = None
    with pytest.raises(TrainingError, match="NaN or inf"):
        train_autoencoder(tiny_ae, demo_manifest, tmp_path)
    assert not (tmp_path / "checkpoints/tiny_checkpoint_best.pt").exists() or math.isfinite(
        load_checkpoint(tmp_path / "checkpoints/tiny_checkpoint_best.pt")["best"])


def start_training(config, manifest, out):
    return start_cli("train-ae", "--config", str(config), "--data", str(manifest), "--out", str(out), "--threads", "1")


def test_resume_after_kill_9_gives_identical_weights(tmp_path, demo_manifest, tiny_ae):
    tiny_ae["train"].update(epochs=6, checkpoint_every_steps=1)
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_ae))
    run_cli("train-ae", "--config", str(config), "--data", str(demo_manifest), "--out", str(tmp_path / "whole"),
            "--threads", "1")

    latest = tmp_path / "cut/checkpoints/tiny_checkpoint_latest.pt"
    # first kill: mid-epoch, just after a step checkpoint; second kill: later, in another epoch
    for seen in (2, 6):
        proc = start_training(config, demo_manifest, tmp_path / "cut")
        wait_for(lambda seen=seen: load_checkpoint(latest)["step"] >= seen, proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    state = load_checkpoint(latest)
    assert state["epoch"] < 6, "the kills came too late to test a resume"
    done = run_cli("train-ae", "--config", str(config), "--data", str(demo_manifest), "--out", str(tmp_path / "cut"),
                   "--threads", "1")
    assert "resumed tiny from epoch" in done.stderr
    a = load_checkpoint(tmp_path / "whole/checkpoints/tiny_checkpoint_latest.pt")
    b = load_checkpoint(latest)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert (tmp_path / "whole/tiny_metrics.csv").read_text().splitlines()[0] == \
        (tmp_path / "cut/tiny_metrics.csv").read_text().splitlines()[0]
    assert [r["val_loss"] for r in a["history"]] == [r["val_loss"] for r in b["history"]]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, pytest.param(signal.SIGUSR1, marks=pytest.mark.slow),
                                 pytest.param(signal.SIGUSR2, marks=pytest.mark.slow)], ids=lambda s: s.name)
def test_each_scheduler_signal_saves_the_current_step_and_the_rerun_resumes_there(tmp_path, demo_manifest, tiny_ae,
                                                                                 sig):
    # LSF sends SIGINT first (bkill, -W limit), SLURM SIGTERM, #SBATCH --signal / bsub -wa USR1 or USR2
    tiny_ae["train"].update(epochs=50, checkpoint_every_steps=1)
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_ae))
    latest = tmp_path / "run/checkpoints/tiny_checkpoint_latest.pt"
    proc = start_training(config, demo_manifest, tmp_path / "run")
    wait_for(latest.is_file, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_PREEMPTED == 143, err[-3000:]
    state = load_checkpoint(latest)
    epoch, step = state["epoch"], state["step"]
    assert (f"signal {sig.value} received; saved {latest} at epoch {epoch}, step {step} ({sig.name})" in err
            or f"signal {sig.value} received after epoch {epoch}; saved {latest} ({sig.name})" in err), err[-3000:]
    assert 0 <= epoch < 50 and step >= 1
    done = run_cli("train-ae", "--config", str(config), "--data", str(demo_manifest), "--out", str(tmp_path / "run"),
                   "--threads", "1", "--set", f"train.epochs={epoch + 1}")
    assert f"resumed tiny from epoch {epoch}, step {step}" in done.stderr
    print(f"{sig.name}: exit {proc.returncode}, saved and resumed at epoch {epoch}, step {step}")


def test_bf16_autocast_trains_on_cpu(tmp_path, demo_manifest, tiny_ae):
    tiny_ae["train"].update(epochs=3, sample_every=3)
    fp32 = train_autoencoder(tiny_ae, demo_manifest, tmp_path / "fp32")
    tiny_ae["train"]["precision"] = "bf16"
    bf16 = train_autoencoder(tiny_ae, demo_manifest, tmp_path / "bf16")
    losses = [r["train_loss"] for r in bf16["history"]]
    print(f"bf16 autoencoder train_loss {losses}, fp32 {[r['train_loss'] for r in fp32['history']]}")
    assert all(map(math.isfinite, losses)) and losses[-1] < losses[0]
    assert bf16["history"][-1]["val_loss"] < bf16["history"][0]["val_loss"]
    assert losses != [r["train_loss"] for r in fp32["history"]]  # autocast really ran in bf16


def test_fp16_overflow_skips_train_on_and_move_neither_weights_nor_moments(tmp_path, demo_manifest, tiny_ae):
    """A loss scale far too large overflows fp16 in the first steps: the grad scaler skips them (no weight
    decay, no AdamW moment or step count), lowers the scale, and training goes on (max_bad_steps is 0)."""
    from ldmflow.config.autoencoder import AutoencoderExperiment
    from ldmflow.config.schema import from_dict
    from ldmflow.devices import set_deterministic
    from ldmflow.models.autoencoder import build_autoencoder

    tiny_ae["train"].update(epochs=1, sample_every=50, precision="fp16", fp16_init_scale=2.0**24)
    latest = tmp_path / "checkpoints/tiny_checkpoint_latest.pt"
    first = train_autoencoder(tiny_ae, demo_manifest, tmp_path)  # 4 steps, every one overflows
    state = load_checkpoint(latest)
    set_deterministic(tiny_ae["seed"])
    init = build_autoencoder(from_dict(AutoencoderExperiment, state["config"])).state_dict()
    assert state["step"] == 4 and state["bad_steps"] == 0 and state["scaler"]["scale"] == 2.0**20
    assert state["optimizer"]["state"] == {}  # AdamW never stepped: no moments, no step count
    assert all(torch.equal(init[k], state["model"][k]) for k in init)  # and no weight decay either
    assert math.isfinite(first["history"][0]["train_loss"])

    tiny_ae["train"]["epochs"] = 8  # resumable: the scale keeps falling until the steps fit in fp16
    more = train_autoencoder(tiny_ae, demo_manifest, tmp_path)
    trained = load_checkpoint(latest)
    adam_steps = {int(s["step"]) for s in trained["optimizer"]["state"].values()}
    losses = [r["train_loss"] for r in more["history"]]
    print(f"fp16: {trained['step']} steps, AdamW took {adam_steps}, scale {trained['scaler']['scale']:g}, "
          f"train_loss {losses}")
    assert len(adam_steps) == 1 and 0 < adam_steps.pop() < trained["step"] == 32 and trained["bad_steps"] == 0
    assert all(map(math.isfinite, losses)) and losses[-1] < losses[0]

    # A scale that has grown too large later in a run (it doubles after 2000 clean steps): the epoch's
    # overflowing steps leave the weights and AdamW's moments and step count exactly as they were.
    trained["scaler"]["scale"] = 2.0**40
    save_checkpoint(trained, latest)
    tiny_ae["train"]["epochs"] = 9
    train_autoencoder(tiny_ae, demo_manifest, tmp_path)
    after = load_checkpoint(latest)
    assert after["step"] == trained["step"] + 4 and after["scaler"]["scale"] == 2.0**36
    assert all(torch.equal(trained["model"][k], after["model"][k]) for k in trained["model"])
    for i, moments in trained["optimizer"]["state"].items():
        assert all(torch.equal(moments[k], after["optimizer"]["state"][i][k]) for k in ("step", "exp_avg",
                                                                                        "exp_avg_sq"))


def test_checkpoints_are_atomic_and_untrusted(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint({"format": "ldmflow-checkpoint-v1", "w": torch.ones(2)}, path)
    assert list(tmp_path.iterdir()) == [path]
    assert torch.equal(load_checkpoint(path)["w"], torch.ones(2))

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"format": "ldmflow-checkpoint-v1", "x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(TrainingError, match="not a readable ldmflow checkpoint"):
        load_checkpoint(tmp_path / "evil.pt")
    torch.save({"w": 1}, tmp_path / "other.pt")
    with pytest.raises(TrainingError, match="not an ldmflow checkpoint"):
        load_checkpoint(tmp_path / "other.pt")


def test_sampler_is_seeded_resumable_and_sharded():
    s = EpochBatchSampler(20, 4, seed=1)
    s.set_epoch(3)
    full = list(s)
    s.set_epoch(3, start=2)
    assert list(s) == full[2:]
    s.set_epoch(4)
    assert list(s) != full
    shards = [EpochBatchSampler(20, 2, seed=1, rank=r, world_size=2) for r in (0, 1)]
    for sh in shards:
        sh.set_epoch(3)
    merged = [a + b for a, b in zip(*shards)]
    assert merged == full


def test_weighted_sampling_balances_classes():
    labels = torch.tensor([0] * 90 + [1] * 10)
    s = EpochBatchSampler(100, 100, seed=0, weights=class_weights(labels, 1.0))
    picks = torch.tensor([i for b in s for i in b])
    share = (labels[picks] == 1).float().mean()
    assert 0.35 < share < 0.65
    assert torch.allclose(class_weights(labels, 0.0), torch.ones(100))


def test_lr_schedule_and_ema():
    cfg = OptimConfig(lr=1.0, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    assert lr_factor(0, 100, cfg) == pytest.approx(0.1) and lr_factor(9, 100, cfg) == pytest.approx(1.0)
    assert lr_factor(100, 100, cfg) == pytest.approx(0.1) and 0.1 < lr_factor(55, 100, cfg) < 1
    model = torch.nn.Linear(2, 2)
    ema = Ema(model, decay=0.9, warmup=0)
    with torch.no_grad():
        model.weight.add_(1.0)
    before = ema.model.weight.clone()
    ema.update(model, step=1)
    assert torch.allclose(ema.model.weight, before + 0.1)
    assert Ema(model, 0.999, 100).rate(0) == pytest.approx(0.1)


def test_loop_state_round_trips_through_a_checkpoint_and_an_older_one_keeps_defaults(tmp_path):
    state = LoopState(epoch=3, step=30, micro=4, best=0.5, best_epoch=2, bad_epochs=1, bad_steps=2,
                      history=[{"epoch": 1, "val_loss": 0.7}], partial=PartialEpoch({"loss": 1.5}, 4, 2.0, 0.1))
    path = tmp_path / "c.pt"
    save_checkpoint({"format": "ldmflow-checkpoint-v1", **state.to_checkpoint()}, path)
    assert LoopState.from_checkpoint(load_checkpoint(path)) == state
    older = {"format": "ldmflow-checkpoint-v1", "epoch": 2, "step": 20, "best": 0.5, "history": [],
             "partial": {"sums": {"loss": 1.0}, "n_seen": 2}}  # no micro, bad_steps, early_stopped or seconds
    assert LoopState.from_checkpoint(older) == LoopState(epoch=2, step=20, best=0.5,
                                                         partial=PartialEpoch({"loss": 1.0}, 2))


def test_build_optimizer_docstring_example_runs(monkeypatch):
    import ldmflow.training.optim

    monkeypatch.chdir(Path(__file__).resolve().parents[1])  # the example loads a repository config
    result = doctest.testmod(ldmflow.training.optim, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 3 and result.failed == 0
