"""Typed configuration: YAML files and command-line overrides -> nested dataclasses.

One path for every trainer (see docs/planning.md):

- a YAML file is read into a dataclass, recursively: a field whose type is a dataclass takes a
  mapping; missing keys keep their defaults; an unknown key is an error that lists the valid ones;
- ``key.sub=value`` overrides (e.g. ``ppo.lr=3e-4 env.scenario=merge``) are applied on top, with
  the value converted to the field's type (``"3e-4"`` -> float, ``"true"`` -> bool,
  ``"64,64"`` or ``"[64, 64]"`` -> tuple, ``"null"`` -> None where the type allows it);
- :func:`save_resolved` writes the final values back as YAML next to a run's outputs, and
  :func:`load_config` on that file gives the same dataclass again.

Supported field types: ``bool``, ``int``, ``float``, ``str``, ``X | None``, ``Literal[...]``,
``enum.Enum`` subclasses (by value), ``tuple[X, ...]``, ``tuple[X, Y]``, ``list[X]``,
``dict[str, X]`` and nested dataclasses. Conversion is strict: an int field refuses 1.5, a bool
field refuses 1, a float field accepts ints.

Written here rather than taken from OmegaConf/Hydra or dacite: those are not dependencies of the
project, and what is needed (strict conversion, the list of valid keys in every error, dotted
overrides) is a hundred lines on top of ``dataclasses.fields`` and ``typing.get_type_hints``.
"""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from datasets.io import atomic_write_text

__all__ = [
    "ConfigError",
    "apply_overrides",
    "from_dict",
    "load_config",
    "save_resolved",
    "to_dict",
]

T = TypeVar("T")

_NONE_STRINGS = {"null", "none", "~", ""}
_TRUE_STRINGS = {"true", "yes", "on"}
_FALSE_STRINGS = {"false", "no", "off"}


class ConfigError(ValueError):
    """A configuration value that does not fit its dataclass (unknown key, wrong type)."""


def _hints(cls: type) -> dict[str, Any]:
    """Resolved field annotations of a dataclass (``from __future__ import annotations`` safe)."""
    return typing.get_type_hints(cls)


def _valid_keys(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.init]


def _is_optional(tp: Any) -> tuple[bool, Any]:
    """(True, X) for ``X | None`` / ``Optional[X]``, else (False, tp)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) < len(typing.get_args(tp)):
            inner = args[0] if len(args) == 1 else typing.Union[tuple(args)]  # noqa: UP007
            return True, inner
    return False, tp


def _convert(value: Any, tp: Any, where: str, from_string: bool) -> Any:
    """Convert ``value`` to type ``tp``; ``from_string``: the value came from a command line."""
    optional, inner = _is_optional(tp)
    # "none" / "null" on a command line mean None only where None is allowed, so that a string
    # field or a literal such as fusion method "none" still takes the word
    none_string = from_string and isinstance(value, str) and value.strip().lower() in _NONE_STRINGS
    if value is None or (none_string and (optional or tp is Any)):
        if optional or tp is Any:
            return None
        raise ConfigError(f"{where}: None is not allowed (type {_type_name(tp)})")
    tp = inner
    if tp is Any:
        return _parse_scalar(value) if from_string else value
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if from_string and isinstance(value, str):
            value = yaml.safe_load(value)
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, where)
    if origin is typing.Literal:
        candidates = list(args)
        for c in candidates:
            if value == c or (from_string and isinstance(value, str) and str(c) == value):
                return c
        raise ConfigError(f"{where}: {value!r} is not one of {candidates}")
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        for member in tp:
            if value == member or value == member.value or (isinstance(value, str) and value == member.name):
                return member
        raise ConfigError(f"{where}: {value!r} is not one of {[m.value for m in tp]}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str):
            low = value.strip().lower()
            if low in _TRUE_STRINGS:
                return True
            if low in _FALSE_STRINGS:
                return False
        raise ConfigError(f"{where}: expected a bool (true/false), got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an int, got the bool {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value.strip().replace("_", ""))
            except ValueError:
                pass
        if isinstance(value, float) and value.is_integer() and from_string:
            return int(value)
        raise ConfigError(f"{where}: expected an int, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a float, got the bool {value!r}")
        if isinstance(value, int | float):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a float, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if from_string:
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if origin in (tuple, list):
        items = _as_sequence(value, where, from_string)
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            if len(items) != len(args):
                raise ConfigError(f"{where}: expected {len(args)} items, got {len(items)}")
            return tuple(
                _convert(v, a, f"{where}[{i}]", from_string)
                for i, (v, a) in enumerate(zip(items, args, strict=True))
            )
        item_type = args[0] if args else Any
        converted = [_convert(v, item_type, f"{where}[{i}]", from_string) for i, v in enumerate(items)]
        return tuple(converted) if origin is tuple else converted
    if origin is dict:
        if from_string and isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        key_type, value_type = args if args else (Any, Any)
        return {
            _convert(k, key_type, f"{where} key", from_string): _convert(
                v, value_type, f"{where}.{k}", from_string
            )
            for k, v in value.items()
        }
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in args:
            try:
                return _convert(value, option, where, from_string)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{where}: {value!r} fits none of {_type_name(tp)}")
    raise ConfigError(f"{where}: unsupported field type {_type_name(tp)}")


def _as_sequence(value: Any, where: str, from_string: bool) -> list:
    if from_string and isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            value = yaml.safe_load(text)
        elif text == "":
            value = []
        else:
            value = [part.strip() for part in text.split(",")]
    if isinstance(value, str | bytes) or not isinstance(value, Sequence):
        raise ConfigError(f"{where}: expected a list, got {value!r}")
    return list(value)


def _parse_scalar(text: str) -> Any:
    return yaml.safe_load(text)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def from_dict(cls: type[T], data: Mapping[str, Any] | None, where: str = "") -> T:
    """Build dataclass ``cls`` from a (YAML-loaded) mapping, recursively and strictly.

    Raises:
        ConfigError: an unknown key (the message lists the valid keys), a value of the wrong
            type, or a required field that is missing.
    """
    if not (dataclasses.is_dataclass(cls) and isinstance(cls, type)):
        raise TypeError(f"{cls!r} is not a dataclass type")
    data = dict(data or {})
    valid = _valid_keys(cls)
    unknown = sorted(set(data) - set(valid))
    if unknown:
        prefix = f"{where}: " if where else ""
        raise ConfigError(f"{prefix}unknown key(s) {unknown} for {cls.__name__}; valid keys: {valid}")
    hints = _hints(cls)
    kwargs = {}
    for name in valid:
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], f"{where}.{name}" if where else name, False)
    try:
        return cls(**kwargs)
    except TypeError as err:  # a required field without a value
        raise ConfigError(f"{where or cls.__name__}: {err}") from None


def to_dict(obj: Any) -> Any:
    """Plain YAML-safe data (dicts, lists, scalars) from a dataclass instance, recursively."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, tuple | list):
        return [to_dict(v) for v in obj]
    if isinstance(obj, Mapping):
        return {str(k): to_dict(v) for k, v in obj.items()}
    return obj


def apply_overrides(cfg: T, overrides: Sequence[str]) -> T:
    """A copy of ``cfg`` with ``key.sub=value`` overrides applied, in order.

    Raises:
        ConfigError: a malformed override, an unknown key (listing the valid keys at that
            level) or a value that does not convert to the field's type.
    """
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        key, text = item.split("=", 1)
        path = [p for p in key.strip().split(".") if p]
        if not path:
            raise ConfigError(f"override {item!r} has an empty key")
        cfg = _set_path(cfg, path, text, where="")
    return cfg


def _set_path(obj: Any, path: list[str], text: str, where: str) -> Any:
    if not (dataclasses.is_dataclass(obj) and not isinstance(obj, type)):
        raise ConfigError(f"{where}: is not a section; cannot set {'.'.join(path)}")
    name = path[0]
    valid = _valid_keys(type(obj))
    here = f"{where}.{name}" if where else name
    if name not in valid:
        section = f" in {where}" if where else ""
        raise ConfigError(f"unknown key {here!r}{section}; valid keys: {valid}")
    tp = _hints(type(obj))[name]
    if len(path) == 1:
        value = _convert(text, tp, here, from_string=True)
    else:
        child = getattr(obj, name)
        if child is None:
            _, inner = _is_optional(tp)
            if dataclasses.is_dataclass(inner):
                child = inner()
        value = _set_path(child, path[1:], text, here)
    return dataclasses.replace(obj, **{name: value})


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """``cls`` from a YAML file (or its defaults when ``path`` is None), then ``overrides``.

    Raises:
        ConfigError: see :func:`from_dict` and :func:`apply_overrides`; also a file whose top
            level is not a mapping.
        FileNotFoundError: ``path`` does not exist.
    """
    data: Any = {}
    if path is not None:
        text = Path(path).read_text(encoding="utf-8")
        data = yaml.safe_load(text) or {}
        if not isinstance(data, Mapping):
            raise ConfigError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    cfg = from_dict(cls, data)
    return apply_overrides(cfg, overrides)


def save_resolved(cfg: Any, path: str | Path) -> Path:
    """Write ``cfg`` (a dataclass instance) as YAML to ``path``, atomically; returns ``path``."""
    text = yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None)
    return atomic_write_text(path, text)
