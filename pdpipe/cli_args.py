"""Command-line flags generated from config dataclasses, so a setting is declared once."""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any


def _scalar_type(hint: Any) -> Any:
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0] if len(args) == 1 else str
    return hint


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """One `--flag` per field (nested dataclasses flattened); defaults come from the class."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        hint = _scalar_type(hints[f.name])
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            add_dataclass_args(parser, hint, skip)
            continue
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "")
        if hint is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif typing.get_origin(hint) is tuple:  # tuple[X, ...]: the flag takes any number of values
            parser.add_argument(flag, nargs="*", type=typing.get_args(hint)[0], default=None, help=help_text)
        else:
            parser.add_argument(flag, type=hint, default=None, help=help_text,
                                choices=f.metadata.get("choices"))


def dataclass_from_args(cls: type, args: argparse.Namespace, **overrides: Any):
    """Builds `cls` from parsed flags; flags left unset keep the class default."""
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        hint = _scalar_type(hints[f.name])
        if f.name in overrides:
            values[f.name] = overrides[f.name]
        elif isinstance(hint, type) and dataclasses.is_dataclass(hint):
            values[f.name] = dataclass_from_args(hint, args)
        elif getattr(args, f.name, None) is not None:
            value = getattr(args, f.name)
            values[f.name] = tuple(value) if typing.get_origin(hint) is tuple else value
    return cls(**values)
