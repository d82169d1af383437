"""`key=value` options given as text, checked and converted to the fields of a dataclass.

Values convert to the field's type: int, float, bool (true/false, yes/no, 1/0), str, a Literal's
choices, unions (members tried in order; None as "none") and tuples written with ":" (`window=0:2000`).
"""

import dataclasses
import types
import typing
from collections.abc import Iterable
from typing import Any, Literal

from medformer_core.api.errors import UsageError
from medformer_core.api.lookup import unknown_name

BOOLEANS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}


def split_pairs(items: str | Iterable[str] | None, what: str, example: str) -> dict[str, str]:
    """"k=v,k2=v2" or ["k=v", ...] -> {"k": "v", ...}; `what` and `example` word the error."""
    if isinstance(items, str):
        items = [item for item in items.split(",") if item.strip()]
    pairs = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise UsageError(f"{what}: '{item}' is not KEY=VALUE", hint=f"e.g. {example}")
        pairs[key.strip()] = value.strip()
    return pairs


def settings_of(cls: type) -> list[str]:
    """The settings of dataclass `cls`: its fields with a default (the others its user fills in)."""
    missing = dataclasses.MISSING
    return [f.name for f in dataclasses.fields(cls) if f.default is not missing or f.default_factory is not missing]


def parse_options(cls: type, values: dict[str, str], what: str) -> dict[str, Any]:
    """Text `values` checked against the settings of dataclass `cls` and converted to their types."""
    kinds = typing.get_type_hints(cls)
    fields = settings_of(cls)
    parsed = {}
    for key, value in values.items():
        if key not in fields:
            raise unknown_name(f"{what}: unknown setting '{key}'", key, fields)
        try:
            parsed[key] = convert(value, kinds[key])
        except ValueError:
            raise UsageError(f"{what}: bad setting ({key} must be {describe(kinds[key])}, got '{value}')") from None
    return parsed


def convert(text: str, kind: Any) -> Any:
    """`text` as a value of type `kind`; ValueError when it is not one."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is Literal:
        for choice in args:
            if text == str(choice):
                return choice
        raise ValueError(text)
    if origin in (typing.Union, types.UnionType):
        for member in args:
            try:
                return convert(text, member)
            except ValueError:
                pass
        raise ValueError(text)
    if origin is tuple:
        parts = text.split(":")
        if len(parts) != len(args):
            raise ValueError(text)
        return tuple(convert(part, member) for part, member in zip(parts, args))
    if kind is bool or kind is type(None):
        words = BOOLEANS if kind is bool else {"none": None}
        if text.lower() not in words:
            raise ValueError(text)
        return words[text.lower()]
    return kind(text)


def describe(kind: Any) -> str:
    """What a value of type `kind` looks like, for an error message."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is Literal:
        return "one of " + ", ".join(map(str, args)) if len(args) > 1 else str(args[0])
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe(member) for member in args if member is not type(None))
    if origin is tuple:
        return ":".join("ABCDEFGH"[: len(args)]) + ", each " + " or ".join(describe(a) for a in dict.fromkeys(args))
    return {int: "an integer", float: "a number", bool: "true or false", str: "text"}.get(kind, kind.__name__)
