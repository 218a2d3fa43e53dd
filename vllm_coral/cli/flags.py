"""Command-line flags generated from frozen config dataclasses, so a new knob is one field.

Every field becomes ``--field-name`` (nested dataclasses ``--section-field``) with its help
text from ``field(metadata={"help": ...})`` and its default shown. A field typed
``Section | None`` (an optional loss term, say) also gets ``--section`` / ``--no-section``
to switch it on (with its defaults) or off. Flags default to "not given", so a preset's
values hold unless a flag overrides them: :func:`config_from_args` starts from the preset.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any

__all__ = ["add_config_flags", "config_from_args"]


def _unwrap(tp) -> tuple[Any, bool]:
    """(inner type, optional?) of ``X | None``."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return (args[0] if len(args) == 1 else tp), len(args) < len(typing.get_args(tp))
    return tp, False


def _none_or(kind):
    def parse(text: str):
        return None if text.lower() == "none" else kind(text)

    parse.__name__ = kind.__name__
    return parse


def add_config_flags(parser: argparse.ArgumentParser, cls: type, defaults: Any, *, dest: str, prefix: str = "") -> None:
    """Add one flag per field of ``cls`` (recursively); ``defaults`` is the instance whose values --help shows."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name.isupper():
            continue
        name = f"{prefix}{f.name}"
        flag, key = "--" + name.replace("_", "-"), f"{dest}.{name}"
        kind, optional = _unwrap(hints[f.name])
        current = getattr(defaults, f.name) if defaults is not None else None
        text = f.metadata.get("help", "")
        if dataclasses.is_dataclass(kind):
            if optional:
                state = "on" if current is not None else "off"
                parser.add_argument(flag, dest=key, action=argparse.BooleanOptionalAction, default=None,
                                    help=f"{text} (preset: {state})")  # fmt: skip
            add_config_flags(parser, kind, current if current is not None else kind(), dest=dest, prefix=f"{name}_")
        elif typing.get_origin(kind) is tuple:
            item = typing.get_args(kind)[0]
            parser.add_argument(flag, dest=key, nargs="+", type=item, default=None,
                                help=f"{text} (default: {' '.join(map(str, current or ()))})")  # fmt: skip
        elif kind is bool:
            parser.add_argument(flag, dest=key, action=argparse.BooleanOptionalAction, default=None,
                                help=f"{text} (default: {current})")  # fmt: skip
        else:
            parse = _none_or(kind) if optional else kind
            parser.add_argument(flag, dest=key, type=parse, default=None, metavar=kind.__name__.upper(),
                                help=f"{text} (default: {current})")  # fmt: skip


def config_from_args(args: argparse.Namespace, base: Any, *, dest: str, prefix: str = "") -> Any:
    """``base`` with every flag the user gave applied (nested sections included)."""
    values = vars(args)
    changes = {}
    hints = typing.get_type_hints(type(base))
    for f in dataclasses.fields(base):
        if f.name.isupper():
            continue
        name = f"{prefix}{f.name}"
        kind, optional = _unwrap(hints[f.name])
        given = values.get(f"{dest}.{name}")
        if dataclasses.is_dataclass(kind):
            current = getattr(base, f.name)
            if given is False:
                changes[f.name] = None
                continue
            sub_given = any(v is not None for k, v in values.items() if k.startswith(f"{dest}.{name}_"))
            if current is None and (given or sub_given):
                current = kind()
            if current is not None:
                changes[f.name] = config_from_args(args, current, dest=dest, prefix=f"{name}_")
        elif given is not None:
            changes[f.name] = tuple(given) if typing.get_origin(kind) is tuple else given
    return dataclasses.replace(base, **changes)
