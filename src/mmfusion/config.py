"""Configs are small dataclasses; this module reads them from dicts and YAML and applies overrides.

The CLI and the Python API share the same dataclasses: a YAML file gives values for any field, and
``--a.b=value`` on the command line overrides one field. Each field documents itself with
``metadata={"help": ...}`` (see :func:`field`), which is what ``--help`` prints.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value or key that does not fit the dataclass it is meant for."""


def field(default: Any = dataclasses.MISSING, help: str = "", *, factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field with a help text (shown by ``mmfusion ... --help``)."""
    if factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=factory, metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain, JSON-able dict of a (nested) config dataclass."""
    return dataclasses.asdict(cfg)


def _is_optional(tp: Any) -> bool:
    return get_origin(tp) in (Union, types.UnionType) and type(None) in get_args(tp)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert where lossless (int -> float, list -> tuple)."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in get_args(tp):
            return None
        errors = []
        for arg in get_args(tp):
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: {value!r} does not fit {_type_name(tp)}")
    if origin is Literal:
        if value not in get_args(tp):
            choices = ", ".join(repr(a) for a in get_args(tp))
            raise ConfigError(f"{key}: {value!r} is not one of {choices}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, prefix=f"{key}.")
    if origin in (list, tuple):
        if isinstance(value, str) and value.strip()[:1] in "([" and value.strip()[-1:] in ")]":
            value = [yaml.safe_load(v) for v in value.strip()[1:-1].split(",") if v.strip()]  # "(a, b)" as typed
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list such as [1, 2], got {value!r}")
        args = get_args(tp)
        inner = args[0] if args else Any
        items = [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r}")
    return value


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return "|".join(str(a) for a in get_args(tp))
    if _is_optional(tp):
        inner = [a for a in get_args(tp) if a is not type(None)]
        return " | ".join(_type_name(a) for a in inner) + " | null"
    return getattr(tp, "__name__", str(tp))


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unknown_key_message(key: str, names: set[str], prefix: str) -> str:
    import difflib

    close = difflib.get_close_matches(key, names, n=1)
    hint = f"did you mean {prefix}{close[0]}? " if close else ""
    return f"unknown config key {prefix}{key}; {hint}valid keys: {', '.join(prefix + n for n in sorted(names))}"


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build the dataclass ``cls`` from a (nested) dict, checking keys and types.

    Unknown keys are an error that lists the valid ones: a typo must not be silently ignored.
    """
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(_unknown_key_message(unknown[0], names, prefix))
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items()}
    return cls(**kwargs)


def merge(cfg: T, data: dict[str, Any], prefix: str = "") -> T:
    """A copy of ``cfg`` with the values in ``data`` (nested dict) applied on top."""
    hints = _hints(type(cfg))
    names = {f.name for f in dataclasses.fields(cfg)}
    changes: dict[str, Any] = {}
    for key, value in data.items():
        if key not in names:
            raise ConfigError(_unknown_key_message(key, names, prefix))
        current = getattr(cfg, key)
        if dataclasses.is_dataclass(current) and isinstance(value, dict):
            changes[key] = merge(current, value, prefix=f"{prefix}{key}.")
        else:
            changes[key] = _coerce(value, hints[key], prefix + key)
    return dataclasses.replace(cfg, **changes)


def parse_override(text: str) -> dict[str, Any]:
    """``"a.b=3"`` -> ``{"a": {"b": 3}}``; the value is read as YAML (numbers, booleans, lists, null)."""
    text = text[2:] if text.startswith("--") else text
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.sub=value")
    key, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw.strip() else ""
    for part in reversed(key.split(".")):
        if not part:
            raise ConfigError(f"override {text!r} has an empty key part")
        value = {part: value}
    return value


def override_args(extra: list[str]) -> list[str]:
    """``--a.b=v`` and ``--a.b v`` from a command line's leftover arguments, as ``a.b=v``."""
    out, i = [], 0
    while i < len(extra):
        tok = extra[i]
        if not tok.startswith("--") or "." not in tok.split("=", 1)[0]:
            raise ConfigError(
                f"unrecognised argument {tok!r}; config options look like --train.lr=1e-3 (see --help for the list)"
            )
        if "=" in tok:
            out.append(tok[2:])
            i += 1
        elif i + 1 < len(extra) and not extra[i + 1].startswith("--"):
            out.append(f"{tok[2:]}={extra[i + 1]}")
            i += 2
        else:
            raise ConfigError(f"{tok} needs a value, like {tok}=VALUE")
    return out


def deep_update(base: dict, new: dict) -> dict:
    """Merge the plain dict ``new`` into ``base``, nested mappings key by key (later layers of a config win)."""
    for k, v in new.items():
        base[k] = deep_update(dict(base.get(k) or {}), v) if isinstance(v, dict) else v
    return base


def with_overrides(data: dict, extra: list[str]) -> dict:
    """``data`` with each ``--a.b=value`` of a command line's leftover arguments merged in, in order."""
    for text in override_args(extra):
        data = deep_update(data, parse_override(text))
    return data


def apply_overrides(cfg: T, overrides: list[str]) -> T:
    for text in overrides:
        cfg = merge(cfg, parse_override(text))
    return cfg


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of config keys, got {type(data).__name__}")
    return data


def describe(cls_or_cfg: Any, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """Rows of (key, type, default, help) for every leaf field, for ``--help`` texts."""
    cls = cls_or_cfg if isinstance(cls_or_cfg, type) else type(cls_or_cfg)
    inst = None if isinstance(cls_or_cfg, type) else cls_or_cfg
    hints = _hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        if inst is not None:
            default = getattr(inst, f.name)
        elif f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = None
        if dataclasses.is_dataclass(default):
            rows.extend(describe(default, prefix=f"{prefix}{f.name}."))
        else:
            shown = repr(list(default)) if isinstance(default, tuple) else repr(default)  # as it is typed
            rows.append((prefix + f.name, _type_name(hints[f.name]), shown, f.metadata.get("help", "")))
    return rows


def format_help(cls_or_cfg: Any, prefix: str = "") -> str:
    rows = describe(cls_or_cfg, prefix)
    width = max((len(r[0]) for r in rows), default=10) + 2
    lines = []
    for key, tp, default, help_text in rows:
        lines.append(f"  --{key}=<{tp}>".ljust(width + 12) + f" {help_text} (default {default})")
    return "\n".join(lines)
