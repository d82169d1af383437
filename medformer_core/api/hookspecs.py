"""The hooks a medformer plugin may implement (pluggy project name `medformer`).

Each `register_*` hook receives a `register` callback; the core validates and de-duplicates what
is passed to it. Built-in plugins use exactly these hooks.
"""

import pluggy

hookspec = pluggy.HookspecMarker("medformer")
hookimpl = pluggy.HookimplMarker("medformer")


@hookspec
def register_datasets(register):
    """Register dataset factories: `register(factory)` with a `DatasetFactory` instance."""


@hookspec
def register_adapters(register):
    """Register input adapters and output heads: `register(adapter)` with an `InputAdapter` or
    `OutputHead` instance."""


@hookspec
def register_pretext_tasks(register):
    """Register pretext tasks: `register(task)` with a `PretextTask` instance."""


@hookspec
def register_commands(app):
    """Add sub-commands to the `medformer` Typer app."""
