"""The one config parser: nested dicts (YAML) <-> the dataclasses each module owns.

Every section of a run's config is a dataclass defined next to its consumer (the loader's
``DataConfig``, the optimizer's ``OptimConfig``, the model's ``DeCLIPConfig`` ...); the
trainer's config composes them. This module turns nested dicts into those dataclasses and back,
with one set of rules:

- an unknown key fails at once with its full dotted name and the keys that exist at that level;
- numbers are coerced to the field's type (YAML reads ``3e-4`` as a string and ``1`` as an int
  where a float is meant); an integer field refuses ``2.5``; YAML lists become tuples;
- a nested dataclass field takes a dict; a dataclass that defines ``from_name(name)`` also takes
  a name (a preset, e.g. ``loss: clip``), which dotted overrides then refine key by key;
- :func:`merge` applies a nested dict onto an existing instance (preset defaults, then
  overrides), recursing into the instance's own nested configs, so a model preset's ViT or
  ResNet section is checked against its own fields;
- a section's own ``__post_init__`` check that fails is reported with the section's dotted name.

It sits at the bottom of the package (it imports nothing of declip_fast) so every layer can use it.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import yaml


class ConfigKeyError(ValueError):
    """A config value or key that does not fit its dataclass (the message names the dotted key)."""


def from_dict(cls, values: dict, prefix: str = ""):
    """Build dataclass ``cls`` from a (nested) dict: defaults for the missing keys."""
    _check_mapping(values, prefix)
    fields = _fields(cls, values, prefix)
    hints = typing.get_type_hints(cls)
    kwargs = {
        name: _value(hints[name], value, prefix + name, None) for name, value in values.items() if fields[name].init
    }
    return _construct(cls, kwargs, prefix)


def merge(instance, values: dict, prefix: str = ""):
    """A copy of dataclass ``instance`` with the (nested) dict ``values`` applied: a dict for a
    field holding a dataclass updates that dataclass, anything else replaces the field."""
    _check_mapping(values, prefix)
    fields = _fields(type(instance), values, prefix)
    hints = typing.get_type_hints(type(instance))
    kwargs = {}
    for name, value in values.items():
        if not fields[name].init:
            raise ConfigKeyError(f"{prefix}{name} is derived, not set")
        kwargs[name] = _value(hints[name], value, prefix + name, getattr(instance, name))
    try:
        return dataclasses.replace(instance, **kwargs)
    except (ValueError, TypeError) as err:
        raise _in_section(err, prefix) from None


def to_dict(config) -> dict:
    """Plain nested dict (tuples as lists), loadable again by :func:`from_dict`."""

    def plain(v):
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v

    return plain(dataclasses.asdict(config))


def apply_override(values: dict, text: str, cls=None) -> None:
    """``a.b.c=value`` into the nested dict (levels created as needed; the keys are checked when
    the dict becomes ``cls``). With ``cls``, a section given by name (``loss: clip``) is opened
    into its fields first, so ``loss.nns=0.1`` refines the named preset."""
    key, sep, raw = text.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigKeyError(f"override {text!r} must look like key.sub=value")
    node, kind = values, cls
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        hint = _hints(kind).get(part)
        kind = _dataclass_in(hint) if hint is not None else None
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif isinstance(child, str) and kind is not None and hasattr(kind, "from_name"):
            child = node[part] = dataclasses.asdict(_named(kind, child, ".".join(parts[: i + 1])))
        if not isinstance(child, dict):
            raise ConfigKeyError(f"override {text!r}: {'.'.join(parts[: i + 1])} is not a section")
        node = child
    node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""


def load_yaml(path) -> dict:
    """A YAML file's mapping ({} when empty); a syntax error names the file."""
    try:
        values = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigKeyError(f"{path}: not valid YAML ({err})") from err
    _check_mapping(values, "")
    return values


def dump_yaml(config) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)


# ----------------------------------------------------------------------------------- internals


def _check_mapping(values, prefix: str) -> None:
    if not isinstance(values, dict):
        raise ConfigKeyError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {values!r}")


def _fields(cls, values: dict, prefix: str) -> dict:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigKeyError(
            f"unknown config key(s): {', '.join(prefix + str(k) for k in unknown)} "
            f"(known at this level: {', '.join(sorted(fields))})"
        )
    return fields


def _hints(cls) -> dict:
    return typing.get_type_hints(cls) if cls is not None and dataclasses.is_dataclass(cls) else {}


def _value(hint, value, key: str, current):
    """``value`` for a field of type ``hint`` (``current``: the field's value when merging)."""
    kind = _dataclass_in(hint)
    if dataclasses.is_dataclass(current) and isinstance(value, dict):
        return merge(current, value, key + ".")
    if kind is not None and isinstance(value, str) and hasattr(kind, "from_name"):
        return _named(kind, value, key)
    if kind is not None and isinstance(value, dict):
        return from_dict(kind, value, key + ".")
    if isinstance(value, list):
        inner = typing.get_args(hint)
        if inner and all(a in (int, float) for a in inner if a is not Ellipsis):
            number = inner[0]
            return tuple(_coerce(number, v, f"{key}[{i}]") for i, v in enumerate(value))
        return tuple(value)
    return _coerce(hint, value, key)


_BOOLS = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}


def _coerce(hint, value, key: str):
    args = set(typing.get_args(hint)) or {hint}
    if bool in args and not isinstance(value, bool) and value is not None:
        if isinstance(value, (str, int)) and str(value).lower() in _BOOLS:
            return _BOOLS[str(value).lower()]
        raise ConfigKeyError(f"{key}: expected true or false, got {value!r}")
    kind = float if float in args else int if int in args else None
    if kind is None or value is None or isinstance(value, (bool, kind)):
        return value
    if str in args and isinstance(value, str):
        return value
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigKeyError(f"{key}: expected a number, got {value!r}") from None
    if kind is int and not number.is_integer():  # nan and inf included
        raise ConfigKeyError(f"{key}: expected an integer, got {value!r}")
    return kind(number)


def _dataclass_in(hint):
    """The dataclass a field holds (also through ``X | None``; the first of a union), else None."""
    if dataclasses.is_dataclass(hint):
        return hint
    for arg in typing.get_args(hint):
        if dataclasses.is_dataclass(arg):
            return arg
    return None


def _named(kind, name: str, key: str):
    try:
        return kind.from_name(name)
    except (ValueError, KeyError) as err:
        raise ConfigKeyError(f"{key}: {err}") from None


def _construct(cls, kwargs: dict, prefix: str):
    try:
        return cls(**kwargs)
    except ConfigKeyError:
        raise
    except (ValueError, TypeError) as err:  # a section's own check: say which section
        raise _in_section(err, prefix) from None


def _in_section(err: Exception, prefix: str) -> Exception:
    section = prefix.rstrip(".")
    if isinstance(err, ConfigKeyError) or not section or str(err).startswith(section + "."):
        return err if isinstance(err, ValueError) else ConfigKeyError(str(err))
    return ConfigKeyError(f"{section}: {err}")


__all__ = ["ConfigKeyError", "apply_override", "dump_yaml", "from_dict", "load_yaml", "merge", "to_dict"]
