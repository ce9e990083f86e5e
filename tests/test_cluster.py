"""The cluster profiles: a real (loopback) SLURM cluster, and the bsub command of the LSF profile.

The SLURM test needs the one-node cluster of tests/cluster/slurm_up.sh (`.ci/run` starts it); it runs the
tiny workflow through profiles/slurm, with the site values a real site edits set for that cluster.
LSF has no free implementation: a fake `bsub` on PATH records the command the LSF plugin builds.
"""

from __future__ import annotations

import base64
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from ldmflow.artifacts import load_checkpoint

from .conftest import REPO, snakemake_bin
from .test_workflow import (
    checkpoint_field,
    edit_experiment,
    experiment,
    same_weights,
    smk,
    smk_env,
    tiny_workflow,
    wait_until,
)

pytestmark = pytest.mark.slow
HERE = Path(__file__).parent


# --------------------------------------------------------------------------------------------------
# SLURM
# --------------------------------------------------------------------------------------------------


def slurm_partition() -> str:
    """The default partition of the SLURM cluster this machine reaches; skips the test when there is none."""
    if not shutil.which("sinfo"):
        pytest.skip("no SLURM client tools (apt-get install slurm-wlm munge; then tests/cluster/slurm_up.sh)")
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, timeout=10)
    except subprocess.TimeoutExpired:
        out = None
    default = [p.rstrip("*") for p in (out.stdout.split() if out and out.returncode == 0 else []) if p.endswith("*")]
    if not default:
        pytest.skip("no SLURM cluster is up: start the loopback one with tests/cluster/slurm_up.sh")
    return default[0]


def edit_site_profile(root: Path, partition: str) -> Path:
    """Edit ROOT's profiles/slurm as a site would: the values marked EDIT, set for the loopback cluster.

    Plus what a cluster without an accounting database needs: job status from squeue (sacct fails there),
    checked 2 s after submission. Everything else (executor, retries, the GPU request) is the real profile.
    """
    profile = yaml.safe_load((REPO / "profiles/slurm/config.yaml").read_text())
    profile["default-resources"].pop("slurm_account")
    profile["slurm-no-account"] = True
    # sizes for a small test node (runtimes stay the profile's own)
    profile["default-resources"].update(slurm_partition=partition, mem_mb="300 * attempt")
    for resources in profile["set-resources"].values():
        resources.update(slurm_partition=partition, mem_mb="500 * attempt")
        if "cpus_per_gpu" in resources:
            resources["cpus_per_gpu"] = 1  # a 2-core node runs both training jobs at once
    profile["set-threads"] = {rule: 1 for rule in profile["set-threads"]}
    profile.update({"slurm-status-command": "squeue", "slurm-init-seconds-before-status-checks": 2,
                    "slurm-keep-successful-logs": True})
    (root / "profiles/slurm/config.yaml").write_text(yaml.safe_dump(profile, sort_keys=False))
    return root / "profiles/slurm"


GPU_RULES = ("train_autoencoder", "embed_latents", "train_diffusion", "sample_diffusion", "evaluate_memorization",
             "train_controlnet", "sample_controlnet", "train_judge", "evaluate_samples", "evaluate_controlnet",
             "synthesize", "audit_synthetic")


def rule_of(comment: str) -> str:
    """The rule of an sbatch --comment (rule_NAME or rule_NAME_wildcards_...)."""
    return next(r for r in GPU_RULES if comment == f"rule_{r}" or comment.startswith(f"rule_{r}_wildcards_"))


def sbatch_calls(log: str) -> list[str]:
    """The sbatch command lines in a verbose Snakemake log, without the wrapped job command."""
    return [line.split("sbatch call: ", 1)[1].split(" --wrap=", 1)[0]
            for line in log.splitlines() if "sbatch call: " in line]


def option(call: str, flag: str) -> str | None:
    """The value of ``flag`` (``--mem`` or ``--gpus=``) in an sbatch command line."""
    words = shlex.split(call)
    for i, word in enumerate(words):
        if flag.endswith("=") and word.startswith(flag):
            return word[len(flag):]
        if word == flag:
            return words[i + 1]
    return None


def scheduler_jobs(workdir: Path) -> list[dict[str, str]]:
    """SLURM's own record (`scontrol show job`) of the jobs submitted from WORKDIR, finished ones included."""
    out = subprocess.run(["scontrol", "show", "job", "-o"], capture_output=True, text=True, check=True).stdout
    jobs = [dict(re.findall(r"(\w+)=(\S*)", line)) for line in out.splitlines() if line.strip()]
    return [job for job in jobs if job.get("WorkDir") == str(workdir)]


def cluster_state(root: Path) -> str:
    """What SLURM says about the node and ROOT's jobs, and the tails of their logs (for a failure message)."""
    parts = []
    for cmd in (["sinfo", "-N", "-l"], ["squeue", "-a", "-l"], ["scontrol", "show", "node"]):
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
            parts.append(f"$ {' '.join(cmd)}\n{out.stdout}{out.stderr}")
        except (OSError, subprocess.TimeoutExpired) as err:
            parts.append(f"$ {' '.join(cmd)}: {err}")
    parts += [f"job {job.get('JobId')}: {job.get('JobState')} {job.get('Reason')} {job.get('Comment')}"
              for job in scheduler_jobs(root)]
    logs = sorted((root / ".snakemake/slurm_logs").rglob("*.log")) + sorted((root / "logs").rglob("*.log"))
    parts += [f"--- {log}\n{log.read_text(errors='replace')[-1500:]}" for log in logs[-6:]]
    return "\n".join(parts)


def kill_strays(root: Path) -> None:
    """SIGKILL what is left of the test's SLURM jobs (processes working in ROOT).

    Now and then the job-level Snakemake of a cancelled job hangs on exit after its SIGTERM. A real
    cluster kills it after KillWait (proctrack/cgroup); the loopback cluster's proctrack/linuxproc loses
    track of it once it is orphaned.
    """
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and int(proc.name) != os.getpid() and \
                    Path(os.readlink(proc / "cwd")).is_relative_to(root):
                os.kill(int(proc.name), signal.SIGKILL)
        except (OSError, ValueError):  # ended meanwhile, or not ours to read
            continue


def one_of_each_later_stage(root: Path) -> None:
    """Keep one diffusion and one ControlNet experiment (every rule still runs; fewer sbatch jobs)."""
    config = yaml.safe_load((root / "config/config.yaml").read_text())
    config["diffusion"] = config["diffusion"][:1]
    base = yaml.safe_load((root / config["diffusion"][0]).read_text())["name"]
    config["controlnets"] = [p for p in config["controlnets"]
                             if yaml.safe_load((root / p).read_text())["base"] == base][:1]
    config["synthetic"] = [e for e in config.get("synthetic", []) if e["model"] == f"diffusion/{base}"]
    (root / "config/config.yaml").write_text(yaml.safe_dump(config))


@pytest.mark.slurm
def test_slurm_profile_runs_gpu_rules_through_sbatch_and_a_cancelled_job_retries_and_resumes(tmp_path):
    partition = slurm_partition()
    local, cluster = tiny_workflow(tmp_path / "local"), tiny_workflow(tmp_path / "slurm")
    for root in (local, cluster):  # long enough to be cancelled mid-run
        name = edit_experiment(root, epochs=30)
        one_of_each_later_stage(root)
    other, _ = experiment(cluster, 1)
    smk(local)

    edit_site_profile(cluster, partition)
    started = time.monotonic()
    # as a user types it in the project root (`slurm` is the symlink to profiles/slurm)
    proc = subprocess.Popen([snakemake_bin(), "--profile", "slurm", "all", "--verbose"], cwd=cluster,
                            env=smk_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        latest = cluster / f"results/autoencoder/{name}/checkpoints/{name}_checkpoint_latest.pt"
        try:
            wait_until(lambda: checkpoint_field(latest, "epoch") >= 1, proc, f"{name} trained an epoch on SLURM")
        except AssertionError as err:
            raise AssertionError(f"{err}\n{cluster_state(cluster)}") from None
        # scancel: SLURM sends SIGTERM, the training saves its latest checkpoint and stops; the job ends
        # CANCELLED, and Snakemake resubmits it (attempt 2, more memory and time), which resumes.
        running = [job for job in scheduler_jobs(cluster)
                   if job["JobState"] == "RUNNING" and job["Comment"].endswith(name)]
        assert running, f"{name} is training but no SLURM job runs it"
        subprocess.run(["scancel", running[0]["JobId"]], check=True)
        out, _ = proc.communicate(timeout=600)
    finally:
        proc.kill()
        kill_strays(cluster)
    print(f"SLURM workflow: {time.monotonic() - started:.0f} s")
    assert proc.returncode == 0, out[-6000:]

    calls = sbatch_calls(out)
    print("\n".join(calls))
    rules = [option(call, "--comment") for call in calls]
    # every GPU-class job went through sbatch (one training job twice: it was cancelled and retried) ...
    assert Counter(map(rule_of, rules)) == {"train_autoencoder": 3, "embed_latents": 1, "train_diffusion": 1,
                                            "sample_diffusion": 1, "train_controlnet": 1, "sample_controlnet": 1,
                                            "evaluate_memorization": 2, "train_judge": 1, "evaluate_samples": 1,
                                            "evaluate_controlnet": 1, "synthesize": 1, "audit_synthetic": 1}, rules
    assert sorted(r for r in rules if rule_of(r) == "train_autoencoder") == sorted(
        [f"rule_train_autoencoder_wildcards_{name}"] * 2 + [f"rule_train_autoencoder_wildcards_{other}"])
    for call in calls:  # the GPU request of profiles/slurm, and the loopback site's partition
        assert option(call, "--gpus=") == "1" and option(call, "--cpus-per-gpu=") == "1"
        assert option(call, "-p") == partition
    retried = [call for call in calls if option(call, "--comment") == f"rule_train_autoencoder_wildcards_{name}"]
    assert [(option(c, "--mem"), option(c, "-t")) for c in retried] == [("500", "240"), ("1000", "480")]

    # the cheap rules ran here, not on the cluster; the scheduler saw the GPU requests
    jobs = scheduler_jobs(cluster)
    assert sorted(job["Comment"] for job in jobs) == sorted(rules)
    assert all(job["TresPerJob"] == "gres:gpu:1" for job in jobs)
    assert sorted(job["JobState"] for job in jobs) == ["CANCELLED"] + ["COMPLETED"] * (len(jobs) - 1)
    cancelled = next(job for job in jobs if job["JobState"] == "CANCELLED")
    slurm_log = next((cluster / ".snakemake/slurm_logs").rglob(f"{cancelled['JobId']}.log")).read_text()
    # mid-epoch: "signal 15 received; saved PATH at epoch N, step S"; at an epoch's end: "... after epoch N"
    stopped = re.search(r"signal 15 received(?:; saved \S+ at epoch (\d+)| after epoch (\d+); saved)", slurm_log)
    assert stopped, f"the cancelled job did not save on SIGTERM:\n{slurm_log[-3000:]}"
    log = (cluster / f"logs/autoencoder/{name}.log").read_text()
    assert f"resumed {name} from epoch {stopped[1] or stopped[2]}," in log

    # the same results as the local run: same winner, same weights (CPU training is deterministic)
    selected = [yaml.safe_load((root / "results/autoencoder/selected.json").read_text()) for root in (local, cluster)]
    assert selected[0]["name"] == selected[1]["name"]
    for run in (local / "results/autoencoder").iterdir():
        if run.is_dir():
            for kind in ("best", "latest"):
                ckpt = f"{run.name}/checkpoints/{run.name}_checkpoint_{kind}.pt"
                assert same_weights(local / "results/autoencoder" / ckpt, cluster / "results/autoencoder" / ckpt)
    for stage in ("diffusion", "controlnet"):
        for run in (local / "results" / stage).iterdir():
            if run.is_dir():
                ckpt = f"{run.name}/checkpoints/{run.name}_checkpoint_best.pt"
                assert same_weights(local / "results" / stage / ckpt, cluster / "results" / stage / ckpt)
    assert load_checkpoint(latest)["epoch"] == load_checkpoint(
        local / f"results/autoencoder/{name}/checkpoints/{name}_checkpoint_latest.pt")["epoch"]


# --------------------------------------------------------------------------------------------------
# LSF
# --------------------------------------------------------------------------------------------------


def test_lsf_profile_submits_gpu_rules_with_bsub_asking_queue_project_gpu_memory_and_time(tmp_path):
    root = tiny_workflow(tmp_path / "wf")
    fake = tmp_path / "fake-lsf"
    shutil.copytree(HERE / "cluster/fake-lsf", fake)
    env = {**smk_env(), "FAKE_LSF_DIR": str(fake)}
    env["PATH"] = f"{fake / 'bin'}:{env['PATH']}"
    # as a user types it in the project root (`lsf` is the symlink to profiles/lsf)
    proc = subprocess.run([snakemake_bin(), "--profile", "lsf", "all"], cwd=root, env=env, check=False,
                          capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    # the fake bsub records its arguments and refuses the job, so the run stops after the local demo_data
    assert proc.returncode != 0 and "LSF job submission failed" in out
    assert (root / "results/data/demo/manifest.csv").is_file()
    calls = [shlex.split(line) for line in (fake / "bsub.calls").read_text().splitlines()]
    print("\n".join(shlex.join(c) for c in calls))
    assert calls and all("train_autoencoder" in call[call.index("-J") + 1] for call in calls)
    call = calls[0]

    def value(flag: str) -> str:
        return call[call.index(flag) + 1]

    # profiles/lsf: queue, project, wall time (minutes), cores, memory per core, one host, the GPU request
    assert value("-q") == "gpu" and value("-P") == "my_project" and value("-W") == "240" and value("-n") == "8"
    assert "rusage[mem=2000.0]" in call and "span[hosts=1]" in call
    assert value("-gpu") == "num=1:mode=exclusive_process"
    assert value("-cwd") == str(root) and "-env" in call
    assert "--target-jobs" in call[-1] and "train_autoencoder" in call[-1]
    # the job's own Snakemake gets the GPU count (2 or more would run DDP), uncapped
    passed = [base64.b64decode(word.removeprefix("base64//")).decode() for word in shlex.split(call[-1])
              if word.startswith("base64//")]
    assert "train_autoencoder:gpu=1" in passed, passed
