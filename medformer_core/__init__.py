"""medformer core: hookspecs, plugin manager, registries, data contracts, model and engine."""

from medformer_core.hookspecs import hookimpl

__all__ = ["hookimpl"]
