"""The plugin API: hookspecs, interfaces, TaskContext, registries and the plugin manager, data
contracts, errors, and the helpers plugins use (lookups, options, atomic writes)."""
