"""Helpers the Snakemake rules call (kept here, in the package, so that rules stay wiring only)."""

from __future__ import annotations

import logging
import shutil
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ldmflow.artifacts import METRICS_SUFFIX, RunPaths, atomic_write_bytes
from ldmflow.config.common import EXPERIMENT_LISTS
from ldmflow.config.loading import load_config
from ldmflow.config.memorization import MemorizationConfig
from ldmflow.config.schema import validate
from ldmflow.config.yamlio import load_yaml
from ldmflow.errors import ConfigError

log = logging.getLogger("ldmflow.workflow")
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


@dataclass(frozen=True)
class Experiment:
    """One experiment the workflow plans: the file its training job reads, its validated config and, for a grid
    combination, the mapping rule grid_experiment writes to that file (None: a file of the user's)."""

    path: str
    config: Any  # the stage's experiment dataclass
    data: dict | None = None
    base: str | None = None  # a grid combination's base experiment file


def as_experiment(entry: str | Path | Experiment, stage: str | None = None) -> Experiment:
    """An experiment as planned, or the one an experiment file holds (loaded and validated now)."""
    if isinstance(entry, Experiment):
        return entry
    return Experiment(str(entry), load_config(entry, stage))


def experiments(entries: list, stage: str, key: str | None = None) -> dict[str, Experiment]:
    """Validate each experiment of a stage now (so ``snakemake -n`` reports a bad key at once) and map each
    experiment's ``name`` to it; two experiments with one name are an error. Writes nothing.

    An entry is an experiment file, or a grid (``{grid: {base: FILE, axes: {...}, name: TEMPLATE}}``, see
    :mod:`ldmflow.config.grid`): each of its combinations is an experiment whose file,
    ``results/experiments/STAGE/NAME.yaml``, rule grid_experiment writes from the combination's mapping (a
    params of the rule, so Snakemake rewrites the file, and retrains, only when that mapping changes).
    ``key`` names the config list in messages (default: ``stage``)."""
    from ldmflow.config.grid import expand_grid

    key = key or stage
    out: dict[str, Experiment] = {}
    for i, entry in enumerate(entries):
        if isinstance(entry, dict):
            if set(entry) != {"grid"}:
                raise ConfigError(f"config: key '{key}[{i}]' is a mapping with keys {', '.join(map(str, entry))}; "
                                  f"allowed: an experiment file, or {{grid: {{base: FILE, axes: {{...}}}}}}")
            points = expand_grid(entry["grid"], stage, f"config: key '{key}[{i}].grid'")
            base = entry["grid"]["base"]
            named = [(p.name, Experiment(grid_experiment_path(stage, p.name), p.config, p.data, base))
                     for p in points]
        else:
            experiment = as_experiment(entry, stage)
            named = [(experiment.config.name, experiment)]
        for name, experiment in named:
            if name in out:
                raise ConfigError(f"{experiment.path}: experiment name {name!r} is also used by {out[name].path}")
            out[name] = experiment
    return out


def grid_experiment_path(stage: str, name: str) -> str:
    """The experiment file of a grid combination: ``results/experiments/STAGE/NAME.yaml``."""
    return str(GRID_DIR / stage / f"{name}.yaml")


def write_grid_experiment(path: str | Path, data: dict, base: str) -> None:
    """Write one grid combination's experiment file (rule grid_experiment), with a header naming its grid."""
    text = (f"# Written by the workflow from a grid over {base}; edit the grid in the config, not this file.\n"
            + yaml.safe_dump(data, sort_keys=False))
    atomic_write_bytes(Path(path), text.encode())


def workflow_config(configfile: str | Path, configfiles: Iterable[str | Path] = (),
                    overrides: Mapping[str, Any] | None = None, replace: bool = False) -> dict:
    """The workflow config merged as Snakemake merges it (the Snakefile's ``configfile`` unless it is missing or
    ``--replace-workflow-config`` is given, then each ``--configfile``, then ``--config``), with every file read by
    :func:`ldmflow.config.yamlio.load_yaml`: Snakemake's own loader reads YAML 1.1, where ``1e-4`` is a string."""
    files = [*([] if replace or not Path(configfile).is_file() else [configfile]), *configfiles]
    merged: dict = {}
    for path in files:
        data = load_yaml(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: a workflow config is a mapping of keys; found a {type(data).__name__}")
        merge_config(merged, data)
    return merge_config(merged, overrides or {})


def merge_config(config: dict, over: Mapping[str, Any]) -> dict:
    """Merge ``over`` into ``config`` (in place) as Snakemake does: a mapping merges key by key, any other value (a
    list too) replaces."""
    for key, value in over.items():
        if isinstance(value, Mapping):
            below = config.get(key)
            config[key] = merge_config(below if isinstance(below, dict) else {}, value)
        else:
            config[key] = value
    return config


def phase_members(phases: dict, workflow: dict[str, dict],
                  declared: dict[str, dict] | None = None) -> dict[str, list[tuple[str, str]]]:
    """The experiments of each phase, as (stage, name): a phase is a list of ``STAGE/NAME`` patterns (shell-style
    wildcards: ``diffusion/unet_base__*``, ``autoencoder/*``). ``workflow`` maps each stage to the experiments the
    workflow runs (name -> experiment); ``declared`` to those the config declares (default: the same), which may be more
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


def controlnet_bases(controlnets: Mapping[str, str | Experiment], diffusion: Mapping) -> dict[str, str]:
    """Map each ControlNet experiment's name to its ``base``, which must name one of the workflow's
    diffusion experiments (``diffusion`` maps their names to their experiments)."""
    out: dict[str, str] = {}
    for name, entry in controlnets.items():
        experiment = as_experiment(entry, "controlnet")
        base = experiment.config.base
        if base not in diffusion:
            allowed = ", ".join(sorted(diffusion)) or "none (the config's 'diffusion' list is empty)"
            given = ("is null" if base is None
                     else f"names {base!r}, which is not a diffusion experiment of the workflow")
            raise ConfigError(f"{experiment.path}: key 'base' {given}; allowed: {allowed}")
        out[name] = base
    return out


def selection_warnings(autoencoders: Mapping[str, str | Experiment], selection: dict) -> list[str]:
    """Say at plan time (``snakemake -n``) which autoencoder experiments keep their best checkpoint by another
    metric than ``selection.metric``: selection ranks each run's best checkpoint, at that checkpoint's epoch."""
    metric = selection["metric"]
    messages = []
    for name, entry in autoencoders.items():
        experiment = as_experiment(entry, "autoencoder")
        kept_by = experiment.config.train.early_stopping.metric
        if kept_by != metric:
            messages.append(
                f"{experiment.path}: the best checkpoint of {name} is kept by train.early_stopping.metric={kept_by}, "
                f"but selection.metric is {metric}: select_autoencoder ranks it on {metric} at its best-{kept_by} "
                f"epoch (set the two equal to rank each run at its best {metric})")
    for message in messages:
        log.warning("warning: %s", message)
    return messages


def init_parent(entry: str | Experiment, stage: str, workflow: dict[str, dict]) -> list[str]:
    """The file a fine-tuned experiment depends on (``init.from``): the parent experiment's metrics CSV (it stands
    for the run, so ``snakemake -n`` plans the parent first and ``--forcerun`` of the parent reruns the child),
    or the checkpoint file a path names; nothing without ``init``. ``workflow`` maps each stage to its
    experiments (name -> experiment)."""
    from ldmflow.training.finetune import parent_run

    experiment = as_experiment(entry, stage)
    path, source = experiment.path, experiment.config.init.from_
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
    if (parent_stage, name) == (stage, experiment.config.name):
        raise ConfigError(f"{path}: key 'init.from' names the experiment itself")
    return [metrics_file(parent_stage, name)]


def init_checkpoint_of(entry: str | Experiment, parent: list[str]) -> str | None:
    """The checkpoint a fine-tuned experiment starts from, given the file :func:`init_parent` named (None: fresh)."""
    if not parent:
        return None
    init = as_experiment(entry).config.init
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
        data = load_yaml(Path(path).read_text()) or {}
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
    mine = load_yaml(default.read_text()) or {}
    for key, why in MACHINE_KEYS.items():
        if key in mine:
            raise ConfigError(_profile_clash(default, key, why))
    for other in sorted(Path(profiles).glob("*/config.yaml")):
        theirs = load_yaml(other.read_text()) or {} if other != default else {}
        for key in sorted(mine.keys() & theirs.keys()):
            if mine[key] != theirs[key]:
                raise ConfigError(_profile_clash(default, key, f"{other} sets it too, and would lose it"))


def _profile_clash(default: str | Path, key: str, why: str) -> str:
    return (
        f"{default}: key {key!r} does not belong in the workflow profile: Snakemake reads it on its own, also "
        f"beside a cluster profile (--profile slurm), and its keys win ({why}). Give machine settings of this "
        f"computer on the command line (--cores 8 --resources gpu=2 --set-threads train_autoencoder=8) "
        f"or in a profile of its own "
        f"that replaces this one (--workflow-profile profiles/NAME)."
    )


def manifest_has_masks(manifest: str) -> bool:
    """Whether the workflow's data have masks: a manifest with a ``mask`` column, a folder with a ``masks/``
    tree (see :func:`ldmflow.data.manifest.read_folder`), or the demo data (not written yet, always masked)."""
    from ldmflow.data.manifest import read_manifest

    if not Path(manifest).exists():
        return True
    return "mask" in read_manifest(manifest).columns


def controlnets_for_data(controlnets: Mapping[str, str | Experiment], manifest: str) -> dict:
    """The ControlNet experiments the data can train: without masks, those controlled by ``mask`` are left
    out of the plan, with a note on stderr naming them (edge and image controls stay)."""
    if not controlnets or manifest_has_masks(manifest):
        return controlnets
    dropped = [n for n, e in controlnets.items() if as_experiment(e, "controlnet").config.control.signal == "mask"]
    if dropped:
        print(f"note: {manifest} has no masks; left out the mask-controlled ControlNet experiment(s) "
              f"{', '.join(dropped)}", file=sys.stderr)
    return {n: p for n, p in controlnets.items() if n not in dropped}


def gpus_per_local_job() -> int:
    """The ``gpu`` each GPU-class rule asks for unless a profile's set-resources says otherwise (the cluster
    profiles do): one on a machine with an NVIDIA GPU, none on a CPU machine, where only --cores limits how
    many jobs run at once."""
    return 1 if shutil.which("nvidia-smi") else 0


def synthetic_sets(entries: list | None, workflow: Mapping[str, Mapping]) -> dict[str, dict]:
    """The workflow config's ``synthetic`` list as name -> its entry (every key, defaults filled in), each checked
    now. A set whose model is not an experiment of this workflow (a preset's other experiments, a mask ControlNet
    on data without masks) is left out, with a note on stderr naming it; two sets may not share a name."""
    from dataclasses import asdict

    from ldmflow.config.synthetic import synthetic_config

    sets: dict[str, dict] = {}
    for entry in entries or []:
        cfg = synthetic_config(entry)
        if cfg.experiment not in workflow.get(cfg.stage, {}):
            print(f"note: left out the synthetic set {cfg.name}: {cfg.model} is not an experiment of this workflow",
                  file=sys.stderr)
            continue
        if cfg.name in sets:
            raise ConfigError(f"config: key 'synthetic': two sets named {cfg.name!r}; give one a 'name'")
        sets[cfg.name] = asdict(cfg)
    return sets
