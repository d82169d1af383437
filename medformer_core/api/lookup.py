"""Names the user gives, checked against the known ones, with a "did you mean" for a typo."""

from collections.abc import Collection, Mapping
from difflib import get_close_matches
from typing import TypeVar

from medformer_core.api.errors import UnknownNameError

T = TypeVar("T")


def unknown_name(message: str, name: str, known: Collection[str], hint: str | None = None,
                 cutoff: float = 0.5) -> UnknownNameError:
    """The error for `name`, which is not in `known`: `message`, then "; did you mean 'a', 'b'?" when
    known names are close (difflib similarity >= `cutoff`). The hint is `hint`, else (nothing close)
    the known names."""
    close = get_close_matches(name, list(known), n=3, cutoff=cutoff)
    if close:
        return UnknownNameError(f"{message}; did you mean {', '.join(map(repr, close))}?", hint=hint)
    return UnknownNameError(message, hint=hint or (f"choose one of: {', '.join(known)}" if known else "there are none"))


def lookup(mapping: Mapping[str, T], name: str, what: str, hint: str | None = None) -> T:
    """`mapping[name]`, or the error "unknown {what} '{name}'; did you mean ...?"."""
    if name not in mapping:
        raise unknown_name(f"unknown {what} '{name}'", name, mapping, hint)
    return mapping[name]
