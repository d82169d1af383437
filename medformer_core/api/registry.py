"""Typed registries: name -> registered object, with who provided it."""

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

from medformer_core.api.errors import PluginConflictError
from medformer_core.api.lookup import lookup

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
class Entry(Generic[T]):
    name: str
    obj: T
    provider: Provider


class Registry(Generic[T]):
    """Holds the objects of one kind (datasets, input adapters, output heads, pretext tasks)."""

    def __init__(self, kind: str, base: type):
        self.kind = kind
        self.base = base
        self._entries: dict[str, Entry[T]] = {}

    def add(self, obj: T, provider: Provider) -> None:
        if not isinstance(obj, self.base):
            raise TypeError(f"{provider} registered {obj!r} as a {self.kind}; expected a {self.base.__name__}")
        name = getattr(obj, "name", "")
        if not name or not isinstance(name, str):
            raise TypeError(f"{provider} registered a {self.kind} without a name")
        if name in self._entries:
            first = self._entries[name].provider
            raise PluginConflictError(
                f"{self.kind} '{name}' is registered twice: by {first} and by {provider}",
                hint="uninstall one of the two distributions, or restrict plugins with MEDFORMER_LOAD_PLUGINS",
            )
        self._entries[name] = Entry(name, obj, provider)

    def get(self, name: str) -> T:
        return self.entry(name).obj

    def entry(self, name: str, hint: str | None = None) -> Entry[T]:
        """The entry called `name`; an unknown name is an error with close matches and `hint`."""
        hint = hint or f"see all with `medformer plugins list --kind {self.kind}`"
        return lookup(self._entries, name, self.kind, hint)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[Entry[T]]:
        return iter(sorted(self._entries.values(), key=lambda e: e.name))

    def __len__(self) -> int:
        return len(self._entries)

    def names(self) -> list[str]:
        return sorted(self._entries)
