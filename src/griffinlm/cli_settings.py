"""Command-line flags derived from settings dataclasses, and KEY=VALUE overrides.

A settings dataclass (`TrainConfig`) is the one source of truth for its flags: each field becomes
`--field-name` with the field's type, default and `metadata["help"]` (and `metadata["choices"]`);
a bool field that defaults to True becomes `--no-field-name`. `settings_from_args` builds the
dataclass back from the parsed arguments.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import types
import typing
from typing import Any


def _base_type(annotation: Any) -> Any:
    """int for `int | None`, and so on."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def add_settings_flags(parser: argparse.ArgumentParser | Any, cls: type, *, flag_names: dict[str, str] | None = None,
                       skip: tuple[str, ...] = ()) -> None:
    """Adds one flag per field of dataclass `cls` (except `skip`) to `parser` (or an argument
    group); `flag_names` renames flags (field -> flag without dashes). The destination is always
    the field name."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        name = (flag_names or {}).get(f.name, f.name.replace("_", "-"))
        # the declared default (not an instance's: __post_init__ may derive values from others)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        typ, help_text = _base_type(hints[f.name]), f.metadata.get("help")
        if typ is bool:
            if default:
                parser.add_argument(f"--no-{name}", dest=f.name, action="store_false", help=help_text)
            else:
                parser.add_argument(f"--{name}", dest=f.name, action="store_true", help=help_text)
            continue
        parser.add_argument(f"--{name}", dest=f.name, type=typ, default=default, help=help_text,
                            choices=f.metadata.get("choices"), metavar=None if f.metadata.get("choices") else
                            name.upper().replace("-", "_"))


def settings_from_args(cls: type, args: argparse.Namespace, **extra: Any) -> Any:
    """The dataclass `cls` from parsed arguments holding its fields (plus `extra`)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    return cls(**{**values, **extra})


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """`KEY=VALUE` items (VALUE read as JSON when it parses, else as a string) or JSON file paths."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            if not os.path.isfile(item):
                raise ValueError(f"--config {item!r}: expected KEY=VALUE or a JSON file")
            with open(item) as f:
                out.update(json.load(f))
            continue
        key, raw = item.split("=", 1)
        try:
            out[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            out[key.strip()] = raw
    return out
