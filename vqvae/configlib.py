"""Typed configuration: frozen dataclasses, described fields, presets, CLI overrides.

Every knob in the project is a field of a frozen dataclass declared with
`param(default, "one-line description")`. Entry points resolve a config as

    cfg = configlib.from_cli(argv, presets=PRESETS)   # "preset=NAME" then "a.b=value" ...

and write `configlib.save(cfg, run_dir / "config.json")`. Unknown keys and
values of the wrong type raise `ConfigError` naming the key and what it expected.
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A config key is unknown, or a value cannot be read as the field's type."""


def param(default: Any = dataclasses.MISSING, help: str = "", *, factory: Callable[[], Any] | None = None):
    """A dataclass field carrying a one-line description in its metadata."""
    if not help:
        raise ValueError("every config field needs a description")
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata={"help": help})
    if dataclasses.is_dataclass(default):
        return dataclasses.field(default_factory=lambda d=default: d, metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_config(obj_or_type) -> bool:
    return dataclasses.is_dataclass(obj_or_type)


def _parse_scalar(text: str, typ: Any, key: str) -> Any:
    """Reads `text` as a value of type `typ` (int, float, bool, str, Optional, tuple, Literal)."""
    origin = typing.get_origin(typ)
    args = typing.get_args(typ)
    if origin in (typing.Union, types.UnionType):
        non_none = [a for a in args if a is not type(None)]
        if text.lower() in ("none", "null") and type(None) in args:
            return None
        errors = []
        for a in non_none:
            try:
                return _parse_scalar(text, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"config key '{key}': cannot read {text!r} as {typ}")
    if origin is typing.Literal:
        for a in args:
            if str(a) == text:
                return a
        raise ConfigError(f"config key '{key}': {text!r} is not one of {list(args)}")
    if origin in (tuple, list):
        inner = [s for s in text.strip("()[] ").split(",") if s.strip() != ""]
        if len(args) == 2 and args[1] is Ellipsis:
            vals = [_parse_scalar(s.strip(), args[0], key) for s in inner]
        elif args:
            if len(inner) != len(args):
                raise ConfigError(f"config key '{key}': expected {len(args)} comma-separated values, got {text!r}")
            vals = [_parse_scalar(s.strip(), a, key) for s, a in zip(inner, args)]
        else:
            vals = [s.strip() for s in inner]
        return tuple(vals) if origin is tuple else vals
    if typ is bool:
        low = text.lower()
        if low in ("true", "1", "yes", "on"):
            return True
        if low in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"config key '{key}': expected true/false, got {text!r}")
    if typ is int:
        try:
            return int(text.replace("_", ""))
        except ValueError:
            raise ConfigError(f"config key '{key}': expected an integer, got {text!r}") from None
    if typ is float:
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"config key '{key}': expected a number, got {text!r}") from None
    if typ is str:
        return text
    raise ConfigError(f"config key '{key}': fields of type {typ} cannot be set from the command line")


def _check_value(value: Any, typ: Any, key: str) -> Any:
    """Validates (and lightly coerces) a Python value against a field type."""
    if isinstance(value, str) and typ is not str and typing.get_origin(typ) is not typing.Literal:
        return _parse_scalar(value, typ, key)
    origin = typing.get_origin(typ)
    args = typing.get_args(typ)
    if typ is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _check_value(value, a, key)
            except ConfigError:
                pass
        raise ConfigError(f"config key '{key}': {value!r} is not a {typ}")
    if origin is typing.Literal:
        if value in args:
            return value
        raise ConfigError(f"config key '{key}': {value!r} is not one of {list(args)}")
    if origin in (tuple, list):
        if not isinstance(value, (tuple, list)):
            raise ConfigError(f"config key '{key}': expected a sequence, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            vals = [_check_value(v, args[0], key) for v in value]
        elif args:
            if len(value) != len(args):
                raise ConfigError(f"config key '{key}': expected {len(args)} values, got {value!r}")
            vals = [_check_value(v, a, key) for v, a in zip(value, args)]
        else:
            vals = list(value)
        return tuple(vals) if origin is tuple else vals
    if typ is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}': expected true/false, got {value!r}")
    if typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
    if typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"config key '{key}': expected a number, got {value!r}")
    if typ is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"config key '{key}': expected a string, got {value!r}")
    if _is_config(typ):
        if isinstance(value, typ):
            return value
        if isinstance(value, Mapping):
            return from_dict(typ, value, prefix=key + ".")
        raise ConfigError(f"config key '{key}': expected a {typ.__name__} section, got {value!r}")
    return value


def _known(cfg) -> list[str]:
    return [f.name for f in dataclasses.fields(cfg)]


def override(cfg: T, key: str, value: Any) -> T:
    """Returns a copy of `cfg` with the (dotted) `key` set to `value` (a string is parsed)."""
    head, _, rest = key.partition(".")
    names = _known(cfg)
    path_prefix = key[: len(key) - len(rest) - 1] if rest else key
    if head not in names:
        raise ConfigError(
            f"unknown config key '{key}' in {type(cfg).__name__}; known keys: {', '.join(names)}"
        )
    typ = _field_types(type(cfg))[head]
    current = getattr(cfg, head)
    if rest:
        if not _is_config(current):
            raise ConfigError(f"config key '{path_prefix}' is a value, not a section; cannot set '{key}'")
        try:
            new = override(current, rest, value)
        except ConfigError as e:
            msg = str(e).replace(f"'{rest}'", f"'{key}'", 1)
            raise ConfigError(msg) from None
    else:
        if _is_config(current) and not isinstance(value, Mapping):
            raise ConfigError(f"config key '{key}' is a section; set one of its keys: {', '.join(_known(current))}")
        new = _check_value(value, typ, key)
    return dataclasses.replace(cfg, **{head: new})


def apply_overrides(cfg: T, overrides: Sequence[str]) -> T:
    """Applies `key=value` strings in order."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"expected key=value, got {item!r}")
        key, value = item.split("=", 1)
        cfg = override(cfg, key.strip(), value.strip())
    return cfg


def to_dict(cfg) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if _is_config(v):
            v = to_dict(v)
        elif isinstance(v, tuple):
            v = list(v)
        out[f.name] = v
    return out


def from_dict(cls: type[T], data: Mapping[str, Any], prefix: str = "") -> T:
    """Builds `cls` from a (nested) mapping; unknown keys are errors, missing keys take defaults."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"config section '{prefix.rstrip('.') or cls.__name__}' must be a mapping")
    hints = _field_types(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {', '.join(prefix + u for u in unknown)} in {cls.__name__}; "
            f"known keys: {', '.join(sorted(names))}"
        )
    kwargs = {k: _check_value(v, hints[k], prefix + k) for k, v in data.items()}
    return cls(**kwargs)


def save(cfg, path: str | os.PathLike) -> None:
    """Writes the resolved config as JSON (atomically: temp file then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(to_dict(cfg), indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def load(cls: type[T], path: str | os.PathLike) -> T:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"no config file at {path}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"config file {path} is not valid JSON: {e}") from None
    return from_dict(cls, data)


def describe(cfg, prefix: str = "") -> list[str]:
    """One line per leaf field: `key = value  # description`."""
    lines = []
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if _is_config(v):
            lines.append(f"{prefix}{f.name}:  # {f.metadata.get('help', '')}")
            lines.extend(describe(v, prefix + f.name + "."))
        else:
            lines.append(f"{prefix}{f.name} = {v!r}  # {f.metadata.get('help', '')}")
    return lines


def from_cli(argv: Sequence[str], presets: Mapping[str, Callable[[], T]], default_preset: str) -> T:
    """Resolves `[preset=NAME] [key=value ...]`; `--help` prints every field and exits.

    The preset may also be given as `--preset NAME`. Presets are zero-argument
    functions returning a config.
    """
    args = list(argv)
    preset = default_preset
    rest = []
    i = 0
    while i < len(args):
        a = args[i]
        if a in ("--preset", "-p") and i + 1 < len(args):
            preset = args[i + 1]
            i += 2
            continue
        if a.startswith("preset="):
            preset = a.split("=", 1)[1]
        elif a.startswith("--preset="):
            preset = a.split("=", 1)[1]
        else:
            rest.append(a[2:] if a.startswith("--") and "=" in a else a)
        i += 1
    if preset not in presets:
        raise ConfigError(f"unknown preset {preset!r}; known presets: {', '.join(presets)}")
    cfg = presets[preset]()
    if any(a in ("-h", "--help", "help") for a in rest):
        print(f"preset={preset} (available: {', '.join(presets)})\n")
        print("\n".join(describe(cfg)))
        raise SystemExit(0)
    return apply_overrides(cfg, rest)


def main_guard(fn: Callable[[], Any]) -> None:
    """Runs an entry point; a ConfigError prints one clear line and exits with status 2."""
    import sys

    try:
        fn()
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
