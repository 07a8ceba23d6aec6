"""Typed config loading: YAML overrides + `key=value` overrides onto frozen dataclasses.

A config is a tree of frozen dataclasses whose defaults are the paper's settings. A YAML file
holds overrides only; `a.b.c=value` on the command line overrides the YAML. Values are coerced
to each field's declared type, unknown keys are refused with the list of known ones, and each
dataclass validates itself in `__post_init__`, so a bad config fails before any worker starts.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import types
import typing
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key."""


def _coerce(value: Any, hint: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _coerce(value, args[0], key)
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return build(hint, value, key)
    if origin in (tuple, list):
        (item,) = typing.get_args(hint)[:1] or (str,)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v] if value else []
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return tuple(_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value))
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        try:
            return hint(value)
        except (ValueError, TypeError):
            raise ConfigError(f"{key}: {value!r} is not one of "
                              f"{[m.value for m in hint]}") from None
    if hint is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("true", "1", "yes", "on"):
            return True
        if str(value).lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if hint in (int, float, str):
        return _scalar(value, hint, key)
    return value


def _scalar(value: Any, hint: type, key: str) -> Any:
    # YAML gives bools, lists and mappings as such; int(True) or str([1]) would quietly
    # turn them into a number or a string nobody wrote.
    if isinstance(value, bool) or isinstance(value, (dict, list, tuple, set)):
        raise ConfigError(f"{key}: expected {hint.__name__}, got {value!r}")
    try:
        if hint is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        return hint(value)
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(f"{key}: expected {hint.__name__}, got {value!r}") from None


def _unknown_keys(unknown: list[str], known: list[str], where: str) -> ConfigError:
    from gad_megatron.config.rules import suggest

    parts = []
    for name in unknown:
        best = suggest(name, known)
        parts.append(f"unknown key {name!r} in {where}"
                     + (f"; did you mean '{best}'?" if best else ""))
    return ConfigError("; ".join(parts) + f" (known: {', '.join(known)})")


def build(cls: type, values: dict[str, Any] | None, prefix: str = "") -> Any:
    """Instantiate dataclass `cls` from a (nested) mapping of overrides. Every value is
    typed and checked against its rule (config/rules.py) as it is read, so the error names
    the full key; the dataclass then checks its cross-field conditions."""
    from gad_megatron.config.rules import check_value

    values = dict(values or {})
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(str(k) for k in values if k not in fields)
    if unknown:
        raise _unknown_keys(unknown, sorted(fields), prefix or "config")
    kwargs = {}
    for name, value in values.items():
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _coerce(value, hints[name], key)
        problem = check_value(cls.__name__, name, kwargs[name])
        if problem:
            raise ConfigError(f"{key}: {problem}")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{prefix or 'config'}: {exc}") from None


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`["a.b=1", "c=x"]` -> nested dict of strings (typed later against the dataclasses)."""
    tree: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node = tree
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
        node[parts[-1]] = _flow_value(item, raw)
    return tree


def _flow_value(item: str, raw: str) -> Any:
    """`[a,b]` and `{k: v}`, quoted or not, are YAML flow collections, as OmegaConf and Hydra
    read them; anything else stays a string for `_coerce` (`a,b` is a list there too)."""
    text = raw.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        text = text[1:-1].strip()  # the quotes a shell did not take off
    if not text or text[0] not in "[{":
        return raw
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        why = str(exc).splitlines()[0]
        raise ConfigError(f"override {item!r}: not a valid YAML list or mapping ({why})") from None
    if not isinstance(value, (list, dict)):
        raise ConfigError(f"override {item!r}: not a valid YAML list or mapping")
    return value


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge; `over` wins."""
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping; `include: other.yaml` (relative to this file) is merged underneath."""
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML ({exc})") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    base_name = doc.pop("include", None)
    if base_name:
        doc = merge(read_yaml(path.parent / base_name), doc)
    return doc


def read_run_config(run_dir: str | Path) -> dict[str, Any]:
    """The resolved config a run wrote to `RUN/config.json` ({} when there is none)."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        return {}
    try:
        tree = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return tree


def to_dict(obj: Any) -> Any:
    """A plain (YAML-able) representation of a config tree."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, tuple):
        return [to_dict(v) for v in obj]
    return obj


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1} (MLflow params, printing)."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict):
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out
