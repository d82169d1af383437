"""Typed registries: name -> registered object, with who provided it."""

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

from medformer_core.api.errors import PluginConflictError, UnknownNameError
from medformer_core.api.lookup import unknown_name

T = TypeVar("T")


@dataclass(frozen=True)
class Provider:
    """The plugin that registered something: its plugin name and its distribution."""

    plugin: str
    distribution: str
    version: str

    def __str__(self) -> str:
        return f"{self.distribution} {self.version} (plugin '{self.plugin}')"


@dataclass(frozen=True)
class BrokenPlugin(Provider):
    """A plugin that failed to import, implements a hook medformer does not have, or raised in a hook."""

    error: str

    def __str__(self) -> str:
        return f"plugin '{self.plugin}' ({self.distribution} {self.version})"


@dataclass(frozen=True)
class Entry(Generic[T]):
    name: str
    obj: T
    provider: Provider


@dataclass(frozen=True)
class Conflict(Generic[T]):
    """One name registered twice in a registry: the entry kept and the one refused."""

    kind: str
    first: Entry[T]
    second: Entry[T]

    def error(self) -> PluginConflictError:
        return PluginConflictError(
            f"{self.kind} '{self.first.name}' is registered twice: by {self.first.provider} "
            f"and by {self.second.provider}",
            hint="uninstall one of the two distributions, or restrict plugins with MEDFORMER_LOAD_PLUGINS",
        )


class Registry(Generic[T]):
    """Holds the objects of one kind (datasets, input adapters, output heads, pretext tasks)."""

    def __init__(self, kind: str, base: type, broken: list[BrokenPlugin] | None = None):
        self.kind = kind
        self.base = base
        self.broken = [] if broken is None else broken  # shared with the other registries of one load
        self.conflicts: list[Conflict[T]] = []
        self._entries: dict[str, Entry[T]] = {}

    def add(self, obj: T, provider: Provider) -> None:
        if not isinstance(obj, self.base):
            raise TypeError(f"{provider} registered {obj!r} as a {self.kind}; expected a {self.base.__name__}")
        name = getattr(obj, "name", "")
        if not name or not isinstance(name, str):
            raise TypeError(f"{provider} registered a {self.kind} without a name")
        if name in self._entries:  # the first stays; listings show both, other uses raise `Conflict.error`
            self.conflicts.append(Conflict(self.kind, self._entries[name], Entry(name, obj, provider)))
            return
        self._entries[name] = Entry(name, obj, provider)

    def get(self, name: str) -> T:
        return self.entry(name).obj

    def entry(self, name: str, hint: str | None = None) -> Entry[T]:
        """The entry called `name`; an unknown name is an error with close matches and `hint`, which
        points at a broken plugin that may provide it."""
        if name in self._entries:
            return self._entries[name]
        claimed = [b for b in self.broken if name in (b.plugin, b.distribution)]
        if claimed:
            raise UnknownNameError(f"{self.kind} '{name}' comes from {claimed[0]}, which is broken: {claimed[0].error}",
                                   hint=f"fix or uninstall {claimed[0].distribution}")
        if len(self.broken) == 1:
            broken = self.broken[0]
            hint = f"{broken} is broken and may provide it, see `medformer plugins show {broken.plugin}`"
        elif self.broken:
            hint = (f"{len(self.broken)} plugins are broken and may provide it, "
                    "see `medformer plugins list --kind broken`")
        raise unknown_name(f"unknown {self.kind} '{name}'", name, self._entries,
                           hint or f"see all with `medformer plugins list --kind {self.kind}`")

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[Entry[T]]:
        return iter(sorted(self._entries.values(), key=lambda e: e.name))

    def __len__(self) -> int:
        return len(self._entries)

    def names(self) -> list[str]:
        return sorted(self._entries)
