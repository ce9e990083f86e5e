"""The real Snakefile on a tiny demo, in a temporary copy of the workflow."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from ldmflow.latents import LatentStore

from .conftest import REPO, snakemake_bin

pytestmark = pytest.mark.slow

WORKFLOW_PARTS = ("Snakefile", "rules", "workflow_scripts", "config", "profiles", "envs")


def tiny_workflow(root: Path) -> Path:
    """Copy the workflow into ROOT with a 24-image, 16 px demo and 1-2 epoch experiments."""
    for part in WORKFLOW_PARTS:
        src = REPO / part
        (shutil.copytree if src.is_dir() else shutil.copy)(src, root / part)
    config = yaml.safe_load((root / "config/config.yaml").read_text())
    config["data"]["demo"] = {"n": 24, "size": 16, "seed": 1}
    for path in config["autoencoders"][:2]:
        exp = yaml.safe_load((root / path).read_text())
        exp["data"].update(image_size=16, batch_size=8)
        exp["model"]["base_channels"] = 8
        exp["train"].update(epochs=2, sample_every=1)
        (root / path).write_text(yaml.safe_dump(exp))
    config["autoencoders"] = config["autoencoders"][:2]
    (root / "config/config.yaml").write_text(yaml.safe_dump(config))
    return root


def smk(root: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([snakemake_bin(), "--cores", "2", *args], cwd=root, env=env, capture_output=True, text=True,
                          timeout=900)
    if check and proc.returncode:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


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


def test_workflow_plans_runs_and_reruns_only_what_changed(tmp_path):
    root = tiny_workflow(tmp_path)
    plan = planned_jobs(smk(root, "-n"))
    assert plan == {"all": 1, "demo_data": 1, "select_autoencoder": 1, "train_autoencoder": 2, "embed_latents": 1}
    assert "Congratulations" in (smk(root, "--lint").stdout + smk(root, "--lint").stderr)
    dag = smk(root, "--dag").stdout
    assert "digraph" in dag and "train_autoencoder" in dag and "select_autoencoder" in dag

    smk(root)
    names = [yaml.safe_load((root / p).read_text())["name"]
             for p in yaml.safe_load((root / "config/config.yaml").read_text())["autoencoders"]]
    for name in names:
        run = root / "results/autoencoder" / name
        assert (run / f"checkpoints/{name}_checkpoint_best.pt").is_file()
        assert (run / f"checkpoints/{name}_checkpoint_latest.pt").is_file()
        assert (run / "samples/epoch_002.png").is_file()
        assert (root / f"results/benchmarks/autoencoder/{name}.tsv").is_file()
        assert "epoch 2/2" in (root / f"logs/autoencoder/{name}.log").read_text()
    selected = yaml.safe_load((root / "results/autoencoder/selected.json").read_text())
    assert selected["name"] in names and len(selected["candidates"]) == 2
    assert (root / "results/autoencoder/validation_curves.png").is_file()
    store = LatentStore(root / "results/latents/latents.zarr")
    assert store.n == 24 and store.attrs["autoencoder"]["name"] == selected["name"]
    assert (root / "results/benchmarks/latents/embed.tsv").is_file()
    assert "Nothing to be done" in (smk(root, "-n").stdout + smk(root, "-n").stderr)

    # editing one experiment reruns that experiment and what depends on it, nothing else
    config = yaml.safe_load((root / "config/config.yaml").read_text())
    edited = root / config["autoencoders"][0]
    exp = yaml.safe_load(edited.read_text())
    exp["optim"]["lr"] = 1e-3
    edited.write_text(yaml.safe_dump(exp))
    plan = planned_jobs(smk(root, "-n"))
    assert plan == {"all": 1, "select_autoencoder": 1, "train_autoencoder": 1, "embed_latents": 1}


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


def tiny_controlnet_workflow(root: Path) -> Path:
    """The tiny workflow with 2-epoch diffusion and ControlNet experiments (one base)."""
    tiny_workflow(root)
    config = yaml.safe_load((root / "config/config.yaml").read_text())
    config["diffusion"] = config["diffusion"][:1]
    for path in config["diffusion"]:
        exp = yaml.safe_load((root / path).read_text())
        exp["data"]["batch_size"] = 8
        exp["optim"]["warmup_steps"] = 2
        exp["train"].update(epochs=2, sample_every=1)
        exp["sampling"].update(steps=3, per_class=1)
        (root / path).write_text(yaml.safe_dump(exp))
    for path in config["controlnets"]:
        exp = yaml.safe_load((root / path).read_text())
        exp["data"]["batch_size"] = 8
        exp["train"].update(epochs=2, sample_every=1)
        exp["sampling"].update(steps=3, grid_rows=2)
        exp["evaluation"]["fidelity_samples"] = 4
        (root / path).write_text(yaml.safe_dump(exp))
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
    exp["optim"]["lr"] = 1e-3
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
