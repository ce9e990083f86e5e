"""``ldmflow status``: one table of every experiment a workflow config names, read from the run folders.

Each run's state comes from what is on disk, never from guesses: the status file the training loop
rewrites (``RUN/NAME_status.json``: state, epoch, step, best, pid and host), the metrics CSV (epoch
times, samples/s), the log file's last line (``logs/STAGE/NAME.log``) and Snakemake's incomplete markers
(``.snakemake/incomplete/``: one file per output of a started job, named by the urlsafe-base64 of the
output's path, split into ``@``-prefixed folders past the file-name limit; Snakemake 9,
``persistence/file.py``). A checkpoint is opened (memory-mapped) only for runs older than the status file.
"""

from __future__ import annotations

import base64
import csv
import os
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from ldmflow.artifacts import RunPaths, process_alive
from ldmflow.config.common import EXPERIMENT_LISTS
from ldmflow.config.loading import load_config
from ldmflow.config.yamlio import load_yaml
from ldmflow.errors import ConfigError
from ldmflow.training.events import read_status

State = Literal["not started", "queued", "running", "done", "early-stopped", "failed", "preempted", "interrupted"]
STALE_AFTER_S = 30 * 60  # a run on another host whose status file is older than this is taken for dead


@dataclass
class RunStatus:
    """One experiment's row of the table."""

    stage: str
    name: str
    state: State
    epoch: int | None = None
    epochs: int | None = None
    metric: str | None = None
    best: float | None = None
    best_epoch: int | None = None
    updated: float | None = None  # unix time of the run's last write
    samples_per_s: float | None = None
    eta_s: float | None = None
    host: str | None = None
    pid: int | None = None
    message: str | None = None  # why it failed or stopped, from the status file or the log


def incomplete_outputs(workdir: Path) -> dict[Path, float]:
    """The outputs of jobs Snakemake started (or submitted) and has not finished, with the time it marked
    them: running, queued on a cluster, or killed together with Snakemake."""
    root = workdir / ".snakemake" / "incomplete"
    out = {}
    for folder, _, files in os.walk(root):
        parts = Path(folder).relative_to(root).parts
        if any(not p.startswith("@") for p in parts):
            continue
        for f in files:
            if f == "migration_underway":
                continue
            encoded = "".join(p[1:] for p in parts) + f
            try:
                key = base64.urlsafe_b64decode(encoded).decode()
            except ValueError:
                continue
            out[(workdir / key).resolve()] = os.path.getmtime(os.path.join(folder, f))
    return out


def last_line(path: Path, max_bytes: int = 4096) -> str | None:
    """The last non-blank line of a text file (read from its end: logs can be long)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - max_bytes))
            lines = [ln for ln in fh.read().decode(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return None
    return lines[-1].strip() if lines else None


def read_metrics(path: Path) -> list[dict[str, str]]:
    try:
        with open(path, newline="") as fh:
            return list(csv.DictReader(fh))
    except OSError:
        return []


def _float(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _alive(pid: int | None, host: str | None, updated: float | None, now: float, stale_after: float) -> bool:
    """Whether the process that wrote a status file still runs: by its pid on this host, else by its age."""
    if host == socket.gethostname() and pid:
        return process_alive(pid)
    return updated is not None and now - updated < stale_after


def _checkpoint_state(path: Path) -> dict | None:
    """Epoch and stop flags of a run older than status files, memory-mapped: tensors are not read."""
    import torch

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - a checkpoint being replaced or corrupt: no state from it
        return None
    return {k: ckpt.get(k) for k in ("epoch", "step", "best", "best_epoch", "early_stopped")}


def run_status(stage: str, name: str, run_dir: Path, log_file: Path, epochs: int, metric: str, mode: str,
               incomplete: dict[Path, float], now: float | None = None,
               stale_after: float = STALE_AFTER_S) -> RunStatus:
    """The state of one run from its folder, its log and Snakemake's markers (see the module docstring)."""
    now = time.time() if now is None else now
    paths = RunPaths(run_dir, name)
    row = RunStatus(stage, name, "not started", epochs=epochs, metric=metric)
    status = read_status(paths.status)
    history = read_metrics(paths.metrics)
    log_tail = last_line(log_file)
    log_error = (log_tail if log_tail and (" ERROR " in log_tail or log_tail.startswith(("Traceback", "Error")))
                 else None)
    marked = incomplete.get(paths.metrics.resolve())  # when Snakemake started the job, if it has not finished

    if history:
        last = history[-1]
        row.epoch = int(float(last.get("epoch") or 0))
        row.samples_per_s = _float(last.get("samples_per_s"))
        values = [(_float(r.get(metric)), int(float(r["epoch"]))) for r in history if _float(r.get(metric)) is not None]
        if values:
            pick = min if mode == "min" else max
            row.best, row.best_epoch = pick(values, key=lambda v: v[0])
        row.updated = paths.metrics.stat().st_mtime

    if status is not None:
        row.state = status["state"]
        row.epoch, row.epochs = status["epoch"], status["epochs"]
        row.best, row.best_epoch = status.get("best"), status.get("best_epoch")
        row.metric = status.get("metric", metric)
        row.updated, row.host, row.pid = status.get("updated"), status.get("host"), status.get("pid")
        row.message = status.get("message")
        row.samples_per_s = status.get("samples_per_s") or row.samples_per_s
        if row.state == "running" and not _alive(row.pid, row.host, row.updated, now, stale_after):
            # killed without a word (kill -9, out of memory, node lost): it resumes from its latest checkpoint
            row.state = "failed" if log_error else "interrupted"
            row.message = log_error or "the process is gone; a rerun resumes from the latest checkpoint"
        if row.state == "running":
            row.eta_s = eta(status, history, now)
        elif marked and row.state != "done" and marked > (row.updated or 0):
            row.state = "queued"  # Snakemake started it again; the new process has not written yet
        return row

    if paths.latest.is_file():  # a run from before status files
        ckpt = _checkpoint_state(paths.latest) or {}
        row.epoch = ckpt.get("epoch", row.epoch)
        row.updated = paths.latest.stat().st_mtime
        if ckpt.get("early_stopped"):
            row.state = "early-stopped"
        elif row.epoch is not None and row.epoch >= epochs:
            row.state = "done"
        else:
            row.state = "failed" if log_error else ("running" if marked else "interrupted")
    elif log_error:
        row.state = "failed"
    elif marked:  # submitted (or started) by Snakemake, nothing written yet
        row.state = "queued"
    row.message = log_error if row.state == "failed" else None
    return row


def eta(status: dict, history: list[dict[str, str]], now: float) -> float | None:
    """Seconds to the last epoch at the recent pace (early stopping may end the run sooner)."""
    recent = [s for s in (_float(r.get("seconds")) for r in history[-3:]) if s]
    if status.get("epoch_wall_s"):  # whole epochs: training, validation, samples, checkpoints
        per_epoch = status["epoch_wall_s"]
    elif recent:  # training time only: too short by validation and saving
        per_epoch = sum(recent) / len(recent)
    elif status.get("epoch_progress") and status.get("epoch_seconds"):
        per_epoch = status["epoch_seconds"] / status["epoch_progress"]
    else:
        return None
    left = status["epochs"] - status["epoch"] - (status.get("epoch_progress") or 0.0)
    return max(0.0, left * per_epoch - (now - status["updated"]))


def workflow_status(config: str | Path = "config/config.yaml", results: str | Path = "results", *,
                    now: float | None = None, stale_after: float = STALE_AFTER_S) -> list[RunStatus]:
    """One :class:`RunStatus` per experiment the workflow config names, stage by stage.

    The workflow's working folder is the parent of ``results``: experiment files named in the config,
    ``logs/`` and ``.snakemake/`` are found there, as Snakemake finds them.
    """
    results = Path(results)
    workdir = results.resolve().parent
    try:
        wf = load_yaml(Path(config).read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{config}: workflow config not found (give --config)") from None
    incomplete = incomplete_outputs(workdir)
    rows = []
    for key, stage in EXPERIMENT_LISTS.items():
        for cfg in _experiments(wf.get(key) or [], stage, workdir):
            es = cfg.train.early_stopping
            rows.append(run_status(stage, cfg.name, results / stage / cfg.name,
                                   workdir / "logs" / stage / f"{cfg.name}.log",
                                   cfg.train.epochs, es.metric, es.mode, incomplete, now, stale_after))
    return rows


def _experiments(entries: list, stage: str, workdir: Path) -> list:
    """The experiments of one of the workflow config's lists: its files, and each combination of its grids."""
    from ldmflow.config.grid import expand_grid

    def here(file: str) -> Path:
        return Path(file) if Path(file).is_absolute() or Path(file).is_file() else workdir / file

    out = []
    for entry in entries:
        if isinstance(entry, dict) and isinstance(entry.get("grid"), dict):
            grid = {**entry["grid"], "base": str(here(entry["grid"].get("base", "")))}
            out += [load_config(p.data, stage, source=p.name) for p in expand_grid(grid, stage)]
        else:
            out.append(load_config(here(entry), stage))
    return out


def as_json(rows: list[RunStatus]) -> list[dict[str, Any]]:
    return [asdict(r) for r in rows]


STYLES = {"running": "bold cyan", "done": "green", "early-stopped": "green", "failed": "bold red",
          "preempted": "yellow", "interrupted": "yellow", "queued": "blue", "not started": "dim"}


def _ago(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s ago"
    if seconds < 3600:
        return f"{seconds // 60}m ago"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m ago" if seconds < 86400 else f"{seconds // 86400}d ago"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    return (f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600
            else f"{seconds // 60}m{seconds % 60:02d}s")


def status_table(rows: list[RunStatus], now: float | None = None, title: str | None = None):
    """The rich table of :func:`workflow_status`'s rows."""
    from rich.table import Table

    now = time.time() if now is None else now
    table = Table(title=title, title_justify="left")
    for col, justify in (("stage", "left"), ("experiment", "left"), ("state", "left"), ("epoch", "right"),
                         ("best", "right"), ("updated", "right"), ("samples/s", "right"), ("ETA", "right")):
        table.add_column(col, justify=justify, no_wrap=col in ("experiment", "state"))
    for r in rows:
        epoch = f"{r.epoch if r.epoch is not None else '-'}/{r.epochs}"
        best = f"{r.metric} {r.best:.4g} @{r.best_epoch}" if r.best is not None else "-"
        table.add_row(r.stage, r.name, f"[{STYLES[r.state]}]{r.state}[/]", epoch, best,
                      _ago(now - r.updated) if r.updated else "-",
                      f"{r.samples_per_s:.1f}" if r.samples_per_s else "-", _duration(r.eta_s))
    return table


def render(rows: list[RunStatus], now: float | None = None, title: str | None = None):
    """The table, then one line per failed or stopped run saying why."""
    from rich.console import Group
    from rich.text import Text

    notes = [Text(f"{r.stage}/{r.name}: {r.message}", style=STYLES[r.state])
             for r in rows if r.message and r.state in ("failed", "preempted", "interrupted")]
    return Group(status_table(rows, now, title), *notes)
