"""Helpers the Snakemake rules call (kept here, in the package, so that rules stay wiring only)."""

from __future__ import annotations

import logging
import shutil
import sys
from collections.abc import Iterable
from pathlib import Path

import yaml

from ldmflow.artifacts import METRICS_SUFFIX, RunPaths, atomic_write_bytes
from ldmflow.config.loading import load_config
from ldmflow.config.memorization import MemorizationConfig
from ldmflow.config.schema import validate
from ldmflow.errors import ConfigError

log = logging.getLogger("ldmflow.workflow")
# The workflow config's lists of experiment files: a --configfile that sets one must set all of them.
EXPERIMENT_LISTS = ("autoencoders", "diffusion", "controlnets")
# Where the experiments of grids are written, one file per combination (results/experiments/STAGE/NAME.yaml).
GRID_DIR = Path("results") / "experiments"
# Keys that are machine choices even though no cluster profile sets them, with what they would do to a
# cluster run: Snakemake caps every job's threads at --cores and every resource at --resources, remote
# jobs included, and a cluster job's own Snakemake reads profiles/default too.
MACHINE_KEYS = {
    "cores": "it caps the threads of every cluster job too",
    "max-threads": "it caps the threads of every cluster job too",
    "resources": "it caps every job's resources, a cluster job's `gpu: 2` too",
}


def experiments(entries: list, stage: str, key: str | None = None) -> dict[str, str]:
    """Validate each experiment of a stage now (so ``snakemake -n`` reports a bad key at once) and map each
    experiment's ``name`` to its file; two experiments with one name are an error.

    An entry is an experiment file, or a grid (``{grid: {base: FILE, axes: {...}, name: TEMPLATE}}``, see
    :mod:`ldmflow.config.grid`): each of its combinations is written to ``results/experiments/STAGE/NAME.yaml``
    (rewritten only when its content changes, so an unchanged combination stays up to date when an axis gains a
    value) and that file is the experiment's. ``key`` names the config list in messages (default: ``stage``)."""
    from ldmflow.config.grid import expand_grid

    key = key or stage
    out: dict[str, str] = {}
    for i, entry in enumerate(entries):
        if isinstance(entry, dict):
            if set(entry) != {"grid"}:
                raise ConfigError(f"config: key '{key}[{i}]' is a mapping with keys {', '.join(map(str, entry))}; "
                                  f"allowed: an experiment file, or {{grid: {{base: FILE, axes: {{...}}}}}}")
            points = expand_grid(entry["grid"], stage, f"config: key '{key}[{i}].grid'")
            base = entry["grid"]["base"]
            named = [(p.name, write_grid_experiment(stage, p.name, p.data, base)) for p in points]
        else:
            named = [(load_config(entry, stage).name, str(entry))]
        for name, path in named:
            if name in out:
                raise ConfigError(f"{path}: experiment name {name!r} is also used by {out[name]}")
            out[name] = path
    return out


def write_grid_experiment(stage: str, name: str, data: dict, base: str) -> str:
    """Write one grid combination's experiment file (``results/experiments/STAGE/NAME.yaml``) unless it already
    holds the same text, so that its modification time, which Snakemake compares, changes only with its content."""
    path = GRID_DIR / stage / f"{name}.yaml"
    text = (f"# Written by the workflow from a grid over {base}; edit the grid in the config, not this file.\n"
            + yaml.safe_dump(data, sort_keys=False))
    if not path.is_file() or path.read_text() != text:
        atomic_write_bytes(path, text.encode())
    return str(path)


def phase_members(phases: dict, workflow: dict[str, dict[str, str]],
                  declared: dict[str, dict[str, str]] | None = None) -> dict[str, list[tuple[str, str]]]:
    """The experiments of each phase, as (stage, name): a phase is a list of ``STAGE/NAME`` patterns (shell-style
    wildcards: ``diffusion/unet_base__*``, ``autoencoder/*``). ``workflow`` maps each stage to the experiments the
    workflow runs (name -> file); ``declared`` to those the config declares (default: the same), which may be more
    (mask-controlled ControlNets on data without masks): a pattern that matches no declared experiment is an
    error, one that matches only left-out experiments adds nothing."""
    import fnmatch

    planned = {f"{stage}/{name}" for stage, names in workflow.items() for name in names}
    everything = [f"{stage}/{name}" for stage, names in (declared or workflow).items() for name in names]
    out: dict[str, list[tuple[str, str]]] = {}
    for phase, patterns in (phases or {}).items():
        members: list[str] = []
        for pattern in patterns:
            hits = [exp for exp in everything if fnmatch.fnmatchcase(exp, pattern)]
            if not hits:
                raise ConfigError(f"config: key 'phases.{phase}' has pattern {pattern!r}, which matches no "
                                  f"experiment; allowed: STAGE/NAME patterns over {', '.join(everything) or 'none'}")
            members += [exp for exp in hits if exp in planned and exp not in members]
        out[phase] = [tuple(exp.split("/", 1)) for exp in members]
    return out


def controlnet_bases(controlnets: dict[str, str], diffusion: dict[str, str]) -> dict[str, str]:
    """Map each ControlNet experiment's name to its ``base``, which must name one of the workflow's
    diffusion experiments (``diffusion`` maps their names to their files)."""
    out: dict[str, str] = {}
    for name, path in controlnets.items():
        base = load_config(path, "controlnet").base
        if base not in diffusion:
            allowed = ", ".join(sorted(diffusion)) or "none (the config's 'diffusion' list is empty)"
            given = "is null" if base is None else f"names {base!r}, which is not a diffusion experiment of the workflow"
            raise ConfigError(f"{path}: key 'base' {given}; allowed: {allowed}")
        out[name] = base
    return out


def selection_warnings(autoencoders: dict[str, str], selection: dict) -> list[str]:
    """Say at plan time (``snakemake -n``) which autoencoder experiments keep their best checkpoint by another
    metric than ``selection.metric``: selection ranks each run's best checkpoint, at that checkpoint's epoch."""
    metric = selection["metric"]
    messages = []
    for name, path in autoencoders.items():
        kept_by = load_config(path, "autoencoder").train.early_stopping.metric
        if kept_by != metric:
            messages.append(
                f"{path}: the best checkpoint of {name} is kept by train.early_stopping.metric={kept_by}, but "
                f"selection.metric is {metric}: select_autoencoder ranks it on {metric} at its best-{kept_by} "
                f"epoch (set the two equal to rank each run at its best {metric})")
    for message in messages:
        log.warning("warning: %s", message)
    return messages


def init_parent(path: str, stage: str, workflow: dict[str, dict[str, str]]) -> list[str]:
    """The file a fine-tuned experiment depends on (``init.from``): the parent experiment's metrics CSV (it stands
    for the run, so ``snakemake -n`` plans the parent first and ``--forcerun`` of the parent reruns the child),
    or the checkpoint file a path names; nothing without ``init``. ``workflow`` maps each stage to its
    experiments (name -> file)."""
    from ldmflow.training.finetune import parent_run

    source = load_config(path, stage).init.from_
    if source is None:
        return []
    run = parent_run(source)
    if run is None:
        return [source]
    parent_stage, name = run
    if name not in workflow[parent_stage]:
        allowed = ", ".join(f"{parent_stage}/{n}" for n in sorted(workflow[parent_stage])) or "none"
        raise ConfigError(f"{path}: key 'init.from' names {source!r}, which is not an experiment of the workflow; "
                          f"allowed: {allowed}, or a checkpoint path")
    if (parent_stage, name) == (stage, load_config(path, stage).name):
        raise ConfigError(f"{path}: key 'init.from' names the experiment itself")
    return [metrics_file(parent_stage, name)]


def init_checkpoint_of(path: str, parent: list[str]) -> str | None:
    """The checkpoint a fine-tuned experiment starts from, given the file :func:`init_parent` named (None: fresh)."""
    if not parent:
        return None
    init = load_config(path).init
    if not str(parent[0]).endswith(METRICS_SUFFIX):
        return str(parent[0])
    run = RunPaths.of_metrics(parent[0])
    return str(run.best if init.checkpoint == "best" else run.latest)


def manifest_path(config: dict) -> str:
    """The manifest the workflow trains on: the configured one, or the demo data's."""
    manifest = config["data"].get("manifest")
    if manifest:
        if not Path(manifest).exists():
            raise ConfigError(f"config: key 'data.manifest' names {manifest!r}, which does not exist")
        return str(manifest)
    return "results/data/demo/manifest.csv"


def run_dir(stage: str, name: str) -> Path:
    """The run folder of a workflow experiment."""
    return Path("results") / stage / name


def metrics_file(stage: str, name: str) -> str:
    """The metrics CSV of a workflow experiment (the file that stands for the run in the DAG)."""
    return str(RunPaths(run_dir(stage, name), name).metrics)


def best_checkpoint(metrics: str | Path) -> str:
    """The best checkpoint of the run a metrics CSV belongs to."""
    return str(RunPaths.of_metrics(metrics).best)


def memorization_options(config: dict) -> dict:
    """The workflow config's ``memorization`` section, validated now against :class:`MemorizationConfig` (the
    schema config/schemas/memorization.schema.json), so that a typo stops ``snakemake -n``, not the
    evaluation after all training."""
    options = config.get("memorization") or {}
    validate(options, MemorizationConfig, "workflow config, section 'memorization'")
    return options


def check_config_files(paths: Iterable[str | Path]) -> None:
    """Stop when a ``--configfile`` sets some experiment lists but not all of them.

    Snakemake merges such a file over ``config/config.yaml`` key by key (a list is replaced whole), so a
    preset that set only ``diffusion`` would keep the demo's ``controlnets``, whose bases it no longer has.
    """
    for path in paths:
        data = yaml.safe_load(Path(path).read_text()) or {}
        given = [key for key in EXPERIMENT_LISTS if key in data]
        missing = [key for key in EXPERIMENT_LISTS if key not in data]
        if given and missing:
            raise ConfigError(
                f"{path}: sets {', '.join(given)} but not {', '.join(missing)}; a --configfile replaces each key "
                f"it sets and keeps config/config.yaml's others, so it would also run the demo's "
                f"{', '.join(missing)}. Set {', '.join(f'{key}: [...]' for key in missing)} in it ([] for none)."
            )


def check_default_profile(profiles: str | Path) -> None:
    """Stop when the workflow profile ``profiles/default`` sets a key that another profile sets otherwise.

    Snakemake reads ``profiles/default`` on its own, also beside ``--profile slurm``, and its keys win key by
    key: a ``set-resources`` there would drop every GPU request of the cluster profile, silently.
    """
    default = Path(profiles) / "default" / "config.yaml"
    if not default.is_file():
        return
    mine = yaml.safe_load(default.read_text()) or {}
    for key, why in MACHINE_KEYS.items():
        if key in mine:
            raise ConfigError(_profile_clash(default, key, why))
    for other in sorted(Path(profiles).glob("*/config.yaml")):
        theirs = yaml.safe_load(other.read_text()) or {} if other != default else {}
        for key in sorted(mine.keys() & theirs.keys()):
            if mine[key] != theirs[key]:
                raise ConfigError(_profile_clash(default, key, f"{other} sets it too, and would lose it"))


def _profile_clash(default: str | Path, key: str, why: str) -> str:
    return (
        f"{default}: key {key!r} does not belong in the workflow profile: Snakemake reads it on its own, also "
        f"beside a cluster profile (--profile slurm), and its keys win ({why}). Give machine settings of this "
        f"computer on the command line (--cores 8 --resources gpu=2 --set-threads train_autoencoder=8) or in a profile of its own "
        f"that replaces this one (--workflow-profile profiles/NAME)."
    )


def manifest_has_masks(manifest: str) -> bool:
    """Whether the workflow's data have masks: a manifest with a ``mask`` column, a folder with a ``masks/``
    tree (see :func:`ldmflow.data.manifest.read_folder`), or the demo data (not written yet, always masked)."""
    from ldmflow.data.manifest import read_manifest

    if not Path(manifest).exists():
        return True
    return "mask" in read_manifest(manifest).columns


def controlnets_for_data(controlnets: dict[str, str], manifest: str) -> dict[str, str]:
    """The ControlNet experiments the data can train: without masks, those controlled by ``mask`` are left
    out of the plan, with a note on stderr naming them (edge and image controls stay)."""
    if not controlnets or manifest_has_masks(manifest):
        return controlnets
    dropped = [n for n, p in controlnets.items() if load_config(p, "controlnet").control.signal == "mask"]
    if dropped:
        print(f"note: {manifest} has no masks; left out the mask-controlled ControlNet experiment(s) "
              f"{', '.join(dropped)}", file=sys.stderr)
    return {n: p for n, p in controlnets.items() if n not in dropped}


def gpus_per_local_job() -> int:
    """The ``gpu`` each GPU-class rule asks for unless a profile's set-resources says otherwise (the cluster
    profiles do): one on a machine with an NVIDIA GPU, none on a CPU machine, where only --cores limits how
    many jobs run at once."""
    return 1 if shutil.which("nvidia-smi") else 0
