"""Experiment grids declared once: expansion, names, validation at plan time, and the files the workflow writes."""

from __future__ import annotations

import doctest

import pytest
import yaml

import ldmflow.config.grid
from ldmflow.config.grid import expand_grid, value_label
from ldmflow.config.loading import load_config
from ldmflow.errors import ConfigError
from ldmflow.workflow import experiments, phase_members, write_grid_experiment

from .conftest import REPO

UNET = "config/diffusion/demo_unet_tiny.yaml"
AE = "config/autoencoders/demo_kl_c4_f4.yaml"


@pytest.fixture(autouse=True)
def in_repo(monkeypatch):
    monkeypatch.chdir(REPO)  # grids name the repository's demo experiment files


def test_docstring_example_runs():
    result = doctest.testmod(ldmflow.config.grid, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 1 and result.failed == 0


def test_one_experiment_per_combination_with_readable_unique_names_and_the_axis_values_set():
    points = expand_grid({"base": UNET, "axes": {
        "capacity": {"small": {"model.base_channels": 16, "optim.lr": 1.5e-4},
                     "large": {"model.base_channels": 48, "optim.lr": 1.0e-4}},
        "model.attention_levels": [[], [0, 1]]}}, "diffusion")
    assert [p.name for p in points] == [
        "demo_unet_tiny__capacity-small__attention_levels-none", "demo_unet_tiny__capacity-small__attention_levels-0-1",
        "demo_unet_tiny__capacity-large__attention_levels-none", "demo_unet_tiny__capacity-large__attention_levels-0-1"]
    cfg = load_config(points[3].data, "diffusion")
    assert (cfg.name, cfg.model.base_channels, cfg.optim.lr, cfg.model.attention_levels) == \
        (points[3].name, 48, 1.0e-4, [0, 1])
    base = load_config(UNET, "diffusion")
    assert cfg.sampling == base.sampling and cfg.train.epochs == base.train.epochs  # the rest is the base's


def test_a_name_template_names_each_combination():
    points = expand_grid({"base": AE, "name": "ae_c{model.latent_channels}_{optim.lr}",
                          "axes": {"model.latent_channels": [4, 8], "optim.lr": [1e-4]}}, "autoencoder")
    assert [p.name for p in points] == ["ae_c4_0.0001", "ae_c8_0.0001"]


def test_value_labels_are_filesystem_safe():
    assert [value_label(v) for v in (True, None, 1.5e-4, [2, 3], [], "a b/c", {"x": 1})] == \
        ["true", "null", "0.00015", "2-3", "none", "a-b-c", "x-1"]


@pytest.mark.parametrize(("grid", "expected"), [
    # a bad value of an axis: the base file, the axis setting and the allowed values
    ({"base": UNET, "axes": {"model.preset": ["demo_tiny", "unet999"]}},
     ["demo_unet_tiny.yaml with model.preset='unet999'", "model.preset", "allowed:", "capacity_unet128_d4"]),
    ({"base": UNET, "axes": {"diffusion.schedule": ["cosine", "quadratic"]}},
     ["diffusion.schedule='quadratic'", "allowed:", "scaled_linear"]),
    ({"base": UNET, "axes": {"model.widht": [8]}}, ["model.widht"]),
    ({"base": UNET, "axes": {"optim.lr": []}}, ["axis 'optim.lr'", "non-empty list"]),
    ({"base": "config/diffusion/missing.yaml", "axes": {"optim.lr": [1e-4]}}, ["missing.yaml", "does not exist"]),
    ({"base": UNET, "axes": {"optim.lr": [1e-4]}, "name": "x_{optim.lr}_{seed}"}, ["{seed}", "allowed: {base}"]),
    ({"base": UNET, "axes": {"optim.lr": [1e-4, 2e-4]}, "name": "same"}, ["both named 'same'", "name template"]),
    ({"base": UNET, "axes": {"optim.lr": [1e-4]}, "size": 3}, ["unknown key(s) size", "allowed: base, axes, name"]),
])
def test_a_bad_grid_stops_the_plan_naming_grid_key_and_allowed_values(grid, expected):
    with pytest.raises(ConfigError) as err:
        expand_grid(grid, "diffusion", "config: key 'diffusion[1].grid'")
    message = str(err.value)
    assert "diffusion[1].grid" in message and all(part in message for part in expected), message


def test_planning_a_grid_writes_nothing_and_the_rule_writes_each_combination_as_planned(tmp_path, monkeypatch):
    (tmp_path / "config").mkdir()
    base = tmp_path / "config/unet.yaml"
    base.write_text((REPO / UNET).read_text())
    monkeypatch.chdir(tmp_path)
    entries = ["config/unet.yaml", {"grid": {"base": "config/unet.yaml", "axes": {"optim.lr": [1e-4, 2e-4]}}}]
    planned = experiments(entries, "diffusion")
    assert {name: e.path for name, e in planned.items()} == {
        "demo_unet_tiny": "config/unet.yaml",
        "demo_unet_tiny__lr-0.0001": "results/experiments/diffusion/demo_unet_tiny__lr-0.0001.yaml",
        "demo_unet_tiny__lr-0.0002": "results/experiments/diffusion/demo_unet_tiny__lr-0.0002.yaml"}
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["unet.yaml"]  # a plan writes nothing
    combination = planned["demo_unet_tiny__lr-0.0001"]
    assert combination.config.optim.lr == 1e-4 and combination.base == "config/unet.yaml"
    write_grid_experiment(combination.path, combination.data, combination.base)  # what rule grid_experiment does
    assert load_config(combination.path, "diffusion") == combination.config
    data = yaml.safe_load(base.read_text())
    data["train"]["epochs"] = 3  # the base changed: the combination's mapping (the rule's params) changes with it
    base.write_text(yaml.safe_dump(data))
    assert experiments(entries, "diffusion")["demo_unet_tiny__lr-0.0001"].data["train"]["epochs"] == 3


def test_a_grid_name_that_another_experiment_has_is_refused():
    entries = [{"grid": {"base": UNET, "axes": {"optim.lr": [1e-4]}, "name": "demo_unet_tiny"}}, UNET]
    with pytest.raises(ConfigError, match="experiment name 'demo_unet_tiny' is also used by"):
        experiments(entries, "diffusion")


def test_phases_pick_experiments_by_stage_and_name_pattern():
    workflow = {"autoencoder": {"ae1": "a", "ae2": "b"}, "diffusion": {"u__lr-1": "c", "u__lr-2": "d", "v": "e"},
                "controlnet": {}}
    phases = phase_members({"phase1": ["autoencoder/*"], "phase2": ["diffusion/u__*", "diffusion/u__lr-1"]}, workflow)
    assert phases == {"phase1": [("autoencoder", "ae1"), ("autoencoder", "ae2")],
                      "phase2": [("diffusion", "u__lr-1"), ("diffusion", "u__lr-2")]}
    with pytest.raises(ConfigError, match=r"phases.phase3' has pattern 'controlnet/\*', which matches no experiment; "
                                          r"allowed: STAGE/NAME patterns over autoencoder/ae1"):
        phase_members({"phase3": ["controlnet/*"]}, workflow)
    # a ControlNet the data cannot train (mask control, no masks) is declared but left out: its phase is empty
    declared = {**workflow, "controlnet": {"c_mask": "f"}}
    assert phase_members({"phase3": ["controlnet/*"]}, workflow, declared) == {"phase3": []}


@pytest.mark.slow
def test_a_grid_trains_one_job_per_combination_and_a_new_axis_value_plans_only_the_new_one(tmp_path):
    from ldmflow.artifacts import load_checkpoint

    from .test_workflow import planned_jobs, smk, tiny_workflow

    root = tiny_workflow(tmp_path)
    config = yaml.safe_load((root / "config/config.yaml").read_text())
    base = config["autoencoders"][0]
    name = yaml.safe_load((root / base).read_text())["name"]
    grid = {"base": base, "axes": {"optim.lr": [1e-3, 2e-3]}}
    config.update(autoencoders=[{"grid": grid}], diffusion=[], controlnets=[], phases={"phase1": ["autoencoder/*"]})
    (root / "config/config.yaml").write_text(yaml.safe_dump(config))
    names = [f"{name}__lr-0.001", f"{name}__lr-0.002"]

    plan = smk(root, "-n", "phase1")
    assert planned_jobs(plan) == {"demo_data": 1, "grid_experiment": 2, "train_autoencoder": 2,
                                  "select_autoencoder": 1, "training_curves": 2, "embed_latents": 1, "phase1": 1}
    assert all(f"results/autoencoder/{n}/{n}_metrics.csv" in plan.stdout for n in names)
    smk(root, "phase1")
    for n, lr in zip(names, (1e-3, 2e-3)):  # each checkpoint records its combination's resolved config
        ckpt = load_checkpoint(root / f"results/autoencoder/{n}/checkpoints/{n}_checkpoint_best.pt")
        assert (ckpt["name"], ckpt["config"]["name"], ckpt["config"]["optim"]["lr"]) == (n, n, lr)
    done = smk(root, "-n", "phase1")
    assert "Nothing to be done" in done.stdout + done.stderr

    grid["axes"]["optim.lr"].append(5e-3)  # a new value: only its combination trains (selection ranks all three)
    (root / "config/config.yaml").write_text(yaml.safe_dump(config))
    plan = smk(root, "-n", "phase1")
    assert planned_jobs(plan) == {"grid_experiment": 1, "train_autoencoder": 1, "training_curves": 1,
                                  "select_autoencoder": 1, "embed_latents": 1, "phase1": 1}
    assert f"results/autoencoder/{name}__lr-0.005/{name}__lr-0.005_metrics.csv" in plan.stdout

    exp = yaml.safe_load((root / base).read_text())  # an edited base: every combination is rewritten and retrains
    exp["train"]["epochs"] += 1
    (root / base).write_text(yaml.safe_dump(exp))
    plan = smk(root, "-n", "phase1")
    assert planned_jobs(plan)["grid_experiment"] == planned_jobs(plan)["train_autoencoder"] == 3
