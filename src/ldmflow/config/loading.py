"""Loading experiment files: YAML, presets, ``--set`` overrides, validation, the stage registry."""

from __future__ import annotations

import copy
from pathlib import Path

import yaml

from ldmflow.config.autoencoder import AutoencoderExperiment
from ldmflow.config.common import STAGE_NAMES
from ldmflow.config.controlnet import ControlNetExperiment
from ldmflow.config.diffusion import UNET_PRESETS, DiffusionExperiment
from ldmflow.config.schema import from_dict, json_schema, to_dict, validate
from ldmflow.config.yamlio import load_yaml
from ldmflow.errors import ConfigError

# stage -> its experiment dataclass
STAGES: dict[str, type] = dict(zip(STAGE_NAMES, (AutoencoderExperiment, DiffusionExperiment, ControlNetExperiment),
                                   strict=True))


def apply_presets(data: dict, stage: str, source: str) -> dict:
    """Fill a diffusion experiment's model keys from its named preset (keys the file sets win)."""
    model = data.get("model") if isinstance(data, dict) else None
    if stage != "diffusion" or not isinstance(model, dict) or model.get("preset") is None:
        return data
    preset = model["preset"]
    if preset not in UNET_PRESETS:
        raise ConfigError(f"{source}: key 'model.preset' has value {preset!r}; allowed: {', '.join(UNET_PRESETS)}")
    return {**data, "model": {**UNET_PRESETS[preset], **model}}


def apply_overrides(data: dict, overrides: list[str] | tuple[str, ...], source: str = "--set") -> dict:
    """Apply ``dotted.key=value`` overrides (values parsed as YAML, ``optim.lr=1e-4`` a number) to a raw config
    mapping."""
    data = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"{source}: override {item!r} must look like dotted.key=value")
        key, raw = item.split("=", 1)
        try:
            value = load_yaml(raw)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{source}: override {item!r}: the value is not YAML "
                              f"({str(exc).splitlines()[0]})") from None
        set_dotted(data, key.strip(), value, source)
    return data


def set_dotted(data: dict, key: str, value, source: str = "--set") -> None:
    """Set ``data[a][b][c] = value`` for the dotted key ``a.b.c`` (in place; missing sections are created)."""
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{source}: cannot set {key!r}: {part!r} is not a section")
    node[parts[-1]] = value


def read_yaml(path: str | Path) -> dict:
    """An experiment file's mapping, numbers read as written (``lr: 1e-4`` is a float; see
    :mod:`ldmflow.config.yamlio`)."""
    path = Path(path)
    try:
        data = load_yaml(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    except (UnicodeDecodeError, IsADirectoryError) as exc:
        raise ConfigError(f"{path}: not a YAML text file ({exc})") from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{path}: an experiment file is a mapping of keys (name: ..., model: ...); "
                          f"found a {type(data).__name__}")
    return {} if data is None else data


def _unknown_keys(data: dict, cls: type, prefix: str = "") -> int:
    """How many of a mapping's keys (nested sections included) the dataclass ``cls`` has no field for."""
    import dataclasses
    import typing

    from ldmflow.config.schema import file_key

    hints = typing.get_type_hints(cls)
    names = {file_key(f): f.name for f in dataclasses.fields(cls)}
    unknown = 0
    for key, value in data.items():
        if key not in names:
            unknown += 1
        elif isinstance(value, dict) and dataclasses.is_dataclass(hints[names[key]]):
            unknown += _unknown_keys(value, hints[names[key]])
    return unknown


def infer_stage(data: dict, source: str = "<config>") -> str:
    """The stage an experiment file is for: its ``stage:`` key when it has one, else the stage whose
    experiment has every key of the file (nested keys too: ``control`` or ``model.fusion`` mean controlnet,
    ``diffusion`` or ``model.preset`` mean diffusion, ``model.latent_channels`` means autoencoder); a file
    that fits several stages (only shared keys: name, seed, optim, train) is an autoencoder's."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of config keys, got {type(data).__name__}")
    if "stage" in data:
        if data["stage"] not in STAGES:
            raise ConfigError(f"{source}: key 'stage' has value {data['stage']!r}; allowed: {', '.join(STAGES)}")
        return data["stage"]
    counts = {stage: _unknown_keys(data, cls) for stage, cls in STAGES.items()}
    return min(STAGES, key=lambda stage: counts[stage])  # ties: the registry's order (autoencoder first)


def load_config(path_or_dict: str | Path | dict, stage: str | None = None,
                overrides: list[str] | tuple[str, ...] = (), source: str | None = None):
    """Load, override and validate an experiment config; returns the typed experiment dataclass.

    ``stage`` (autoencoder, diffusion, controlnet) defaults to the one the file says it is
    (:func:`infer_stage`), so a notebook needs only the path:

    >>> load_config("config/diffusion/demo_unet_tiny.yaml").model.preset
    'demo_tiny'
    >>> type(load_config("config/controlnet/demo_controlnet_add.yaml")).__name__
    'ControlNetExperiment'
    >>> load_config({"name": "ae", "model": {"latent_channels": 8}}).model.latent_channels
    8

    ``source`` names the config in error messages (default: the path, or ``<config>`` for a mapping).
    """
    if stage is not None and stage not in STAGES:
        raise ConfigError(f"unknown stage {stage!r}; allowed: {', '.join(STAGES)}")
    if isinstance(path_or_dict, dict):
        data, source = path_or_dict, source or "<config>"
    else:
        data, source = read_yaml(path_or_dict), source or str(path_or_dict)
    data = apply_overrides(data, overrides)
    named = data.pop("stage", None) if isinstance(data, dict) else None
    if named is not None and stage is not None and named != stage:
        raise ConfigError(f"{source}: key 'stage' has value {named!r}, but a {stage} experiment was expected")
    stage = stage or infer_stage(data if named is None else {**data, "stage": named}, source)
    data = apply_presets(data, stage, source)
    cls = STAGES[stage]
    validate(data, cls, source)
    try:
        return from_dict(cls, data)
    except ValueError as exc:  # cross-field checks in __post_init__
        raise ConfigError(f"{source}: {exc}") from None


def resolved_config(cfg) -> dict:
    """The resolved experiment config that checkpoints and stores record; without ``init`` when it is unset, so
    that runs and stores whose config has no ``init`` section still resume and match."""
    out = to_dict(cfg)
    if out.get("init", {}).get("from") is None:
        out.pop("init", None)
    return out


def schema_documents() -> dict[str, str]:
    """The JSON schema of each stage's experiment files, as written to ``config/schemas/<stage>.schema.json``,
    and of the workflow config's memorization and judge options (``memorization.schema.json``,
    ``judge.schema.json``)."""
    import json

    from ldmflow.config.judge import JudgeConfig
    from ldmflow.config.memorization import MemorizationConfig

    docs = {}
    titles = {f"{stage}.schema.json": (f"ldmflow {stage} experiment", cls) for stage, cls in STAGES.items()}
    # the workflow config's `memorization:` section (validated at plan time by ldmflow.workflow)
    titles["memorization.schema.json"] = ("ldmflow memorization options", MemorizationConfig)
    titles["judge.schema.json"] = ("ldmflow judge options", JudgeConfig)  # the workflow config's `judge:`
    for name, (title, cls) in titles.items():
        schema = {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": title, **json_schema(cls)}
        stage = name.removesuffix(".schema.json")
        if stage in STAGES:
            # the optional stage key that load_config reads (and removes) before validating against the dataclass
            schema["properties"] = {"stage": {"enum": [stage], "description": "Optional: the stage this file is "
                                              "for; without it load_config infers the stage from the keys."},
                                    **schema["properties"]}
        docs[name] = json.dumps(schema, indent=2) + "\n"
    return docs


def resolve_experiment(config, stage: str, overrides=()) -> tuple[object, str]:
    """A stage's experiment: an experiment object as given, or a file/mapping loaded and validated.
    Returns it and the name errors cite (the file, or the experiment's name)."""
    cls = STAGES[stage]
    if isinstance(config, cls):
        return config, config.name
    return load_config(config, stage, overrides), str(config)


def schema_tables() -> dict[str, str]:
    """The Markdown key table of each schema of ``schema_documents``, as written beside it
    (``config/schemas/<name>.schema.md``): the configuration reference of the docs site."""
    import json

    return {name.removesuffix(".json") + ".md": schema_markdown(json.loads(text))
            for name, text in schema_documents().items()}


def schema_markdown(schema: dict) -> str:
    """One JSON schema as a Markdown table: key (dotted), type, default, allowed values, description."""
    lines = ["<!-- generated by `ldmflow schemas` from the typed configs; do not edit -->", "",
             f"# {schema['title']}", ""]
    if schema.get("description"):
        lines += [_cell(schema["description"]), ""]
    lines += ["| key | type | default | allowed | description |", "|---|---|---|---|---|"]
    lines += [" | ".join(["", *row, ""]).strip() for row in _schema_rows(schema)]
    return "\n".join(lines) + "\n"


def _schema_rows(schema: dict, prefix: str = ""):
    """(key, type, default, allowed, description) of every key under SCHEMA, depth first, objects before their keys."""
    for key, node in schema.get("properties", {}).items():
        nested = "properties" in node
        default = "" if nested or "default" not in node else _cell(f"`{_json(node['default'])}`")
        yield (f"`{prefix}{key}`", _type_name(node), default, _cell(_allowed(node)),
               _cell(node.get("description", "")))
        if nested:
            yield from _schema_rows(node, f"{prefix}{key}.")


def _json(value) -> str:
    import json

    return json.dumps(value)


def _cell(text: str) -> str:
    """TEXT safe inside a Markdown table cell: one line, pipes escaped."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _type_name(node: dict) -> str:
    if "anyOf" in node:
        return " or ".join(_type_name(branch) for branch in node["anyOf"])
    if "enum" in node:
        return "string" if all(isinstance(v, str) for v in node["enum"]) else "value"
    if "$ref" in node:
        return node["$ref"].rsplit("/", 1)[-1]
    if isinstance(node.get("type"), list):
        return " or ".join(node["type"])
    if node.get("type") == "array":
        return f"list of {_type_name(node['items'])}" if "items" in node else "list"
    return node.get("type", "any")


def _allowed(node: dict) -> str:
    """The range checks of a schema node in words: enum values, bounds, pattern, list length."""
    if "enum" in node:
        return ", ".join(f"`{_json(v)}`" if not isinstance(v, str) else f"`{v}`" for v in node["enum"])
    words = [f"{sign} {node[key]:g}" for key, sign in (("minimum", "≥"), ("exclusiveMinimum", ">"),
                                                        ("maximum", "≤"), ("exclusiveMaximum", "<")) if key in node]
    if "pattern" in node:
        words.append(f"matches `{node['pattern']}`")
    if "minItems" in node or "maxItems" in node:
        low, high = node.get("minItems", 0), node.get("maxItems")
        words.append(f"{low} items" if low == high else f"at least {low} items" if high is None
                     else f"{low} to {high} items")
    if node.get("type") == "array" and isinstance(node.get("items"), dict) and _allowed(node["items"]):
        words.append(f"each {_allowed(node['items'])}")
    for branch in node.get("anyOf", []):
        if branch.get("type") != "null" and _allowed(branch):
            words.append(_allowed(branch))
    return "; ".join(words)
