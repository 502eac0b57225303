"""Typed configs from YAML: nested frozen dataclasses, checked, with command-line overrides.

The mechanism is generic (works for any tree of dataclasses); the run schema lives in
:mod:`opd_jax.config.schema` and :mod:`opd_jax.config.run`; the package re-exports all three
(``from opd_jax.config import RunConfig, load_config``). This module imports nothing of opd_jax.

Field types: ``bool int float str Any``, ``Optional[X]`` and other unions (first member that
accepts wins), ``Literal``, ``tuple[X, ...]``, ``tuple[X, Y]``, ``list[X]``, ``dict[str, X]``, nested
dataclasses and lists of them. Obvious coercions only: int -> float, a string such as ``"1e-6"`` ->
float (PyYAML reads ``1e-6`` without a dot as a string), an integral float -> int, list -> tuple.
Hooks on a dataclass: ``validate(self)`` raises :class:`FieldError` (field relative to the
dataclass) and the message names the full dotted key; classmethod ``preprocess(cls, data) -> dict``
rewrites the raw mapping before parsing. At an entry point (read config there, pass plain values)::

    cfg = load_typed(RunConfig, "configs/demo.yaml", ["optim.lr=1e-5", "stages.1.steps=10"])
    save_config(cfg, run_dir / "config.yaml")
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import math
import types
import typing
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping, Sequence, TypeVar, Union

import yaml

T = TypeVar("T")

__all__ = [
    "ConfigError", "FieldError", "from_dict", "to_dict", "apply_overrides", "load_typed",
    "load_yaml", "save_config", "dump_config", "validate_tree",
]


class ConfigError(ValueError):
    """A config value, key or override is invalid; the message names the dotted key."""


class FieldError(ValueError):
    """Raised by ``validate()`` hooks: ``field`` (relative, dotted) had ``value``; ``expected`` says
    what is valid. :func:`from_dict` turns it into a :class:`ConfigError` with the full key."""

    def __init__(self, field: str, value: Any, expected: str):
        super().__init__(f"{field}={value!r}: {expected}")
        self.field, self.value, self.expected = field, value, expected


def _join(path: str, key: Any) -> str:
    key = str(key)
    return f"{path}.{key}" if path and key else (path or key)


def _show(path: str) -> str:
    return path or "<root>"


def _suggest(word: str, options: Iterable[str]) -> str:
    close = difflib.get_close_matches(str(word), [str(o) for o in options], n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else ""


def _unknown_key(prefix: str, path: str, key: Any, names: Iterable[str]) -> ConfigError:
    names = [str(n) for n in names]
    return ConfigError(f"{prefix}unknown key {_join(path, key)!r}{_suggest(key, names) or '.'} "
                       f"Valid keys of {_show(path)}: {', '.join(names)}")


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.init]


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _raise_field(err: FieldError, path: str) -> typing.NoReturn:
    value = to_dict(err.value)
    raise ConfigError(f"{_join(path, err.field)}={value!r} is invalid: {err.expected}") from None



def from_dict(cls: type[T], data: Any, path: str = "") -> T:
    """Build ``cls`` (a dataclass or any supported type annotation) from plain YAML-like data.

    Args:
      cls: target type, usually a (frozen) dataclass.
      data: mappings / lists / scalars as ``yaml.safe_load`` returns them.
      path: dotted key of ``data`` inside the whole config, used in error messages.

    Raises:
      ConfigError: unknown key (with the valid keys and the closest match), missing required key,
        wrong type, value outside a ``Literal``, or a ``validate()`` hook rejecting a value.
    """
    return _convert(cls, data, path)


def _convert(tp: Any, value: Any, path: str) -> Any:
    if tp is Any or tp is object:
        return value
    if _is_dataclass_type(tp):
        return _build_dataclass(tp, value, path)
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Literal:
        if value in args and not (isinstance(value, bool) and not any(a is value for a in args)):
            return value
        allowed = ", ".join(repr(a) for a in args)
        raise ConfigError(f"{_show(path)}={value!r} is not allowed; choose one of: {allowed}"
                          f"{_suggest(value, [str(a) for a in args])}")
    if origin in (Union, types.UnionType):
        return _convert_union(tp, args, value, path)
    if origin in (list, tuple, Sequence, typing.Sequence) or tp in (list, tuple):
        return _convert_sequence(tp, origin or tp, args, value, path)
    if origin in (dict, Mapping, typing.Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{_show(path)}: expected a mapping, got {type(value).__name__} "
                              f"{value!r}")
        kt, vt = args or (Any, Any)
        return {_convert(kt, k, _join(path, k)): _convert(vt, v, _join(path, k))
                for k, v in value.items()}
    return _convert_scalar(tp, value, path)


def _convert_union(tp: Any, args: tuple, value: Any, path: str) -> Any:
    if value is None:
        if type(None) in args:
            return None
        raise ConfigError(f"{_show(path)}: a value is required ({_type_name(tp)}), got null")
    members = [a for a in args if a is not type(None)]
    if len(members) == 1:
        return _convert(members[0], value, path)
    errors = []
    for member in members:
        try:
            return _convert(member, value, path)
        except ConfigError as e:
            errors.append(str(e))
    raise ConfigError(f"{_show(path)}={value!r} matches none of {_type_name(tp)}: "
                      + " | ".join(errors))


def _convert_sequence(tp: Any, origin: Any, args: tuple, value: Any, path: str) -> Any:
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{_show(path)}: expected a list ({_type_name(tp)}), got "
                          f"{type(value).__name__} {value!r}")
    if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
        if len(value) != len(args):
            raise ConfigError(f"{_show(path)}: expected {len(args)} items ({_type_name(tp)}), "
                              f"got {len(value)}: {value!r}")
        return tuple(_convert(a, v, _join(path, i)) for i, (a, v) in enumerate(zip(args, value)))
    item_tp = args[0] if args else Any
    items = [_convert(item_tp, v, _join(path, i)) for i, v in enumerate(value)]
    return items if origin is list else tuple(items)


def _convert_scalar(tp: Any, value: Any, path: str) -> Any:
    is_num = isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int and is_num and (isinstance(value, int) or
                                 (math.isfinite(value) and float(value).is_integer())):
        return int(value)
    if tp is float and is_num:
        return float(value)
    if tp is float and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    elif tp not in (int, float) and isinstance(tp, type) and isinstance(value, tp):
        return value  # bool, str and other plain classes: exact type only
    if not isinstance(tp, type):
        raise ConfigError(f"{_show(path)}: unsupported field type {tp!r}")
    raise ConfigError(f"{_show(path)}: expected {_type_name(tp)}, got {type(value).__name__} "
                      f"{value!r}")


def _build_dataclass(cls: type, value: Any, path: str) -> Any:
    if isinstance(value, cls):
        value = to_dict(value)
    if not isinstance(value, Mapping):
        raise ConfigError(f"{_show(path)}: expected a mapping for {cls.__name__}, got "
                          f"{type(value).__name__} {value!r}")
    preprocess = getattr(cls, "preprocess", None)
    if preprocess is not None:
        value = preprocess(dict(value))
    fields = _fields(cls)
    names = [f.name for f in fields]
    for key in value:
        if key not in names:
            raise _unknown_key("", path, key, names)
    hints = _hints(cls)
    kwargs = {}
    for f in fields:
        if f.name in value:
            kwargs[f.name] = _convert(hints[f.name], value[f.name], _join(path, f.name))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{_show(path)}: missing required key {f.name!r} ({cls.__name__})")
    try:
        obj = cls(**kwargs)
        if hasattr(obj, "validate"):
            obj.validate()
    except FieldError as e:
        _raise_field(e, path)
    return obj


def validate_tree(obj: Any, path: str = "") -> None:
    """Run every ``validate()`` hook in a dataclass tree built in code (bottom-up).

    :func:`from_dict` already does this; call it on configs built with constructors or
    ``dataclasses.replace``.
    """
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in _fields(type(obj)):
            validate_tree(getattr(obj, f.name), _join(path, f.name))
        if hasattr(obj, "validate"):
            try:
                obj.validate()
            except FieldError as e:
                _raise_field(e, path)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            validate_tree(v, _join(path, i))
    elif isinstance(obj, dict):
        for k, v in obj.items():
            validate_tree(v, _join(path, k))



def to_dict(obj: Any) -> Any:
    """Plain YAML-able data from a dataclass tree (tuples become lists); inverse of :func:`from_dict`."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in _fields(type(obj))}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, Mapping):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def dump_config(obj: Any) -> str:
    """YAML text of a config (field order preserved)."""
    return yaml.safe_dump(to_dict(obj), sort_keys=False, default_flow_style=False, width=100)


def save_config(obj: Any, path: str | Path) -> Path:
    """Write ``obj`` as YAML to ``path`` (parents created) so a run can be reproduced."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dump_config(obj))
    return path



def _schema_child(tp: Any, key: str, path: str) -> Any:
    """Type of child ``key`` of a node of type ``tp`` (``None`` = unchecked)."""
    tp = _strip_optional(tp)
    if tp is None or tp is Any:
        return None
    if _is_dataclass_type(tp):
        fields = {f.name: f for f in _fields(tp)}
        if key not in fields:
            raise _unknown_key("override: ", path, key, fields)
        return _hints(tp)[key]
    args = typing.get_args(tp)
    origin = typing.get_origin(tp)
    if origin in (dict, Mapping, typing.Mapping):
        return args[1] if args else None
    if origin in (list, tuple):
        return args[0] if args else None
    return None


def _is_sequence_type(tp: Any) -> bool:
    tp = _strip_optional(tp)
    return typing.get_origin(tp) in (list, tuple) or tp in (list, tuple)


def _strip_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (Union, types.UnionType):
        members = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(members) == 1:
            return members[0]
    return tp


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``"a.b.0.c=value"`` into ``(["a", "b", "0", "c"], yaml.safe_load("value"))``."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"bad override {text!r}: expected dotted.key=value, e.g. optim.lr=1e-5")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"bad override {text!r}: value is not valid YAML ({e})") from None
    return key.split("."), value


def apply_overrides(data: dict, overrides: Sequence[str], schema: Any = None) -> dict:
    """Return a copy of raw config ``data`` with ``dotted.key=value`` overrides applied.

    Values are parsed with ``yaml.safe_load`` (``3`` -> int, ``[1, 2]`` -> list, ``null`` -> None).
    A numeric part indexes a list (``stages.0.steps=10``). With ``schema`` (the dataclass the data
    will build) keys are checked against its fields and absent sections are created; without it
    every key on the path must already exist. Unknown keys and bad indices raise ConfigError.
    """
    data = copy.deepcopy(data) if data is not None else {}
    for text in overrides:
        parts, value = parse_override(text)
        node, tp, path = data, schema, ""
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if isinstance(node, list):
                if not part.lstrip("-").isdigit() or not -len(node) <= int(part) < len(node):
                    raise ConfigError(f"override {text!r}: {_show(path)} is a list of "
                                      f"{len(node)} items; {part!r} is not a valid index")
                key: Any = int(part)
                child_tp = _schema_child(tp, part, path)
            elif isinstance(node, dict):
                key = part
                if tp is None and part not in node:
                    raise _unknown_key(f"override {text!r}: ", path, part, node)
                child_tp = _schema_child(tp, part, path)
            else:
                raise ConfigError(f"override {text!r}: {_show(path)} is a "
                                  f"{type(node).__name__}, not a section or list")
            path = _join(path, part)
            if last:
                node[key] = value
            else:
                if isinstance(node, dict) and node.get(key) is None:
                    if _is_sequence_type(child_tp):
                        raise ConfigError(f"override {text!r}: {path} is empty; set the whole "
                                          f"list, e.g. {path}=[...]")
                    node[key] = {}
                node, tp = node[key], child_tp
    return data



def load_yaml(path: str | Path) -> dict:
    """Raw mapping from a YAML file (empty file -> ``{}``)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def load_typed(cls: type[T], path: str | Path | None, overrides: Sequence[str] = ()) -> T:
    """Load a ``cls`` tree of dataclasses from YAML plus ``key=value`` overrides.

    ``path=None`` starts from the schema defaults. Errors name the file and the dotted key.
    """
    data = load_yaml(path) if path is not None else {}
    data = apply_overrides(data, list(overrides), schema=cls)
    try:
        return from_dict(cls, data)
    except ConfigError as e:
        where = f"{path}" if path is not None else "config"
        raise ConfigError(f"{where}: {e}") from None
