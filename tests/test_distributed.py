"""DDP on CPU (gloo): 2 processes train to the same result as 1 process with the same global batch."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from ldmflow.artifacts import load_checkpoint

from .conftest import TINY_AE, wait_for

pytestmark = pytest.mark.slow


def test_two_processes_match_one_with_the_same_global_batch(tmp_path, demo_manifest):
    exp = {**TINY_AE, "model": {**TINY_AE["model"], "variant": "plain"}, "train": {"epochs": 2}}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def train(out, batch, nproc):
        cfg = {**exp, "data": {**exp["data"], "batch_size": batch}}
        path = tmp_path / f"{out}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        args = ["train-ae", "--config", str(path), "--data", str(demo_manifest), "--out", str(tmp_path / out),
                "--threads", "1"]
        code = ("from ldmflow.launch import run_cli; import sys; "
                f"run_cli(sys.argv[1:], nproc={nproc})")
        proc = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, proc.stderr[-4000:]
        return load_checkpoint(tmp_path / out / "checkpoints/tiny_checkpoint_latest.pt")

    one = train("one", 8, 1)
    two = train("two", 4, 2)
    assert two["step"] == one["step"] and two["epoch"] == one["epoch"] == 2
    # Compare what the models compute, not raw weights: a conv bias right before a per-channel GroupNorm
    # has no effect and a gradient of pure rounding noise, which AdamW turns into arbitrary steps.
    from ldmflow.config.autoencoder import AutoencoderExperiment
    from ldmflow.config.schema import from_dict
    from ldmflow.models.autoencoder import build_autoencoder

    x = torch.rand(6, 3, 16, 16) * 2 - 1
    outs = []
    for state in (one, two):
        model = build_autoencoder(from_dict(AutoencoderExperiment, state["config"]))
        model.load_state_dict(state["model"])
        with torch.no_grad():
            outs.append(model.eval()(x, sample=False)["recon"])
    diff = (outs[0] - outs[1]).abs().max().item()
    val = [[r["val_loss"] for r in s["history"]] for s in (one, two)]
    print(f"DDP 1-vs-2 processes: max output difference {diff:.3g}, val_loss {val[0]} vs {val[1]}")
    assert diff < 0.02  # AdamW turns float rounding in near-zero gradients into lr-sized steps
    assert val[0] == pytest.approx(val[1], rel=1e-4)
    assert [r["epoch"] for r in two["history"]] == [1, 2]  # rank 0 alone wrote the history


def start_torchrun(args: list[str], nproc: int = 2) -> subprocess.Popen:
    """``ldmflow ARGS`` under torchrun (``launch.run_cli``)."""
    code = f"from ldmflow.launch import run_cli; import sys; run_cli(sys.argv[1:], nproc={nproc})"
    return subprocess.Popen([sys.executable, "-c", code, *args], env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (torchrun starts each rank in a session of its own)."""
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            out += [int(child), *descendants(int(child))]
    return out


@pytest.fixture(scope="module")
def kl_store(tmp_path_factory, demo_manifest):
    from ldmflow.stages.embed import embed_latents
    from ldmflow.stages.train_autoencoder import train_autoencoder

    root = tmp_path_factory.mktemp("ddp")
    train_autoencoder({**TINY_AE, "train": {"epochs": 1}}, demo_manifest, root / "ae")
    return embed_latents(root / "ae/checkpoints/tiny_checkpoint_best.pt", demo_manifest, root / "latents.zarr")


@pytest.mark.parametrize("stage", ["diffusion", "kl_autoencoder"])
def test_ranks_draw_their_own_noise_and_resume_after_kill_9_is_bit_identical(tmp_path, demo_manifest, kl_store,
                                                                             stage):
    """2 processes: the ranks' random streams differ (timesteps, noise, label dropout, KL samples), and a run
    whose every process was killed with SIGKILL mid-epoch resumes to the uninterrupted run's weights and RNG."""
    from .test_train_diffusion import TINY_DIFFUSION

    if stage == "diffusion":
        exp = {**TINY_DIFFUSION, "data": {**TINY_DIFFUSION["data"], "batch_size": 4, "kl_latents": "sample"},
               "model": {**TINY_DIFFUSION["model"], "label_dropout": 0.3}}
        args = ["train-diffusion", "--latents", str(kl_store)]
    else:
        exp = {**TINY_AE, "data": {**TINY_AE["data"], "batch_size": 4}}
        args = ["train-ae", "--data", str(demo_manifest)]
    exp = {**exp, "train": {**exp["train"], "epochs": 3, "checkpoint_every_steps": 1, "sample_every": 3}}
    config = tmp_path / "exp.yaml"
    config.write_text(yaml.safe_dump(exp))
    args += ["--config", str(config), "--threads", "1"]
    name = exp["name"]

    def finish(out):
        proc = start_torchrun([*args, "--out", str(tmp_path / out)])
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-4000:]
        return err

    finish("whole")
    latest = tmp_path / f"cut/checkpoints/{name}_checkpoint_latest.pt"
    for _ in range(3):  # a loaded machine may run on to an epoch's end before the kill lands: try again
        shutil.rmtree(tmp_path / "cut", ignore_errors=True)
        proc = start_torchrun([*args, "--out", str(tmp_path / "cut")])
        # mid epoch 2 (4 steps an epoch)
        wait_for(lambda: (c := load_checkpoint(latest))["step"] >= 5 and c["micro"] > 0, proc)
        for pid in [proc.pid, *descendants(proc.pid)]:  # torchrun and both ranks (own sessions), as when a node dies
            os.kill(pid, signal.SIGKILL)
        proc.wait()
        cut = load_checkpoint(latest)
        if cut["epoch"] < 3 and cut["micro"] > 0:
            break
    assert cut["epoch"] < 3 and cut["micro"] > 0, "the kill came too late to test a mid-epoch resume (3 tries)"
    assert f"resumed {name} from epoch {cut['epoch']}, step {cut['step']}" in finish("cut")

    a = load_checkpoint(tmp_path / f"whole/checkpoints/{name}_checkpoint_latest.pt")
    b = load_checkpoint(latest)
    diff = max((a["model"][k].double() - b["model"][k].double()).abs().max().item() for k in a["model"])
    print(f"{stage}, 2 processes: max |uninterrupted - resumed after kill -9| = {diff:g}")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert [r["val_loss"] for r in a["history"]] == [r["val_loss"] for r in b["history"]]
    # one RNG state per rank, each restored on its own rank: equal between the runs, different between ranks
    assert len(a["rng"]) == len(b["rng"]) == 2
    assert all(torch.equal(x["torch"], y["torch"]) for x, y in zip(a["rng"], b["rng"]))
    noise = []
    for state in a["rng"]:  # the noise each rank's next step would draw
        gen = torch.Generator()
        gen.set_state(state["torch"])
        noise.append(torch.randn(4, 4, 4, 4, generator=gen))
    assert not torch.equal(noise[0], noise[1])


def test_a_signal_to_one_rank_stops_both_at_the_same_step_and_the_run_resumes_there(tmp_path, demo_manifest):
    """SIGUSR1 to rank 1 and the launching process only (not torchrun, not rank 0): rank 0 learns of it from
    the per-step flag, both ranks stop after the same optimizer step, the launcher exits 143."""
    exp = {**TINY_AE, "data": {**TINY_AE["data"], "batch_size": 4},
           "train": {"epochs": 50, "checkpoint_every_steps": 1, "sample_every": 50}}
    config = tmp_path / "exp.yaml"
    config.write_text(yaml.safe_dump(exp))
    args = ["train-ae", "--data", str(demo_manifest), "--config", str(config), "--threads", "1", "--out",
            str(tmp_path / "run")]
    latest = tmp_path / "run/checkpoints/tiny_checkpoint_latest.pt"
    proc = start_torchrun(args)
    wait_for(latest.is_file, proc)
    ranks = [int(p) for p in descendants(proc.pid) if b"ldmflow.cli" in Path(f"/proc/{p}/cmdline").read_bytes()
             and b"torch.distributed.run" not in Path(f"/proc/{p}/cmdline").read_bytes()]
    rank1 = [p for p in ranks if b"\0RANK=1\0" in Path(f"/proc/{p}/environ").read_bytes()]
    assert len(ranks) == 2 and len(rank1) == 1
    os.kill(rank1[0], signal.SIGUSR1)
    os.kill(proc.pid, signal.SIGUSR1)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-4000:]
    state = load_checkpoint(latest)
    saved = (f"signal {signal.SIGUSR1.value} received; saved {latest} at epoch {state['epoch']}, "
             f"step {state['step']} (SIGUSR1)")
    assert err.count(saved) == 2, err[-4000:]  # rank 0 (told by rank 1's flag) and rank 1, the same step
    resumed = start_torchrun([*args, "--set", f"train.epochs={state['epoch'] + 1}"])
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0 and f"resumed tiny from epoch {state['epoch']}, step {state['step']}" in err
    print(f"DDP SIGUSR1 to rank 1: exit {proc.returncode}, both ranks saved at step {state['step']}, resumed there")


def test_ranks_whose_validation_disagrees_take_rank_0s_best_and_early_stop_and_share_validation(tmp_path):
    """2 ranks of the toy regression (tests/ddp_decisions.py): rank 1's val_loss rises every epoch while rank 0's
    falls. Both keep rank 0's best epoch and train on to the end (rank 1 alone would have stopped early, and
    ranks that decide apart wait on each other's collectives forever); validation is split by batches, and the
    split pass scores what one process scores."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "tests.ddp_decisions", str(tmp_path)]
    proc = subprocess.Popen(cmd, cwd=Path(__file__).resolve().parents[1], env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        for pid in [*descendants(proc.pid), proc.pid]:  # the ranks too (sessions of their own)
            os.kill(pid, signal.SIGKILL)
        pytest.fail(f"the ranks hung: {proc.communicate()[1][-4000:]}")
    assert proc.returncode == 0, err[-4000:]
    ranks = [json.loads((tmp_path / f"{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["epoch"] == ranks[1]["epoch"] == 5  # no early stop: rank 0's loss improved every epoch
    assert ranks[0]["best"] == ranks[1]["best"] and ranks[0]["best"]["epoch"] == 5
    assert ranks[0]["val_loss"] == ranks[1]["val_loss"]  # one history, rank 0's
    assert [r["batches_scored"] for r in ranks] == [2, 1]
    assert ranks[0]["sharded_mse"] == ranks[1]["sharded_mse"] == pytest.approx(ranks[0]["whole_mse"], rel=1e-12)
    best = load_checkpoint(tmp_path / "checkpoints/toy_checkpoint_best.pt")
    assert best["epoch"] == 5 and best["best_epoch"] == 5
