"""Helpers the Snakemake rules call (kept here, in the package, so that rules stay wiring only)."""

from __future__ import annotations

import sys
from pathlib import Path

from ldmflow.config.loading import load_config
from ldmflow.errors import ConfigError


def experiments(paths: list[str], stage: str) -> dict[str, str]:
    """Validate each experiment file of a stage now (so ``snakemake -n`` reports a bad key at once) and
    map each experiment's ``name`` to its file; two files with one name are an error."""
    out: dict[str, str] = {}
    for path in paths:
        cfg = load_config(path, stage)
        if cfg.name in out:
            raise ConfigError(f"{path}: experiment name {cfg.name!r} is also used by {out[cfg.name]}")
        out[cfg.name] = str(path)
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


def manifest_path(config: dict) -> str:
    """The manifest the workflow trains on: the configured one, or the demo data's."""
    manifest = config["data"].get("manifest")
    if manifest:
        if not Path(manifest).exists():
            raise ConfigError(f"config: key 'data.manifest' names {manifest!r}, which does not exist")
        return str(manifest)
    return "results/data/demo/manifest.csv"


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
