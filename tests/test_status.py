import copy
import json
import signal
from pathlib import Path

import pytest
import yaml

from ldmflow.artifacts import load_checkpoint
from ldmflow.stages.train_autoencoder import train_autoencoder
from ldmflow.status import incomplete_outputs, workflow_status

from .conftest import run_cli, start_cli, wait_for


def mark_started(workdir: Path, output: str) -> None:
    """What Snakemake 9 records when it starts a job: an incomplete marker per output, by its own code."""
    from snakemake.persistence.file import FilePersistence

    FilePersistence(path=workdir / ".snakemake")._mark_incomplete(output, None)


def write_workflow(root: Path, experiments: dict[str, dict]) -> Path:
    """A workflow folder: config/config.yaml naming one autoencoder file per experiment, no UNets."""
    for name, cfg in experiments.items():
        path = root / "config" / "autoencoders" / f"{name}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump({**cfg, "name": name}))
    config = root / "config" / "config.yaml"
    config.write_text(yaml.safe_dump({"autoencoders": [f"config/autoencoders/{n}.yaml" for n in experiments],
                                      "diffusion": [], "controlnets": []}))
    return config


def test_status_of_a_finished_a_killed_and_a_never_started_experiment(tmp_path, demo_manifest, tiny_ae):
    long = copy.deepcopy(tiny_ae)
    long["train"].update(epochs=50, log_every=1)
    config = write_workflow(tmp_path, {"finished": tiny_ae, "killed": long, "never": tiny_ae})
    results = tmp_path / "results"
    train_autoencoder({**tiny_ae, "name": "finished"}, demo_manifest, results / "autoencoder/finished")

    mark_started(tmp_path, "results/autoencoder/killed/killed_metrics.csv")
    run_dir = results / "autoencoder/killed"
    proc = start_cli("--log-file", str(tmp_path / "logs/autoencoder/killed.log"), "train-ae",
                     "--config", str(tmp_path / "config/autoencoders/killed.yaml"), "--data", str(demo_manifest),
                     "--out", str(run_dir), "--threads", "1")
    try:
        wait_for(lambda: load_checkpoint(run_dir / "checkpoints/killed_checkpoint_latest.pt")["epoch"] >= 1, proc)
        running = {r.name: r for r in workflow_status(config, results)}["killed"]
        assert running.state == "running" and running.epochs == 50 and running.eta_s is not None
        assert running.best is not None and running.best_epoch >= 1
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert "\r" not in proc.stderr.read(), "no progress bar when stderr is not a terminal (Snakemake logs)"

    rows = {r.name: r for r in workflow_status(config, results)}
    assert list(rows) == ["finished", "killed", "never"]
    done, killed, never = rows["finished"], rows["killed"], rows["never"]
    assert (done.state, done.epoch, done.epochs, done.metric) == ("done", 2, 2, "val_loss")
    assert done.best_epoch in (1, 2) and done.samples_per_s > 0 and done.eta_s is None
    assert killed.state == "interrupted" and 1 <= killed.epoch < 50 and "resumes" in killed.message
    assert (never.state, never.epoch, never.epochs) == ("not started", None, 2)

    table = run_cli("status", "--results", str(results), "--config", str(config)).stdout
    for text in ("finished", "done", "2/2", "killed", "interrupted", "/50", "never", "not started", "val_loss"):
        assert text in table, text
    listed = json.loads(run_cli("status", "--results", str(results), "--config", str(config), "--json").stdout)
    assert [(r["name"], r["state"]) for r in listed] == [
        ("finished", "done"), ("killed", "interrupted"), ("never", "not started")]


def test_snakemake_markers_and_log_errors_give_queued_and_failed(tmp_path, tiny_ae):
    config = write_workflow(tmp_path, {"queued": tiny_ae, "broken": tiny_ae, "a" * 150: tiny_ae})
    mark_started(tmp_path, "results/autoencoder/queued/queued_metrics.csv")
    long = f"results/autoencoder/{'a' * 150}/{'a' * 150}_metrics.csv"  # past the file-name limit once encoded
    mark_started(tmp_path, long)
    assert (tmp_path / long).resolve() in incomplete_outputs(tmp_path)
    log = tmp_path / "logs/autoencoder/broken.log"
    log.parent.mkdir(parents=True)
    log.write_text("12:00:00 INFO ldmflow: starting\n12:00:01 ERROR ldmflow: data.image_size 17 is not allowed\n")
    rows = {r.name: r for r in workflow_status(config, tmp_path / "results")}
    assert rows["queued"].state == "queued" and rows["a" * 150].state == "queued"
    assert rows["broken"].state == "failed" and "image_size" in rows["broken"].message


def test_failed_and_preempted_runs_say_why(tmp_path, demo_manifest, tiny_ae):
    from ldmflow.errors import TrainingError

    nan = copy.deepcopy(tiny_ae)
    nan["optim"].update(lr=1e30, grad_clip=None)
    tiny_ae["train"]["epochs"] = 50
    config = write_workflow(tmp_path, {"nan": nan, "stopped": tiny_ae})
    with pytest.raises(TrainingError):
        train_autoencoder({**nan, "name": "nan"}, demo_manifest, tmp_path / "results/autoencoder/nan")
    run_dir = tmp_path / "results/autoencoder/stopped"
    proc = start_cli("train-ae", "--config", str(tmp_path / "config/autoencoders/stopped.yaml"), "--data",
                     str(demo_manifest), "--out", str(run_dir), "--threads", "1")
    wait_for((run_dir / "checkpoints/stopped_checkpoint_latest.pt").is_file, proc)
    proc.send_signal(signal.SIGTERM)  # what a scheduler sends before its kill
    assert proc.wait(timeout=120) == 143
    rows = {r.name: r for r in workflow_status(config, tmp_path / "results")}
    assert rows["nan"].state == "failed" and "NaN or inf" in rows["nan"].message
    assert rows["stopped"].state == "preempted" and "signal 15" in rows["stopped"].message
    assert 1 <= rows["stopped"].epoch < 50


def test_resumed_run_has_strictly_increasing_tensorboard_steps(tmp_path, demo_manifest, tiny_ae):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    tiny_ae["train"].update(epochs=50, log_every=1)  # 4 steps an epoch; a checkpoint only at epoch ends
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_ae))
    run = tmp_path / "run"

    def steps_written() -> list[int]:
        files = sorted((run / "tensorboard").glob("events.out.tfevents.*"))
        return [e.step for f in files for e in EventFileLoader(str(f)).Load()
                if e.HasField("summary") and e.summary.value[0].tag == "train/loss"]

    proc = start_cli("train-ae", "--config", str(config), "--data", str(demo_manifest), "--out", str(run),
                     "--threads", "1")
    try:  # killed in epoch 2, after its checkpoint at step 4: steps 5.. are written twice
        wait_for(lambda: max(steps_written()) >= 6, proc)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    resumed_at = load_checkpoint(run / "checkpoints/tiny_checkpoint_latest.pt")["step"]
    assert resumed_at < max(steps_written()), "the kill came too late to leave orphaned events"
    tiny_ae["train"]["epochs"] = 3  # a resumable change: finish sooner
    result = train_autoencoder(tiny_ae, demo_manifest, run)
    assert result["resumed_from"]["step"] == resumed_at
    assert len(steps_written()) > 12  # the raw files hold the killed run's orphans too

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    for tag in acc.Tags()["scalars"]:
        steps = [e.step for e in acc.Scalars(tag)]
        assert steps == sorted(set(steps)), tag
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(1, 13))
    assert [e.step for e in acc.Scalars("epoch/val_loss")] == [4, 8, 12]
    assert [e.step for e in acc.Images("samples")] == [4, 8, 12]
    assert "config/text_summary" in acc.Tags()["tensors"]


def test_training_shows_a_progress_bar_on_a_terminal_only(tmp_path, demo_manifest, tiny_ae):
    import fcntl
    import os
    import pty
    import struct
    import subprocess
    import sys
    import termios

    tiny_ae["train"]["log_every"] = 1
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_ae))
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # a 120-column terminal
    proc = subprocess.Popen([sys.executable, "-m", "ldmflow.cli", "--log-file", str(tmp_path / "train.log"), "train-ae",
                             "--config", str(config), "--data", str(demo_manifest), "--out", str(tmp_path / "run"),
                             "--threads", "1"], stdout=subprocess.DEVNULL, stderr=slave,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    os.close(slave)
    seen = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        seen += chunk
    assert proc.wait(timeout=300) == 0
    os.close(master)
    text = seen.decode(errors="replace")
    assert "tiny epoch 1/2" in text and "batch" in text and "loss=" in text and "\r" in text
    assert "epoch 2/2:" in text  # log lines still reach the terminal, above the bar
    assert "\r" not in (tmp_path / "train.log").read_text()


def test_training_without_tensorboard_installed_writes_no_event_files(tmp_path, demo_manifest, tiny_ae):
    import os
    import subprocess
    import sys

    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_ae))
    # sys.modules[name] = None is how Python spells "not installed" to every import and find_spec
    code = ("import sys; sys.modules['tensorboard'] = None; from ldmflow.cli import main; "
            f"sys.exit(main(['-v', 'train-ae', '--config', {str(config)!r}, '--data', {str(demo_manifest)!r}, "
            f"'--out', {str(tmp_path / 'run')!r}, '--threads', '1']))")
    proc = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("tensorboard is not installed") == 1
    assert (tmp_path / "run/checkpoints/tiny_checkpoint_best.pt").is_file()
    assert not (tmp_path / "run/tensorboard").exists()
    assert json.loads((tmp_path / "run/tiny_status.json").read_text())["state"] == "done"


def test_status_lists_each_combination_of_a_grid(tmp_path, tiny_ae, monkeypatch):
    config = write_workflow(tmp_path, {"plain": tiny_ae})
    wf = yaml.safe_load(config.read_text())
    wf["autoencoders"].append({"grid": {"base": "config/autoencoders/plain.yaml", "axes": {"optim.lr": [1e-3, 2e-3]},
                                        "name": "plain_lr{optim.lr}"}})
    config.write_text(yaml.safe_dump(wf))
    monkeypatch.chdir(tmp_path.parent)  # the grid's base is found from the workflow's folder, as Snakemake does
    rows = workflow_status(config, tmp_path / "results")
    assert [(r.name, r.state) for r in rows] == [
        ("plain", "not started"), ("plain_lr0.001", "not started"), ("plain_lr0.002", "not started")]
