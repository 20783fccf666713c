"""Typed configs from YAML: build a (nested) dataclass from a YAML file plus `key=value` overrides; save it back.

The one place where h1rl turns YAML into typed configs (distillation now, GRPO later). The rules:

- the dataclass is the single source of truth: YAML keys map one to one onto its fields, a nested dataclass onto a
  nested mapping, `list[SomeDataclass]` onto a sequence of mappings;
- an unknown key is an error that names its full dotted key (`loss.temprature`, `stages.1.scorre`), the closest
  valid key and the keys allowed there; a key the dataclass lists in its `RENAMED` ClassVar (old -> new) is an
  error naming the new key; a missing required field is an error naming its key;
- values are coerced to the annotated type: `int`, `float` (also from strings such as `1e-4`, which YAML 1.1 reads
  as text), `bool`, `str`, `Literal[...]`, `X | None`, `list[X]`, `tuple[X, ...]`, `dict[str, X]`, `Any`, nested
  dataclasses; a value that does not fit is an error naming the key, the expected type and the value;
- overrides `a.b=value` (list items by index: `stages.0.max_steps=10`) are parsed as YAML (`x=[1, 2]`, `x=null`)
  and applied to the raw mapping before coercion, so they obey the same rules as the file;
- each dataclass's own `__post_init__` runs as usual: field validation lives there, and its errors come back
  prefixed with the file and the dotted key of the dataclass that raised them;
- `save_config` writes every field, defaults included, as YAML that `load_config` reads back to an equal object.

Errors are `ConfigError` (a `ValueError`).

Example:

>>> import dataclasses
>>> @dataclasses.dataclass
... class Optim:
...     lr: float = 1e-3
...     betas: list[float] = dataclasses.field(default_factory=lambda: [0.9, 0.999])
>>> load_config(Optim, data={"betas": [0.9, 0.95]}, overrides=["lr=1e-4"])
Optim(lr=0.0001, betas=[0.9, 0.95])
>>> load_config(Optim, data={"lr_": 1})
Traceback (most recent call last):
...
h1rl.config_io.ConfigError: <dict>: unknown key 'lr_' (did you mean 'lr'?); allowed keys: lr, betas
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import enum
import importlib
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file, override or field value that cannot become the typed config; the message names the key."""


class _Loader(yaml.SafeLoader):
    """YAML 1.1's safe loader, but reading `1e-4` as a float (YAML 1.1 wants `1.0e-4` and yields the string "1e-4",
    which would reach TRL / transformers untyped through the free-form `trl` and `trainer_args` mappings)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|\.[0-9_]+(?:[eE][-+]?[0-9]+)?"
               r"|[0-9][0-9_]*[eE][-+]?[0-9]+|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."),
)


def closest(key: str, valid: Sequence[str] | Mapping[str, Any] | set[str]) -> str:
    """" (did you mean 'x'?)" for the valid key closest to `key` (difflib), or "" when none is close."""
    match = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.6)
    return f" (did you mean {match[0]!r}?)" if match else ""


def parse_yaml(text: str) -> Any:
    """`yaml.safe_load`, reading `1e-4` as a float."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506  (_Loader is a SafeLoader)


def import_object(spec: str, key: str) -> Any:
    """The object a config names as `"package.module:attribute"`; ConfigError naming the config `key` if it fails."""
    module_name, sep, name = spec.partition(":")
    if not sep or not module_name or not name:
        raise ConfigError(f"{key}: expected 'package.module:function', got {spec!r}")
    try:
        return getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"{key}: cannot import {spec!r}: {err}") from err


def load_config(
    cls: type[T],
    path: str | Path | None = None,
    overrides: Sequence[str] = (),
    data: Mapping[str, Any] | None = None,
) -> T:
    """An instance of dataclass `cls` from the YAML file `path` (or the mapping `data`), then `overrides` applied."""
    if (path is None) == (data is None):
        raise TypeError("load_config: pass exactly one of path and data")
    if path is not None:
        source = str(path)
        try:
            raw = parse_yaml(Path(path).read_text()) or {}
        except FileNotFoundError as err:
            raise ConfigError(f"config file {path} does not exist") from err
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from err
    else:
        source, raw = "<dict>", data
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: the top level must be a mapping of keys, got {type(raw).__name__}")
    raw = apply_overrides(dict(raw), overrides, source)
    return from_dict(cls, raw, source)


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str], source: str = "<dict>") -> dict[str, Any]:
    """A copy of the raw mapping with each `a.b.c=value` set (value parsed as YAML; list items by index)."""
    raw = copy.deepcopy(raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r}: expected key=value, e.g. loss.temperature=2.0")
        try:
            value = parse_yaml(text)
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: the value is not valid YAML: {err}") from err
        parts = key.strip().split(".")
        node: Any = raw
        for depth, part in enumerate(parts):
            here = ".".join(parts[: depth + 1])
            last = depth == len(parts) - 1
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(
                        f"override {item!r}: {here!r} is not an item of the list at {'.'.join(parts[:depth])!r} "
                        f"({len(node)} items in {source}; give an index 0..{len(node) - 1})"
                    )
                part = int(part)
            elif not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {'.'.join(parts[:depth])!r} is a value, not a mapping or list")
            if last:
                node[part] = value
            else:
                if isinstance(node, dict) and not isinstance(node.get(part), (dict, list)):
                    node[part] = {}
                node = node[part]
    return raw


def from_dict(cls: type[T], data: Mapping[str, Any], source: str = "<dict>") -> T:
    """An instance of dataclass `cls` from a plain mapping, by the rules in the module docstring."""
    return _coerce(cls, data, "", source)


def to_dict(obj: Any) -> Any:
    """A dataclass (or nested containers of them) as plain YAML-safe dicts, lists and scalars: enums as their values,
    paths and any other object as strings."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, Mapping):
        return {str(k): to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    return str(obj)


def save_config(obj: Any, path: str | Path) -> Path:
    """Write the resolved config (every field, defaults included) to `path` as YAML; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(to_dict(obj), sort_keys=False))
    return path


def diff_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two plain configs (as `to_dict` returns them)."""
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        out: list[str] = []
        for key in list(old) + [k for k in new if k not in old]:
            out += diff_keys(old.get(key, _MISSING), new.get(key, _MISSING), _join(prefix, str(key)))
        return out
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [k for i, (a, b) in enumerate(zip(old, new)) for k in diff_keys(a, b, _join(prefix, str(i)))]
    return [] if old == new else [prefix or "<root>"]


# ---- coercion -------------------------------------------------------------------------------------------------

_MISSING = object()


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _fail(source: str, key: str, tp: Any, value: Any) -> typing.NoReturn:
    raise ConfigError(f"{source}: {key or '<root>'}: expected {_type_name(tp)}, got {value!r}")


def _coerce(tp: Any, value: Any, key: str, source: str) -> Any:
    if tp is Any:
        return value
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, key, source)
            except ConfigError as err:
                errors.append(err)
        if len(errors) == 1:
            raise errors[0]
        _fail(source, key, tp, value)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{source}: {key}: expected one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return _build_dataclass(tp, value, key, source)
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            _fail(source, key, tp, value)
        item = args[0] if args else Any
        items = [_coerce(item, v, _join(key, str(i)), source) for i, v in enumerate(value)]
        return tuple(items) if (origin or tp) is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            _fail(source, key, tp, value)
        item = args[1] if args else Any
        return {str(k): _coerce(item, v, _join(key, str(k)), source) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            _fail(source, key, tp, value)
        return value
    if tp is int:
        if isinstance(value, bool):
            _fail(source, key, tp, value)
        if isinstance(value, int):
            return value
        number = _number(value)
        if number is None or not float(number).is_integer():
            _fail(source, key, tp, value)
        return int(number)
    if tp is float:
        if isinstance(value, bool):
            _fail(source, key, tp, value)
        number = _number(value)
        if number is None:
            _fail(source, key, tp, value)
        return float(number)
    if tp is str:
        if not isinstance(value, str):
            _fail(source, key, tp, value)
        return value
    raise TypeError(f"config_io: field {key!r} has an unsupported annotation {tp!r}")


def _number(value: Any) -> float | int | None:
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _build_dataclass(cls: type, value: Any, key: str, source: str) -> Any:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{source}: {key or '<root>'}: expected a mapping of {cls.__name__} fields, got {value!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    renamed = getattr(cls, "RENAMED", {})
    for name in value:
        if name in renamed and name not in fields:
            raise ConfigError(f"{source}: key {_join(key, str(name))!r} was renamed {_join(key, renamed[name])!r}")
        if name not in fields:
            where = f" under {key!r}" if key else ""
            raise ConfigError(f"{source}: unknown key {_join(key, str(name))!r}{closest(str(name), fields)}; allowed "
                              f"keys{where}: {', '.join(fields)}")
    kwargs = {}
    for name, f in fields.items():
        if name in value:
            kwargs[name] = _coerce(hints[name], value[name], _join(key, name), source)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{source}: missing required key {_join(key, name)!r} ({cls.__name__}.{name})")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as err:  # the dataclass's own validation (__post_init__)
        raise ConfigError(f"{source}: {key + ': ' if key else ''}{err}") from err
