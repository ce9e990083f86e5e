"""Dry runs of the real Snakefile (seconds each): what each profile spelling asks of the scheduler, the
research preset's plan, and the config checks that stop a plan before any job runs."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from .conftest import REPO, snakemake_bin
from .test_workflow import planned_jobs, project_copy, smk_env


def dry_run(root: Path, *args: str, path_prefix: str | None = None) -> subprocess.CompletedProcess:
    env = smk_env()
    if path_prefix:
        env["PATH"] = f"{path_prefix}:{env['PATH']}"
    return subprocess.run([snakemake_bin(), *args, "-n"], cwd=root, env=env, capture_output=True, text=True,
                          check=False, timeout=300)


def resources_of(proc: subprocess.CompletedProcess, rule: str) -> dict[str, str]:
    """The `resources:` line of the first job of RULE in a dry run's output, as a mapping."""
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    block = out.split(f"\nrule {rule}:\n", 1)[1].split("\n\n", 1)[0]
    line = next(line for line in block.splitlines() if line.strip().startswith("resources: "))
    print(f"{rule}: {line.strip()}")
    return dict(re.findall(r"(\w+)=(-gpu \"[^\"]*\"|[^,]*)", line.split("resources: ", 1)[1]))


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    return project_copy(tmp_path_factory.mktemp("project"))


CLUSTER_REQUESTS = {
    "lsf": {"gpu": "1", "lsf_queue": "gpu", "lsf_extra": '-gpu "num=1:mode=exclusive_process"', "mem_mb": "16000",
            "runtime": "240"},
    "slurm": {"gpu": "1", "slurm_partition": "gpu", "cpus_per_gpu": "8", "mem_mb": "16000", "runtime": "240"},
}


@pytest.mark.parametrize("scheduler", sorted(CLUSTER_REQUESTS))
@pytest.mark.parametrize("spelling", ["--profile {}", "--profile profiles/{}", "--workflow-profile profiles/{}"])
def test_every_spelling_of_a_cluster_profile_keeps_the_gpu_request(project, scheduler, spelling):
    args = [*spelling.format(scheduler).split(), "all"]
    resources = resources_of(dry_run(project, *args), "train_diffusion")
    assert CLUSTER_REQUESTS[scheduler].items() <= resources.items(), resources


@pytest.mark.parametrize("gpu_machine", [False, True])
def test_a_local_run_asks_one_gpu_per_gpu_job_on_a_gpu_machine_and_none_without(project, tmp_path, gpu_machine):
    fake = tmp_path / "bin"
    fake.mkdir()
    if gpu_machine:  # what the rules look for; the job itself then claims a free GPU (ldmflow.devices)
        (fake / "nvidia-smi").write_text("#!/bin/sh\n")
        (fake / "nvidia-smi").chmod(0o755)
    proc = dry_run(project, "--cores", "2", path_prefix=str(fake))
    for rule in ("train_autoencoder", "train_diffusion", "train_controlnet", "embed_latents",
                 "evaluate_memorization"):
        assert resources_of(proc, rule)["gpu"] == str(int(gpu_machine))
    assert "Using workflow specific profile profiles/default" in proc.stderr


def test_a_multi_gpu_request_of_a_cluster_profile_reaches_the_job_uncapped(project):
    proc = dry_run(project, "--profile", "slurm", "all", "--set-resources", "train_diffusion:gpu=2")
    assert resources_of(proc, "train_diffusion")["gpu"] == "2"


@pytest.mark.parametrize(("key", "value"), [("set-threads", {"train_autoencoder": 8}), ("resources", ["gpu=1"])])
def test_a_cluster_key_in_the_default_profile_stops_the_plan_naming_the_fix(tmp_path, key, value):
    root = project_copy(tmp_path)
    default = root / "profiles/default/config.yaml"
    profile = yaml.safe_load(default.read_text())
    default.write_text(yaml.safe_dump({**profile, key: value}))
    proc = dry_run(root, "--profile", "lsf", "all")
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert f"profiles/default/config.yaml: key '{key}' does not belong in the workflow profile" in out
    assert "--workflow-profile profiles/NAME" in out


# grid_experiment: one experiment file per grid combination (8 autoencoders, 12 UNets, 4 ControlNets)
RESEARCH_256_PLAN = {"demo_data": 1, "grid_experiment": 24, "train_autoencoder": 8, "select_autoencoder": 1,
                     "embed_latents": 1,
                     "train_diffusion": 13, "sample_diffusion": 13, "train_controlnet": 4, "sample_controlnet": 4,
                     "controlnet_summary": 1, "evaluate_memorization": 17, "memorization_summary": 1,
                     "training_curves": 25, "train_judge": 1, "evaluate_samples": 13,
                     "evaluate_controlnet": 4, "evaluation_summary": 1, "all": 1}
RESEARCH_256_AUTOENCODERS = [f"{variant}_c{c}_f{f}" for variant in ("kl", "plain") for c in (4, 8) for f in (8, 4)]
RESEARCH_256_UNETS = [f"unet{width}_d4_attn-{attn}" for width in (128, 144, 160)
                      for attn in ("none", "3", "2-3", "0-1-2-3")]


def test_the_research_preset_plans_every_stage_with_its_own_experiments_only(project):
    proc = dry_run(project, "--configfile", "config/presets/research_256.yaml", "--profile", "slurm", "all")
    assert planned_jobs(proc) == RESEARCH_256_PLAN
    out = proc.stdout + proc.stderr
    assert not re.search(r"config/(autoencoders|diffusion|controlnet)/", out)  # none of the demo's experiments
    for name in RESEARCH_256_AUTOENCODERS:  # the grids' combinations, each written as an experiment file
        assert f"input: results/experiments/autoencoder/{name}.yaml" in out
    for name in RESEARCH_256_UNETS:
        assert f"input: results/experiments/diffusion/{name}.yaml, results/latents/latents.zarr" in out
    # the fine-tune starts from its parent's best checkpoint, and the ControlNets train on that UNet
    parent = "results/diffusion/unet144_d4_attn-2-3/unet144_d4_attn-2-3_metrics.csv"
    assert f"input: config/presets/diffusion/finetune_unet144_d4_attn-2-3.yaml, {parent}" in out
    for fusion in ("add", "film"):
        for signal in ("mask", "edges"):
            assert (f"input: results/experiments/controlnet/unet144_d4_attn-2-3_{fusion}_{signal}.yaml, "
                    f"results/latents/latents.zarr, {parent}") in out
    assert resources_of(proc, "train_controlnet")["gpu"] == "1"


def test_the_research_preset_runs_in_phases(project):
    plans = {phase: dry_run(project, phase, "--configfile", "config/presets/research_256.yaml")
             for phase in ("phase1", "phase2", "phase3")}
    jobs = {phase: planned_jobs(proc) for phase, proc in plans.items()}
    # phase1: the autoencoder grid, its selection and the latent store; no UNet
    assert jobs["phase1"] == {"demo_data": 1, "grid_experiment": 8, "train_autoencoder": 8, "select_autoencoder": 1,
                              "training_curves": 8, "embed_latents": 1, "phase1": 1}
    # phase2: the 12 ablation UNets (and what they need), not the fine-tune nor the ControlNets
    assert jobs["phase2"]["train_diffusion"] == jobs["phase2"]["evaluate_memorization"] == 12
    assert jobs["phase2"]["evaluate_samples"] == 12 and jobs["phase2"]["train_judge"] == 1
    assert "train_controlnet" not in jobs["phase2"]
    assert "finetune" not in plans["phase2"].stdout
    # phase3: the fine-tune and the 4 ControlNets, with the one ablation UNet they start from
    assert jobs["phase3"]["train_diffusion"] == 2 and jobs["phase3"]["train_controlnet"] == 4


@pytest.mark.parametrize("preset", sorted(p.name for p in (REPO / "config/presets").glob("*.yaml")))
def test_every_preset_sets_every_experiment_list(preset):
    data = yaml.safe_load((REPO / "config/presets" / preset).read_text())
    assert {"autoencoders", "diffusion", "controlnets"} <= data.keys()


def test_a_configfile_that_sets_some_experiment_lists_but_not_all_stops_the_plan(project, tmp_path):
    preset = yaml.safe_load((project / "config/presets/research_256.yaml").read_text())
    del preset["controlnets"]
    path = tmp_path / "my_preset.yaml"
    path.write_text(yaml.safe_dump(preset))
    proc = dry_run(project, "--configfile", str(path))
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert f"{path}: sets autoencoders, diffusion but not controlnets" in out
    assert "Set controlnets: [...] in it ([] for none)" in out


def test_a_typo_in_the_judge_section_stops_the_plan(project, tmp_path):
    path = tmp_path / "judge.yaml"
    path.write_text("judge:\n  epoch: 3\n")
    proc = dry_run(project, "--configfile", str(path))
    assert proc.returncode != 0
    assert "workflow config, section 'judge': unknown key 'epoch'; allowed keys:" in (proc.stdout + proc.stderr)


def test_a_typo_in_the_memorization_section_stops_the_plan(project, tmp_path):
    path = tmp_path / "memorization.yaml"
    path.write_text("memorization:\n  feature: pixel\n  alpah: 0.4\n")
    proc = dry_run(project, "--configfile", str(path))
    assert proc.returncode != 0
    assert "workflow config, section 'memorization': unknown key 'alpah'; allowed keys: alpha," in (
        proc.stdout + proc.stderr)


def clean_clone(root: Path) -> Path:
    """The repository's files (tracked, and new ones not ignored) committed in a fresh git repository at ROOT."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        src, dst = REPO / name, root / name
        if src.is_symlink() or src.is_file():
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.symlink_to(src.readlink()) if src.is_symlink() else shutil.copy2(src, dst)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "clone"]):
        subprocess.run([*git, *args], cwd=root, check=True, capture_output=True)
    return root


@pytest.mark.skipif(not (REPO / ".git").exists(), reason="needs the repository's git checkout")
@pytest.mark.parametrize("args", [(), ("--configfile", "config/presets/research_256.yaml")], ids=["demo", "grids"])
def test_a_dry_run_on_a_clean_clone_writes_nothing_outside_dot_snakemake(tmp_path, args):
    root = clean_clone(tmp_path / "clone")
    proc = dry_run(root, "all", *args)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    status = subprocess.run(["git", "status", "--porcelain", "--ignored", "--untracked-files=all"], cwd=root,
                            capture_output=True, text=True, check=True).stdout.splitlines()
    assert [line for line in status if not line[3:].startswith(".snakemake/")] == []


def test_numbers_as_users_write_them_plan_in_the_workflow_config(project, tmp_path):
    preset = yaml.safe_load((project / "config/presets/research_256.yaml").read_text())
    path = tmp_path / "numbers.yaml"
    path.write_text(yaml.safe_dump({**preset, "memorization": {"calibration_rate": "CAL"}, "autoencoders": [
        {"grid": {"base": "config/autoencoders/demo_kl_c4_f4.yaml", "axes": {"optim.lr": ["LR1", "LR2"]}}}]})
        .replace("CAL", "5e-3").replace("LR1", "1e-4").replace("LR2", "5E-3"))
    proc = dry_run(project, "phase1", "--configfile", str(path))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "results/experiments/autoencoder/demo_kl_c4_f4__lr-0.0001.yaml" in out
    assert "results/experiments/autoencoder/demo_kl_c4_f4__lr-0.005.yaml" in out
