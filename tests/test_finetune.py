"""Fine-tuning: a run that starts from another run's checkpoint (init: / --init), in the library and the workflow."""

import copy
import re
import shutil
import subprocess

import pytest
import yaml

from ldmflow.artifacts import file_sha256, load_checkpoint
from ldmflow.errors import ConfigError
from ldmflow.stages.train_autoencoder import train_autoencoder

from .conftest import REPO, TINY_AE, run_cli, snakemake_bin


def experiment(name: str, epochs: int, **extra) -> dict:
    cfg = copy.deepcopy(TINY_AE) | {"name": name, **extra}
    cfg["train"] = {"epochs": epochs, "sample_every": 100}
    return cfg


@pytest.fixture(scope="module")
def parent(tmp_path_factory, demo_manifest):
    root = tmp_path_factory.mktemp("parent")
    result = train_autoencoder(experiment("parent", 6), demo_manifest, root, progress=False)
    return {"history": result["history"], "checkpoint": root / "checkpoints/parent_checkpoint_latest.pt"}


def test_a_fine_tuned_run_starts_where_its_parent_ended(parent, demo_manifest, tmp_path):
    init = {"from": str(parent["checkpoint"])}
    child = train_autoencoder(experiment("child", 1, init=init, optim={"lr": 1e-3}), demo_manifest, tmp_path / "c",
                              progress=False)
    fresh = train_autoencoder(experiment("fresh", 1, optim={"lr": 1e-3}), demo_manifest, tmp_path / "f",
                              progress=False)
    last, first, fresh_first = (parent["history"][-1]["val_loss"], child["history"][0]["val_loss"],
                                fresh["history"][0]["val_loss"])
    assert abs(first - last) < 0.05 * last  # where the parent ended (0.8717 vs 0.8696 when written)
    assert fresh_first - last > 5 * abs(first - last)  # a fresh model is far behind (1.25)
    ckpt = load_checkpoint(tmp_path / "c/checkpoints/child_checkpoint_latest.pt")
    assert ckpt["extra"]["init"]["sha256"] == file_sha256(parent["checkpoint"])
    assert ckpt["extra"]["init"]["fresh"] == [] and ckpt["config"]["init"]["from"] == str(parent["checkpoint"])
    assert ckpt["step"] == child["history"][0]["step"] == fresh["history"][0]["step"]  # optimizer, schedule fresh
    assert "init" not in load_checkpoint(tmp_path / "f/checkpoints/fresh_checkpoint_latest.pt")["config"]


def test_a_head_that_does_not_fit_needs_init_partial(parent, demo_manifest, tmp_path, caplog):
    wider = {"variant": "kl", "downsample": 4, "latent_channels": 8, "base_channels": 8}
    with pytest.raises(ConfigError, match=r"do not fit this model: encoder\..*\(8, .*\) -> \(16, .*"
                                          r"set 'init.partial: true'"):
        train_autoencoder(experiment("wide", 1, model=wider, init={"from": str(parent["checkpoint"])}),
                          demo_manifest, tmp_path / "w", progress=False)
    partial = {"from": str(parent["checkpoint"]), "partial": True}
    train_autoencoder(experiment("wide", 1, model=wider, init=partial), demo_manifest, tmp_path / "w", progress=False)
    fresh = load_checkpoint(tmp_path / "w/checkpoints/wide_checkpoint_best.pt")["extra"]["init"]["fresh"]
    assert 0 < len(fresh) < 10 and all("->" in f for f in fresh)
    assert "tensor(s) keep their fresh initialisation" in caplog.text


def test_the_command_line_takes_init(parent, demo_manifest, tmp_path):
    config = tmp_path / "ae.yaml"
    config.write_text(yaml.safe_dump(experiment("cli", 1, model={**TINY_AE["model"], "latent_channels": 8})))
    proc = run_cli("train-ae", "--config", str(config), "--data", str(demo_manifest), "--out", str(tmp_path / "r"),
                   "--init", str(parent["checkpoint"]), check=False)
    assert proc.returncode == 2 and "set 'init.partial: true'" in proc.stderr
    with pytest.raises(ConfigError, match="key 'init.from' names .*missing.pt, which does not exist"):
        train_autoencoder(experiment("m", 1, init={"from": str(tmp_path / "missing.pt")}), demo_manifest, tmp_path)


def workflow_copy(root, epochs: int = 2):
    """The workflow with a second autoencoder fine-tuned from the first (listed first, to show the order comes
    from the dependency), a tiny demo, and only the autoencoder stage's experiments."""
    for part in ("Snakefile", "rules", "workflow_scripts", "config", "profiles", "envs"):
        (shutil.copytree if (REPO / part).is_dir() else shutil.copy)(REPO / part, root / part)
    config = yaml.safe_load((root / "config/config.yaml").read_text())
    config["data"]["demo"] = {"n": 24, "size": 16, "seed": 1}
    parent = yaml.safe_load((root / config["autoencoders"][0]).read_text())
    parent["data"].update(image_size=16, batch_size=8)
    parent["model"]["base_channels"] = 8
    parent["train"].update(epochs=epochs, sample_every=1)
    child = copy.deepcopy(parent) | {"name": "finetuned", "init": {"from": f"autoencoder/{parent['name']}"}}
    (root / config["autoencoders"][0]).write_text(yaml.safe_dump(parent))
    (root / "config/autoencoders/finetuned.yaml").write_text(yaml.safe_dump(child))
    config["autoencoders"] = ["config/autoencoders/finetuned.yaml", config["autoencoders"][0]]
    (root / "config/config.yaml").write_text(yaml.safe_dump(config))
    return parent["name"]


def dry_run(root, *args) -> dict[str, dict]:
    """``snakemake -n`` up to the selection: each planned job by its rule and name, with its input and reason."""
    proc = subprocess.run([snakemake_bin(), "-n", "-c1", "--until", "select_autoencoder", *args], cwd=root,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = {}
    for block in re.split(r"\n(?=rule )", proc.stdout):
        if m := re.match(r"rule (\w+):", block):
            name = re.search(r"wildcards: name=(\S+)", block)
            fields = dict(re.findall(r"^\s+(input|reason): (.*)$", block, re.M))
            jobs[f"{m[1]}/{name[1] if name else ''}"] = fields
    return jobs


def test_the_workflow_trains_the_parent_first(tmp_path):
    parent = workflow_copy(tmp_path)
    jobs = dry_run(tmp_path)
    assert f"results/autoencoder/{parent}/{parent}_metrics.csv" in jobs["train_autoencoder/finetuned"]["input"]
    assert f"train_autoencoder/{parent}" in jobs


@pytest.mark.slow
def test_the_workflow_fine_tunes_and_reruns_the_child_with_its_parent(tmp_path):
    parent = workflow_copy(tmp_path)
    proc = subprocess.run([snakemake_bin(), "-c1", "--until", "select_autoencoder"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    child = load_checkpoint(tmp_path / "results/autoencoder/finetuned/checkpoints/finetuned_checkpoint_best.pt")
    parent_best = tmp_path / f"results/autoencoder/{parent}/checkpoints/{parent}_checkpoint_best.pt"
    assert child["extra"]["init"]["sha256"] == file_sha256(parent_best)
    forced = dry_run(tmp_path, "--forcerun", f"results/autoencoder/{parent}/{parent}_metrics.csv")
    assert set(forced) == {f"train_autoencoder/{parent}", "train_autoencoder/finetuned", "select_autoencoder/"}
