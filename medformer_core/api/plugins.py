"""The plugin manager: built-ins and installed distributions' `medformer` entry points, one path.

`MEDFORMER_LOAD_PLUGINS` restricts which external plugins load: unset loads all, a comma-separated
list loads those entry-point (or distribution) names only, and `none` (or an empty value) loads none.
"""

import importlib
import importlib.metadata
import os
from dataclasses import dataclass, field
from functools import cache

import pluggy

from medformer_core.api import hookspecs
from medformer_core.api.errors import MedformerError
from medformer_core.api.interfaces import DatasetFactory, InputAdapter, OutputHead, PretextTask
from medformer_core.api.lookup import lookup, unknown_name
from medformer_core.api.registry import Provider, Registry

ENTRY_POINT_GROUP = "medformer"
LOAD_PLUGINS_ENV = "MEDFORMER_LOAD_PLUGINS"
BUILTIN_PLUGINS = (
    "medformer_plugins.phantoms",
    "medformer_plugins.medmnist",
    "medformer_plugins.folder",
    "medformer_plugins.adapters",
    "medformer_plugins.conv_adapters",
    "medformer_plugins.heads",
    "medformer_plugins.task_rotation",
    "medformer_plugins.task_mae",
    "medformer_plugins.task_contrastive",
    "medformer_plugins.task_jigsaw",
    "medformer_plugins.task_restoration",
    "medformer_plugins.task_slice_position",
    "medformer_plugins.task_supervised",
    "medformer_plugins.task_domain_adversarial",
)


@dataclass(frozen=True)
class BrokenPlugin:
    """An external plugin that failed to import or to register."""

    plugin: str
    distribution: str
    version: str
    error: str


@dataclass
class Registries:
    """Everything the loaded plugins registered, by kind."""

    datasets: Registry[DatasetFactory] = field(default_factory=lambda: Registry("dataset", DatasetFactory))
    input_adapters: Registry[InputAdapter] = field(default_factory=lambda: Registry("input-adapter", InputAdapter))
    output_heads: Registry[OutputHead] = field(default_factory=lambda: Registry("output-head", OutputHead))
    tasks: Registry[PretextTask] = field(default_factory=lambda: Registry("pretext-task", PretextTask))
    providers: list[Provider] = field(default_factory=list)
    broken: list[BrokenPlugin] = field(default_factory=list)

    def all(self) -> list[Registry]:
        return [self.datasets, self.input_adapters, self.output_heads, self.tasks]

    def kind(self, kind: str) -> Registry:
        kinds = {registry.kind: registry for registry in self.all()}
        return lookup(kinds, kind, "plugin kind", hint=f"choose one of: {', '.join(kinds)}")

    def find(self, name: str):
        """The entry called `name` in any registry."""
        for registry in self.all():
            if name in registry:
                return registry.entry(name)
        every = sorted({n for registry in self.all() for n in registry.names()})
        raise unknown_name(f"unknown plugin '{name}'", name, every, hint="see all with `medformer plugins list`")


def _allowed_external() -> set[str] | None:
    """Names allowed by MEDFORMER_LOAD_PLUGINS; None means all."""
    value = os.environ.get(LOAD_PLUGINS_ENV)
    if value is None:
        return None
    names = {n.strip() for n in value.split(",") if n.strip()}
    return set() if names <= {"none"} else names


def _builtin_provider(module_name: str) -> Provider:
    return Provider(module_name.rsplit(".", 1)[-1], "medformer", medformer_version())


def medformer_version() -> str:
    """The installed medformer version ("dev" when run from a source tree without metadata)."""
    try:
        return importlib.metadata.version("medformer")
    except importlib.metadata.PackageNotFoundError:
        return "dev"


@cache
def plugin_manager() -> tuple[pluggy.PluginManager, tuple[Provider, ...], tuple[BrokenPlugin, ...]]:
    """Load built-ins, then allowed entry points; a plugin that fails to import is recorded."""
    pm = pluggy.PluginManager("medformer")
    pm.add_hookspecs(hookspecs)
    providers, broken = [], []
    for module_name in BUILTIN_PLUGINS:
        provider = _builtin_provider(module_name)
        pm.register(importlib.import_module(module_name), name=provider.plugin)
        providers.append(provider)
    allowed = _allowed_external()
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = ep.dist.name if ep.dist else "unknown"
        version = ep.dist.version if ep.dist else "?"
        if allowed is not None and ep.name not in allowed and dist not in allowed:
            continue
        try:
            pm.register(ep.load(), name=ep.name)
        except Exception as exc:  # a third party's import error must not take the CLI down
            broken.append(BrokenPlugin(ep.name, dist, version, f"{type(exc).__name__}: {exc}"))
            continue
        providers.append(Provider(ep.name, dist, version))
    return pm, tuple(providers), tuple(broken)


def _call_register_hook(hook, registry_for, providers, broken) -> None:
    by_plugin = {p.plugin: p for p in providers}
    for impl in hook.get_hookimpls():  # registration order: built-ins first
        provider = by_plugin.get(impl.plugin_name) or Provider(impl.plugin_name, "(registered at runtime)", "-")

        def register(obj, provider=provider):
            registry_for(obj).add(obj, provider)

        try:
            impl.function(register=register)
        except MedformerError:
            raise
        except Exception as exc:
            broken.append(BrokenPlugin(provider.plugin, provider.distribution, provider.version,
                                       f"{type(exc).__name__}: {exc}"))


@cache
def registries() -> Registries:
    """Build the registries once per process from every loaded plugin."""
    pm, providers, broken = plugin_manager()
    result = Registries(providers=list(providers), broken=list(broken))
    _call_register_hook(pm.hook.register_datasets, lambda obj: result.datasets, providers, result.broken)
    _call_register_hook(
        pm.hook.register_adapters,
        lambda obj: result.output_heads if isinstance(obj, OutputHead) else result.input_adapters,
        providers, result.broken,
    )
    _call_register_hook(pm.hook.register_pretext_tasks, lambda obj: result.tasks, providers, result.broken)
    return result


def reset() -> None:
    """Forget loaded plugins (tests change MEDFORMER_LOAD_PLUGINS or sys.path and reload)."""
    registries.cache_clear()
    plugin_manager.cache_clear()
