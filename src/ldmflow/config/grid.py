"""Experiment grids: one base experiment file and axes of values, expanded into one experiment per combination.

A grid is an entry of the workflow config's experiment lists (``autoencoders``, ``diffusion``, ``controlnets``)
written as a mapping instead of a file path::

    - grid:
        base: config/presets/diffusion/unet_256.yaml
        axes:
          capacity:                       # linked settings, one label per combination: capacity-unet128, ...
            unet128: {model.preset: capacity_unet128_d4, optim.lr: 1.5e-4}
            unet192: {model.preset: capacity_unet192_d4, optim.lr: 1.0e-4}
          model.attention_levels: [[], [3], [2, 3]]    # one dotted key, its values

Each combination of the axes' values (their product, in the order written) is the base file with those keys
set and a name of its own: the ``name`` template, or by default the base experiment's name followed by
``__AXIS-VALUE`` per axis (AXIS the last part of a dotted key), e.g.
``unet_base__capacity-unet128__attention_levels-3``.
Every combination is validated against the stage's schema when the workflow plans.
"""

from __future__ import annotations

import copy
import itertools
import re
from dataclasses import dataclass
from pathlib import Path

from ldmflow.config.loading import STAGES, load_config, read_yaml, set_dotted
from ldmflow.errors import ConfigError

GRID_KEYS = ("base", "axes", "name")
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")
_FIELD = re.compile(r"\{([^{}]*)\}")


@dataclass(frozen=True)
class GridPoint:
    """One experiment of a grid: its name, the keys the grid set (dotted key -> value), its raw mapping (the base
    file with those keys and the name set) and the validated experiment that mapping loads as."""

    name: str
    settings: dict
    data: dict
    labels: dict  # axis -> the label of this combination's value on it
    config: object  # the stage's experiment dataclass, from load_config(data)


def value_label(value) -> str:
    """A short, filesystem-safe label of an axis value: ``true``, ``null``, ``2-3`` for ``[2, 3]``, ``none`` for
    ``[]``, ``0.00015`` for ``1.5e-4``; other characters than letters, digits, ``_ . -`` become ``-``."""
    if isinstance(value, bool) or value is None:
        text = {True: "true", False: "false", None: "null"}[value]
    elif isinstance(value, float):
        text = f"{value:g}"
    elif isinstance(value, (list, tuple)):
        text = "-".join(value_label(v) for v in value) or "none"
    elif isinstance(value, dict):
        text = "-".join(f"{k}-{value_label(v)}" for k, v in value.items()) or "none"
    else:
        text = str(value)
    return _UNSAFE.sub("-", text).strip("-") or "none"


def _axis_values(key: str, values, where: str) -> list[tuple[str, dict]]:
    """An axis as (label, settings) pairs: a list of one dotted key's values, or a mapping label -> settings."""
    if isinstance(values, list) and values:
        return [(value_label(v), {key: v}) for v in values]
    if isinstance(values, dict) and values:
        out = []
        for label, settings in values.items():
            if not isinstance(settings, dict) or not settings:
                raise ConfigError(f"{where}.{label}: linked settings of axis {key!r} must be a mapping of dotted keys "
                                  f"to values, e.g. {{model.preset: capacity_unet128_d4, optim.lr: 1.5e-4}}; "
                                  f"found {settings!r}")
            out.append((value_label(label), dict(settings)))
        return out
    raise ConfigError(f"{where}: axis {key!r} must be a non-empty list of values of the key, or a non-empty mapping "
                      f"of labels to linked settings; found {values!r}")


def _default_name(base_name: str, labels: dict[str, str]) -> str:
    shorts = [key.rsplit(".", 1)[-1] for key in labels]
    parts = [f"{short if shorts.count(short) == 1 else key}-{label}"
             for (key, label), short in zip(labels.items(), shorts)]
    return "__".join([base_name, *parts])


def _fill_template(template: str, base_name: str, labels: dict[str, str], where: str) -> str:
    fields = {"base": base_name, **labels}

    def one(match: re.Match) -> str:
        if match.group(1) not in fields:
            raise ConfigError(f"{where}.name: template {template!r} names {{{match.group(1)}}}; allowed: "
                              + ", ".join(f"{{{f}}}" for f in fields))
        return fields[match.group(1)]

    return _FIELD.sub(one, template)


def expand_grid(grid: dict, stage: str, where: str = "grid") -> list[GridPoint]:
    """The experiments of one grid (the mapping under an entry's ``grid:`` key), each validated as an experiment
    of ``stage``; ``where`` names the entry in error messages (e.g. ``config: key 'diffusion[1].grid'``).

    >>> points = expand_grid({"base": "config/diffusion/demo_unet_tiny.yaml",
    ...                       "axes": {"optim.lr": [1e-4, 2e-4], "model.attention_levels": [[], [1]]}}, "diffusion")
    >>> [p.name for p in points]  # doctest: +NORMALIZE_WHITESPACE
    ['demo_unet_tiny__lr-0.0001__attention_levels-none', 'demo_unet_tiny__lr-0.0001__attention_levels-1',
     'demo_unet_tiny__lr-0.0002__attention_levels-none', 'demo_unet_tiny__lr-0.0002__attention_levels-1']
    """
    if stage not in STAGES:
        raise ConfigError(f"unknown stage {stage!r}; allowed: {', '.join(STAGES)}")
    if not isinstance(grid, dict):
        raise ConfigError(f"{where}: a grid is a mapping with keys {', '.join(GRID_KEYS)}; found {grid!r}")
    unknown = sorted(set(grid) - set(GRID_KEYS))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(GRID_KEYS)}")
    base, axes, template = grid.get("base"), grid.get("axes"), grid.get("name")
    if not isinstance(base, str) or not base:
        raise ConfigError(f"{where}.base: the base experiment file of the grid is required (a path); found {base!r}")
    if not Path(base).is_file():
        raise ConfigError(f"{where}.base: {base!r} does not exist")
    if not isinstance(axes, dict) or not axes:
        raise ConfigError(f"{where}.axes: required, a mapping of dotted keys (or axis labels) to their values; "
                          f"found {axes!r}")
    if template is not None and not isinstance(template, str):
        raise ConfigError(f"{where}.name: a name template such as '{{base}}_{{model.preset}}'; found {template!r}")
    base_data = read_yaml(base)
    base_name = str(base_data.get("name") or Path(base).stem)
    axis_values = {key: _axis_values(key, values, f"{where}.axes.{key}") for key, values in axes.items()}
    points: list[GridPoint] = []
    seen: dict[str, dict] = {}
    for combo in itertools.product(*axis_values.values()):
        labels = {key: label for key, (label, _) in zip(axis_values, combo)}
        settings = {k: v for _, values in combo for k, v in values.items()}
        name = (_fill_template(template, base_name, labels, where) if template
                else _default_name(base_name, labels))
        described = ", ".join(f"{k}={v!r}" for k, v in settings.items())
        if name in seen:
            raise ConfigError(f"{where}: combinations {seen[name]} and {labels} are both named {name!r}; give the "
                              f"grid a name template that uses every axis, e.g. "
                              + "'{base}_" + "_".join(f"{{{k}}}" for k in axes) + "'")
        seen[name] = labels
        data = copy.deepcopy(base_data)
        for key, value in settings.items():
            set_dotted(data, key, copy.deepcopy(value), f"{where}.axes")
        data["name"] = name
        source = f"{base} with {described} ({where})"
        config = load_config(data, stage, source=source)  # every combination must be a valid experiment, now
        points.append(GridPoint(name=name, settings=settings, data=data, labels=labels, config=config))
    return points
