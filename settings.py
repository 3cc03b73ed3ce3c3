"""The one configuration mechanism of every job: a TOML file, then `--set key=value` overrides, into plain
dataclasses. Typed (a string where a number belongs is an error, not a TypeError traceback later), unknown keys
are errors (a typo must not be silently ignored), ranges are checked, and every message names the file and key.

    @dataclass
    class Stage:
        lr: float = field(default=1e-4, metadata=limits(gt=0))
        dtype: str = field(default="bf16", metadata=limits(choices=("bf16", "fp16", "fp32")))

    cfg = load(Stage, "config/sft/medical.toml", sets=["lr=3e-4"])      # or build(Stage, table, where)

Defaults live in the dataclass only. `--set` values are TOML (`lr=3e-4`, `tags=["a","b"]`, `dtype="fp32"`; a bare
word is a string: `dtype=fp32`); `a.b=1` sets key b of table a. Every entry script adds `--set` with `add_set_flag`.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import tomllib
import types
import typing
from pathlib import Path


class ConfigError(ValueError):
    """A configuration value is missing, unknown, of the wrong type or out of range (the message says where)."""


def limits(*, ge=None, gt=None, le=None, lt=None, choices=None) -> dict:
    """Field metadata: the range (or the set of values) a setting must lie in."""
    return {"limits": {"ge": ge, "gt": gt, "le": le, "lt": lt, "choices": choices}}


# ----------------------------------------------------------------------------- --set overrides

def parse_set(text: str) -> tuple[str, object]:
    """`key=value` with a TOML value; a value that is not TOML is taken as a string."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set expects key=value, got {text!r}")
    try:
        parsed = tomllib.loads(f"v = {value.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value.strip()
    return key, parsed


def apply_sets(table: dict, sets, where: str = "--set") -> dict:
    """A copy of `table` with each `a.b.c=value` of `sets` applied (tables are created as needed)."""
    table = copy.deepcopy(table)
    for text in sets or []:
        key, value = parse_set(text)
        *path, name = key.split(".")
        target = table
        for part in path:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise ConfigError(f"{where} {key}: {part} is not a table")
        target[name] = value
    return table


def add_set_flag(parser: argparse.ArgumentParser, example: str = "train.lr=3e-4") -> None:
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="sets",
                        help=f"override a config value (repeatable; TOML values, dotted keys for tables), e.g. "
                             f"--set {example}")


# ----------------------------------------------------------------------------- tables -> dataclasses

def read_toml(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None


def load(cls, path, sets=(), **extra):
    """Read `path`, apply `sets`, build `cls`. `extra` are values the caller supplies (not from the file)."""
    table = apply_sets(read_toml(path), sets, f"{path}: --set")
    return build(cls, {**table, **extra}, str(path))


def build(cls, table, where: str, base=None):
    """Instantiate dataclass `cls` from a TOML table: unknown keys, wrong types and out-of-range values are
    ConfigErrors naming `where.key`. Fields that are dataclasses are built from sub-tables. With `base` (an
    instance of cls), keys the table does not give keep base's values."""
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: expected a table, got {type(table).__name__} {table!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(table) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, f in fields.items():
        key = f"{where}.{name}" if where else name
        if name in table:
            values[name] = check_value(table[name], hints[name], key, f.metadata.get("limits"), f, base)
        elif base is not None:
            values[name] = copy.deepcopy(getattr(base, name))
    try:
        return cls(**values)
    except TypeError as e:   # a required key is missing
        missing = [n for n, f in fields.items() if n not in values and f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING]
        raise ConfigError(f"{where}: missing required key(s) {missing}" if missing else f"{where}: {e}") from None
    except ValueError as e:  # the dataclass's own __post_init__ checks
        raise ConfigError(f"{where}: {e}") from None


def check_value(value, hint, key: str, lim: dict | None = None, f=None, base=None):
    """`value` converted to type `hint` (int -> float allowed, nothing else), and range-checked."""
    value = _typed(value, hint, key, f, base)
    if lim:
        _check_limits(value, lim, key)
    return value


def _typed(value, hint, key, f=None, base=None):
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _typed(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} is none of {hint}")
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):   # already built (e.g. a table merged with its defaults)
            return value
        sub_base = getattr(base, f.name) if base is not None and f is not None else None
        return build(hint, value, key, base=sub_base)
    if hint is typing.Any:
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if hint in (str, bool):
        if not isinstance(value, hint):
            raise ConfigError(f"{key}: expected {'a string' if hint is str else 'true or false'}, got {value!r}")
        return value
    if origin is list or hint is list:
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        item = args[0] if args else typing.Any
        return [_typed(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a table, got {value!r}")
        vtype = args[1] if len(args) == 2 else typing.Any
        return {k: _typed(v, vtype, f"{key}.{k}") for k, v in value.items()}
    return value


def _check_limits(value, lim: dict, key: str) -> None:
    if value is None:
        return
    if lim.get("choices") is not None and value not in lim["choices"]:
        raise ConfigError(f"{key}: {value!r} is not one of {list(lim['choices'])}")
    values = value.values() if isinstance(value, dict) else value if isinstance(value, list) else [value]
    for v in values:
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            continue
        for op, bound, ok in (("ge", lim.get("ge"), lambda a, b: a >= b), ("gt", lim.get("gt"), lambda a, b: a > b),
                              ("le", lim.get("le"), lambda a, b: a <= b), ("lt", lim.get("lt"), lambda a, b: a < b)):
            if bound is not None and not ok(v, bound):
                sign = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}[op]
                raise ConfigError(f"{key}: {v!r} is out of range (must be {sign} {bound})")
