"""The real Snakefile on a tiny demo, in a temporary copy of the workflow."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from ldmflow.artifacts import load_checkpoint
from ldmflow.data.latent_store import LatentStore

from .conftest import REPO, run_cli, snakemake_bin

pytestmark = pytest.mark.slow

# What a copy of the project needs to run the workflow, with the named-profile symlinks (lsf -> profiles/lsf).
WORKFLOW_PARTS = ("Snakefile", "rules", "workflow_scripts", "config", "profiles", "envs", "lsf", "slurm")


def project_copy(root: Path) -> Path:
    """Copy the workflow's parts into ROOT, symlinks as symlinks."""
    root.mkdir(parents=True, exist_ok=True)
    for part in WORKFLOW_PARTS:
        src = REPO / part
        if src.is_symlink():
            (root / part).symlink_to(src.readlink())
        else:
            (shutil.copytree if src.is_dir() else shutil.copy)(src, root / part)
    return root


def tiny_workflow(root: Path) -> Path:
    """Copy the workflow into ROOT with a 24-image, 16 px demo and 1-2 epoch experiments."""
    return make_tiny(project_copy(root))


def make_tiny(root: Path) -> Path:
    """Shrink the workflow config and the demo experiment files in ROOT to a 24-image, 16 px demo and 1-2
    epoch experiments (in place)."""
    config = yaml.safe_load((root / "config/config.yaml").read_text())
    config["data"]["demo"] = {"n": 24, "size": 16, "seed": 1}
    for path in config["autoencoders"][:2]:
        exp = yaml.safe_load((root / path).read_text())
        exp["data"].update(image_size=16, batch_size=8)
        exp["model"]["base_channels"] = 8
        exp["train"].update(epochs=2, sample_every=1)
        (root / path).write_text(yaml.safe_dump(exp))
    config["autoencoders"] = config["autoencoders"][:2]
    for path in config.get("diffusion", []):
        exp = yaml.safe_load((root / path).read_text())
        exp["data"]["batch_size"] = 8
        exp["model"].update(base_channels=16, head_channels=16)
        exp["diffusion"] = {**exp.get("diffusion", {}), "timesteps": 100}
        exp["sampling"].update(steps=3, per_class=1)
        exp["optim"]["warmup_steps"] = 2
        exp["train"].update(epochs=2, sample_every=2)
        (root / path).write_text(yaml.safe_dump(exp))
    for path in config.get("controlnets", []):
        exp = yaml.safe_load((root / path).read_text())
        exp["data"]["batch_size"] = 8
        exp["sampling"].update(steps=3, grid_rows=2)
        exp["evaluation"]["fidelity_samples"] = 4
        exp["train"].update(epochs=2, sample_every=1)
        (root / path).write_text(yaml.safe_dump(exp))
    config["sampling"] = {"n": 6, "seed": 1}
    config["synthetic"] = [{**entry, "n": 8} for entry in config.get("synthetic", [])]
    config["memorization"] = {"image_size": 16, "tiles": 2, "n": 5}
    config["judge"] = {"epochs": 2, "width": 4, "eval_every": 1, "folds": 2}
    (root / "config/config.yaml").write_text(yaml.safe_dump(config))
    return root


def smk(root: Path, *args: str, check: bool = True, cores: tuple[str, ...] = ("--cores", "2")
        ) -> subprocess.CompletedProcess:
    proc = subprocess.run([snakemake_bin(), *cores, *args], cwd=root, env=smk_env(), capture_output=True, text=True,
                          timeout=900)
    if check and proc.returncode:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def smk_env() -> dict[str, str]:
    """Snakemake's environment: one torch thread per job, and this venv first on PATH (cluster jobs too)."""
    return {**os.environ, "OMP_NUM_THREADS": "1",
            "PATH": f"{Path(snakemake_bin()).parent}{os.pathsep}{os.environ.get('PATH', '')}"}


def experiment(root: Path, index: int = 0) -> tuple[str, Path]:
    """The name and file of the workflow's INDEX-th autoencoder experiment."""
    path = root / yaml.safe_load((root / "config/config.yaml").read_text())["autoencoders"][index]
    return yaml.safe_load(path.read_text())["name"], path


def edit_experiment(root: Path, index: int = 0, **train) -> str:
    """Update the ``train`` section of an experiment file; returns the experiment's name."""
    name, path = experiment(root, index)
    exp = yaml.safe_load(path.read_text())
    exp["train"].update(train)
    path.write_text(yaml.safe_dump(exp))
    return name


def checkpoint_field(path: Path, key: str, default=-1):
    """A field of a checkpoint being written by another process (``default`` while there is none)."""
    try:
        return load_checkpoint(path)[key]
    except Exception:
        return default


def wait_until(predicate, proc: subprocess.Popen, what: str, timeout: float = 600) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"snakemake ended ({proc.returncode}) before {what}")
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def training_process(root: Path, name: str) -> int:
    """The pid of the process training experiment NAME under Snakemake in ROOT (it holds the job's log open)."""
    log = str(root / f"logs/autoencoder/{name}.log")
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if ".train.py" not in (proc / "cmdline").read_bytes().decode(errors="replace"):
                continue
            if any(os.readlink(fd) == log for fd in (proc / "fd").iterdir()):
                return int(proc.name)
        except OSError:  # the process ended meanwhile
            continue
    raise AssertionError(f"no process is training {name} in {root}")


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = load_checkpoint(a)["model"], load_checkpoint(b)["model"]
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def planned_jobs(proc: subprocess.CompletedProcess) -> dict[str, int]:
    """The job-count table of a dry run: rule -> count."""
    lines = (proc.stdout + proc.stderr).splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("job ") and "count" in line)
    table = {}
    for line in lines[start + 2:]:
        parts = line.split()
        if len(parts) != 2 or parts[0] == "total":
            break
        table[parts[0]] = int(parts[1])
    return table


FULL_PLAN = {"all": 1, "demo_data": 1, "train_autoencoder": 2, "select_autoencoder": 1, "embed_latents": 1,
             "train_diffusion": 2, "sample_diffusion": 2, "evaluate_memorization": 5, "memorization_summary": 1,
             "train_controlnet": 3, "sample_controlnet": 3, "controlnet_summary": 1, "training_curves": 7,
             "train_judge": 1, "evaluate_samples": 2, "evaluate_controlnet": 3, "evaluation_summary": 1,
             "synthesize": 2, "audit_synthetic": 2}


def test_workflow_plans_runs_and_reruns_only_what_changed(tmp_path):
    root = tiny_workflow(tmp_path)
    assert planned_jobs(smk(root, "-n")) == FULL_PLAN
    assert "Congratulations" in (smk(root, "--lint").stdout + smk(root, "--lint").stderr)
    dag = smk(root, "--dag").stdout
    assert "digraph" in dag and all(rule in dag for rule in FULL_PLAN if rule != "all")
    if shutil.which("dot"):
        svg = subprocess.run(["dot", "-Tsvg"], input=dag, capture_output=True, text=True, check=True).stdout
        assert "<svg" in svg

    smk(root)
    config = yaml.safe_load((root / "config/config.yaml").read_text())
    names = [yaml.safe_load((root / p).read_text())["name"] for p in config["autoencoders"]]
    for name in names:
        run = root / "results/autoencoder" / name
        assert (run / f"checkpoints/{name}_checkpoint_best.pt").is_file()
        assert (run / f"checkpoints/{name}_checkpoint_latest.pt").is_file()
        assert (run / "samples/epoch_002.png").is_file() and (run / f"{name}_curves.png").is_file()
        assert (root / f"results/benchmarks/autoencoder/{name}.tsv").is_file()
        assert "epoch 2/2" in (root / f"logs/autoencoder/{name}.log").read_text()
    selected = yaml.safe_load((root / "results/autoencoder/selected.json").read_text())
    assert selected["name"] in names and len(selected["candidates"]) == 2
    assert (root / "results/autoencoder/validation_curves.png").is_file()
    store = LatentStore(root / "results/latents/latents.zarr")
    assert store.n == 24 and store.attrs["autoencoder"]["name"] == selected["name"]
    assert (root / "results/benchmarks/latents/embed.tsv").is_file()
    for path in config["diffusion"]:
        name = yaml.safe_load((root / path).read_text())["name"]
        run = root / "results/diffusion" / name
        assert load_checkpoint(run / f"checkpoints/{name}_checkpoint_best.pt")["extra"]["autoencoder_sha256"] == \
            store.attrs["autoencoder"]["sha256"]
        assert len(list((run / "eval_samples").glob("sample_*.png"))) == 6
        summary = json.loads((root / f"results/memorization/diffusion/{name}/summary.json").read_text())
        assert summary["counts"]["generated"] == 6
        for out in ("per_sample.csv", "histogram.png", "top_matches.png"):
            assert (root / f"results/memorization/diffusion/{name}" / out).is_file()
    table = pd.read_csv(root / "results/memorization/summary.csv")
    evaluated = [f"{stage}/{yaml.safe_load((root / p).read_text())['name']}"
                 for stage, key in (("diffusion", "diffusion"), ("controlnet", "controlnets")) for p in config[key]]
    assert sorted(table["experiment"]) == sorted(evaluated)
    # the headline verdict is calibrated on the store's val images, with an interval on every fraction
    assert table["calibrated"].all() and (table["criterion"] == "calibrated").all()
    assert (table["memorized_ci_low"] <= table["memorized_fraction"]).all()
    assert table["reference_false_flag_rate"].notna().all()
    for exp in evaluated:  # ControlNet samples too: each under another held-out control
        assert (root / f"results/memorization/{exp}/summary.json").is_file()
    assert len(list((root / "results/controlnet").glob("*/eval_samples/sample_*.png"))) == 6 * 3
    # the judge's pixel-space scores, each row with the judge's own real-val figures
    assert json.loads((root / "results/judge/judge.json").read_text())["real_val"]["n"] >= 1
    scores = pd.read_csv(root / "results/evaluation/summary.csv")
    assert sorted(scores["experiment"]) == sorted(evaluated) and scores["judge_val_miou"].notna().all()
    assert scores["base_miou"].notna().sum() == 3  # each ControlNet beside its uncontrolled base
    for name in ("demo_unet_tiny", "demo_controlnet_concat"):  # the synthetic sets, each audited
        assert len(pd.read_csv(root / f"results/synthetic/{name}/manifest.csv")) == 8
        audit = json.loads((root / f"results/synthetic/{name}/audit/summary.json").read_text())
        assert audit["counts"]["generated"] == 8
    assert "Nothing to be done" in (smk(root, "-n").stdout + smk(root, "-n").stderr)

    smk(root, "--report", "report.html")
    report = (root / "report.html").read_text(errors="replace")
    for category in ("Autoencoder comparison", "Training curves", "Sample grids", "Memorization", "Evaluation",
                     "Summary"):
        assert category in report, category

    # editing one autoencoder experiment reruns it and everything downstream of the selection, nothing else
    config = yaml.safe_load((root / "config/config.yaml").read_text())
    edited = root / config["autoencoders"][0]
    exp = yaml.safe_load(edited.read_text())
    exp["optim"]["lr"] /= 2  # a real change, whatever the file says
    edited.write_text(yaml.safe_dump(exp))
    expected = {**FULL_PLAN, "train_autoencoder": 1, "training_curves": 6}
    del expected["demo_data"]
    assert planned_jobs(smk(root, "-n")) == expected


def test_bad_experiment_file_stops_the_plan_naming_file_and_key(tmp_path):
    root = tiny_workflow(tmp_path)
    config = yaml.safe_load((root / "config/config.yaml").read_text())
    path = root / config["autoencoders"][0]
    exp = yaml.safe_load(path.read_text())
    exp["model"]["downsampling"] = 4
    path.write_text(yaml.safe_dump(exp))
    proc = smk(root, "-n", check=False)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "unknown key 'model.downsampling'" in out and config["autoencoders"][0] in out


def test_bad_workflow_config_is_refused(tmp_path):
    root = tiny_workflow(tmp_path)
    proc = smk(root, "-n", "--config", "selection={'mode': 'best'}", check=False)
    assert proc.returncode != 0 and "best" in (proc.stdout + proc.stderr)


def test_a_killed_training_job_resumes_when_the_workflow_reruns(tmp_path):
    root = tiny_workflow(tmp_path / "wf")
    # a step checkpoint after every optimizer step; the best epoch stays epoch 1 (no later epoch beats it by
    # min_delta), so the resumed job never rewrites the best checkpoint: it has to survive the kill
    name = edit_experiment(root, epochs=12, checkpoint_every_steps=1,
                           early_stopping={"metric": "val_loss", "patience": 0, "min_delta": 100.0})
    _, config = experiment(root)
    run = root / "results/autoencoder" / name
    latest, best = run / f"checkpoints/{name}_checkpoint_latest.pt", run / f"checkpoints/{name}_checkpoint_best.pt"

    proc = subprocess.Popen([snakemake_bin(), "--cores", "2"], cwd=root, env=smk_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        wait_until(lambda: checkpoint_field(latest, "epoch") >= 2, proc, f"{name} reached epoch 2")
        os.kill(training_process(root, name), signal.SIGKILL)
        out, _ = proc.communicate(timeout=600)
    finally:
        proc.kill()
    assert proc.returncode != 0 and "Error in rule train_autoencoder" in out
    reached = load_checkpoint(latest)
    assert 2 <= reached["epoch"] < 12, "the kill came too late to test a resume"
    assert best.is_file(), "the failed job's best checkpoint was deleted"

    smk(root)
    log = (root / f"logs/autoencoder/{name}.log").read_text()
    assert f"resumed {name} from epoch {reached['epoch']}, step {reached['step']}" in log
    assert "epoch 12/12" in log

    whole = tmp_path / "whole"
    run_cli("train-ae", "--config", str(config), "--data", str(root / "results/data/demo/manifest.csv"),
            "--out", str(whole), "--threads", "1")
    assert same_weights(latest, whole / f"checkpoints/{name}_checkpoint_latest.pt")
    assert same_weights(best, whole / f"checkpoints/{name}_checkpoint_best.pt")
    assert load_checkpoint(best)["best_epoch"] == 1
    resumed, uninterrupted = (pd.read_csv(d / f"{name}_metrics.csv") for d in (run, whole))
    assert resumed["val_loss"].tolist() == uninterrupted["val_loss"].tolist() and len(resumed) == 12


def tiny_controlnet_workflow(root: Path) -> Path:
    """The tiny workflow with one diffusion experiment, the base of every ControlNet."""
    tiny_workflow(root)
    config = yaml.safe_load((root / "config/config.yaml").read_text())
    config["diffusion"] = config["diffusion"][:1]
    (root / "config/config.yaml").write_text(yaml.safe_dump(config))
    return root


def test_workflow_trains_every_controlnet_on_its_base(tmp_path):
    root = tiny_controlnet_workflow(tmp_path)
    target = "results/controlnet/control_fidelity.csv"
    plan = planned_jobs(smk(root, "-n", target))
    assert plan["train_controlnet"] == 3 and plan["controlnet_summary"] == 1 and plan["train_diffusion"] == 1
    smk(root, target)
    config = yaml.safe_load((root / "config/config.yaml").read_text())
    names = [yaml.safe_load((root / p).read_text())["name"] for p in config["controlnets"]]
    for name in names:
        run = root / "results/controlnet" / name
        for part in (f"checkpoints/{name}_checkpoint_best.pt", f"checkpoints/{name}_checkpoint_latest.pt",
                     f"{name}_metrics.csv", "control_fidelity.json", "samples/epoch_002.png"):
            assert (run / part).is_file(), part
        assert (root / f"results/benchmarks/controlnet/{name}.tsv").is_file()
        assert "epoch 2/2" in (root / f"logs/controlnet/{name}.log").read_text()
    table = (root / target).read_text().splitlines()
    assert table[0].startswith("experiment,fusion,signal,base") and len(table) == 4
    assert "Nothing to be done" in (smk(root, "-n", target).stdout + smk(root, "-n", target).stderr)

    # editing one ControlNet file reruns that ControlNet and the summary, nothing upstream
    edited = root / config["controlnets"][0]
    exp = yaml.safe_load(edited.read_text())
    exp["optim"]["lr"] /= 2  # a real change, whatever the file says
    edited.write_text(yaml.safe_dump(exp))
    assert planned_jobs(smk(root, "-n", target)) == {"train_controlnet": 1, "controlnet_summary": 1}


def test_a_controlnet_whose_base_is_not_in_the_workflow_stops_the_plan(tmp_path):
    root = tiny_workflow(tmp_path)
    config = yaml.safe_load((root / "config/config.yaml").read_text())
    path = root / config["controlnets"][0]
    exp = yaml.safe_load(path.read_text())
    exp["base"] = "no_such_unet"
    path.write_text(yaml.safe_dump(exp))
    proc = smk(root, "-n", check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and config["controlnets"][0] in out
    assert "key 'base' names 'no_such_unet', which is not a diffusion experiment of the workflow" in out
