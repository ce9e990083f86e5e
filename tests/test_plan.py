"""Dry runs of the real Snakefile (seconds each): what each profile spelling asks of the scheduler, the
research preset's plan, and the config checks that stop a plan before any job runs."""

from __future__ import annotations

import re
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
    return subprocess.run([snakemake_bin(), *args, "-n"], cwd=root, env=env, capture_output=True, text=True, check=False,
                          timeout=300)


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


RESEARCH_256_PLAN = {"demo_data": 1, "train_autoencoder": 4, "select_autoencoder": 1, "embed_latents": 1,
                     "train_diffusion": 2, "sample_diffusion": 2, "train_controlnet": 2, "sample_controlnet": 2,
                     "controlnet_summary": 1, "evaluate_memorization": 4, "memorization_summary": 1,
                     "training_curves": 8, "train_judge": 1, "evaluate_samples": 2, "evaluate_controlnet": 2,
                     "evaluation_summary": 1, "all": 1}


def test_the_research_preset_plans_every_stage_with_its_own_experiments_only(project):
    proc = dry_run(project, "--configfile", "config/presets/research_256.yaml", "--profile", "slurm", "all")
    assert planned_jobs(proc) == RESEARCH_256_PLAN
    out = proc.stdout + proc.stderr
    assert not re.search(r"config/(autoencoders|diffusion|controlnet)/", out)  # none of the demo's experiments
    # the ControlNets train on the preset's own diffusion UNets
    for controlnet, base in (("unet144_d4_controlnet_add_mask", "unet144_d4"),
                             ("unet128_d4_attn_all_controlnet_film_edges", "unet128_d4_attn_all")):
        assert (f"input: config/presets/controlnet/{controlnet}.yaml, results/latents/latents.zarr, "
                f"results/diffusion/{base}/{base}_metrics.csv") in out
    assert resources_of(proc, "train_controlnet")["gpu"] == "1"


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
