"""Typed experiment configs, validated early against JSON schemas generated from the dataclasses.

Each experiment file (autoencoder, diffusion, ControlNet) is a YAML mapping with the sections
``name``, ``seed``, ``data``, ``model``, ``loss``, ``optim``, ``train``. The dataclasses below are the one
source of truth: their fields give each key's type, default and description, and their metadata its
range. :func:`json_schema` turns a dataclass into a JSON schema (written to ``config/schemas/`` for
readers and editors), and :func:`load_config` validates a file against it with ``jsonschema`` before
building the typed object, so an unknown key, a wrong type or an out-of-range value stops with an error
that names the file, the key and what is allowed.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from typing import Any, Literal, TypeVar

import jsonschema

from ldmflow.errors import ConfigError

T = TypeVar("T")


def param(default: Any = dataclasses.MISSING, doc: str = "", *, key: str | None = None, **constraints: Any) -> Any:
    """A dataclass field with a description and JSON-schema constraints (minimum, maximum, ...); ``key`` is
    its name in files when that is a Python keyword (``init.from`` is the field ``from_``)."""
    meta = {"doc": doc, **constraints, **({"key": key} if key else {})}
    if isinstance(default, (list, dict)):
        value = copy.deepcopy(default)
        return dataclasses.field(default_factory=lambda: copy.deepcopy(value), metadata=meta)
    if (dataclasses.is_dataclass(default) and isinstance(default, type)) or callable(default):
        return dataclasses.field(default_factory=default, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def file_key(f: dataclasses.Field) -> str:
    """A field's key in config files: its name, or the ``key`` its :func:`param` gives."""
    return f.metadata.get("key", f.name)


# --------------------------------------------------------------------------------------------------
# Schema generation
# --------------------------------------------------------------------------------------------------


def _type_schema(tp: Any) -> dict:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        non_null = [a for a in args if a is not type(None)]
        inner = _type_schema(non_null[0]) if len(non_null) == 1 else {"anyOf": [_type_schema(a) for a in non_null]}
        return {"anyOf": [inner, {"type": "null"}]} if len(non_null) < len(args) else inner
    if origin is Literal:
        return {"enum": list(args)}
    if origin in (list, tuple):
        return {"type": "array", "items": _type_schema(args[0])} if args else {"type": "array"}
    if origin is dict:
        return {"type": "object"}
    if dataclasses.is_dataclass(tp):
        return json_schema(tp)
    simple = {bool: "boolean", int: "integer", float: "number", str: "string"}
    if tp in simple:
        return {"type": simple[tp]}
    if tp is Any:
        return {}
    raise TypeError(f"no JSON schema for type {tp!r}")


def json_schema(cls: type) -> dict:
    """The JSON schema of a config dataclass: types, defaults, descriptions, ranges, no unknown keys."""
    hints = typing.get_type_hints(cls)
    properties: dict[str, dict] = {}
    required: list[str] = []
    for f in dataclasses.fields(cls):
        schema = _type_schema(hints[f.name])
        meta = dict(f.metadata)
        doc = meta.pop("doc", "")
        meta.pop("key", None)
        if meta:
            target = schema["anyOf"][0] if "anyOf" in schema and {"type": "null"} in schema["anyOf"] else schema
            target.update(meta)
        if doc:
            schema["description"] = doc
        if f.default is not dataclasses.MISSING:
            schema["default"] = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            value = f.default_factory()  # type: ignore[misc]
            schema["default"] = to_dict(value) if dataclasses.is_dataclass(value) else value
        else:
            required.append(file_key(f))
        properties[file_key(f)] = schema
    out = {"type": "object", "properties": properties, "additionalProperties": False}
    if required:
        out["required"] = required
    return out


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def _describe_allowed(schema: dict) -> str:
    if "enum" in schema:
        return "one of " + ", ".join(repr(v) for v in schema["enum"])
    if "anyOf" in schema:
        # range keys beside an anyOf (e.g. a number or a list of numbers) bound its numeric alternatives
        range_keys = ("minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum")
        bounds = {k: v for k, v in schema.items() if k in range_keys}
        return " or ".join(_describe_allowed({**bounds, **s} if s.get("type") in ("number", "integer") else s)
                           for s in schema["anyOf"])
    parts = [schema.get("type", "any value")]
    for key, word in (("minimum", ">="), ("exclusiveMinimum", ">"), ("maximum", "<="), ("exclusiveMaximum", "<")):
        if key in schema:
            parts.append(f"{word} {schema[key]}")
    if "pattern" in schema:
        parts.append(f"matching {schema['pattern']}")
    return " ".join(str(p) for p in parts)


def _format_error(err: jsonschema.ValidationError, source: str) -> str:
    key = ".".join(str(p) for p in err.absolute_path) or "(top level)"
    if err.validator == "additionalProperties":
        allowed = sorted(err.schema.get("properties", {}))
        extra = sorted(set(err.instance) - set(allowed))
        where = f"{key}." if err.absolute_path else ""
        return (
            f"{source}: unknown key {', '.join(repr(where + e) for e in extra)}; "
            f"allowed keys{' under ' + key if err.absolute_path else ''}: {', '.join(allowed)}"
        )
    if err.validator == "required":
        return f"{source}: {err.message} (under {key})"
    return f"{source}: key '{key}' has value {err.instance!r}; allowed: {_describe_allowed(err.schema)}"


def validate(data: dict, cls: type, source: str = "<config>") -> None:
    """Raise ConfigError naming the source, the key and what is allowed, for the first problems found."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of keys to values, got {type(data).__name__}")
    validator = jsonschema.Draft202012Validator(json_schema(cls))
    errors = sorted(validator.iter_errors(data), key=lambda e: list(map(str, e.absolute_path)))
    if errors:
        raise ConfigError("\n".join(_format_error(e, source) for e in errors[:5]))


def from_dict(cls: type[T], data: dict) -> T:
    """Build a (validated) config dataclass from a plain mapping, recursively."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if file_key(f) not in data:
            continue
        value, tp = data[file_key(f)], hints[f.name]
        if dataclasses.is_dataclass(tp) and isinstance(value, dict):
            value = from_dict(tp, value)
        elif tp is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        kwargs[f.name] = copy.deepcopy(value)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    """A config dataclass as a plain, YAML- and checkpoint-safe mapping (the resolved config), keyed as files are."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {file_key(f): to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return type(cfg)(to_dict(v) for v in cfg)
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return copy.deepcopy(cfg)
