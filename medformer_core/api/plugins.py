"""The plugin manager: built-ins and installed distributions' `medformer` entry points, one path.

`MEDFORMER_LOAD_PLUGINS` restricts which external plugins load: unset loads all, a comma-separated
list loads those entry-point (or distribution) names only, and `none` (or an empty value) loads none.

A plugin that fails to import, implements a function marked `@hookimpl` that is no medformer hook
(pluggy's `check_pending`), or raises inside a hook is recorded as broken, with the file and line in
its own code; the others load as usual.
"""

import importlib
import importlib.metadata
import importlib.util
import inspect
import os
import traceback
from dataclasses import dataclass, field
from functools import cache

import pluggy

from medformer_core.api import hookspecs
from medformer_core.api.interfaces import DatasetFactory, InputAdapter, OutputHead, PretextTask
from medformer_core.api.lookup import lookup, unknown_name
from medformer_core.api.registry import BrokenPlugin, Conflict, Provider, Registry

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
    "medformer_plugins.task_segmentation",
    "medformer_plugins.task_domain_adversarial",
)


@dataclass
class Registries:
    """Everything the loaded plugins registered, by kind."""

    datasets: Registry[DatasetFactory] = field(default_factory=lambda: Registry("dataset", DatasetFactory))
    input_adapters: Registry[InputAdapter] = field(default_factory=lambda: Registry("input-adapter", InputAdapter))
    output_heads: Registry[OutputHead] = field(default_factory=lambda: Registry("output-head", OutputHead))
    tasks: Registry[PretextTask] = field(default_factory=lambda: Registry("pretext-task", PretextTask))
    providers: list[Provider] = field(default_factory=list)
    broken: list[BrokenPlugin] = field(default_factory=list)

    def __post_init__(self):
        for registry in self.all():
            registry.broken = self.broken  # an unknown name can point at a broken plugin

    def all(self) -> list[Registry]:
        return [self.datasets, self.input_adapters, self.output_heads, self.tasks]

    def kind(self, kind: str) -> Registry:
        kinds = {registry.kind: registry for registry in self.all()}
        return lookup(kinds, kind, "plugin kind", hint=f"choose one of: {', '.join(kinds)}")

    def conflicts(self) -> list[Conflict]:
        return [conflict for registry in self.all() for conflict in registry.conflicts]

    def broken_plugin(self, name: str) -> BrokenPlugin | None:
        """The broken plugin called `name` (its entry-point name), if any."""
        return next((b for b in self.broken if b.plugin == name), None)

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


def _plugin_files(module_name: str) -> tuple[str, ...]:
    """Path prefixes of the code of the package that holds `module_name` (found without importing it)."""
    try:
        spec = importlib.util.find_spec(module_name.split(".")[0])
    except (ImportError, ValueError):
        return ()
    if spec is None:
        return ()
    if spec.submodule_search_locations:
        return tuple(os.path.join(location, "") for location in spec.submodule_search_locations)
    return (spec.origin,) if spec.origin else ()


def _failure(exc: BaseException, files: tuple[str, ...]) -> str:
    """`Type: message (at FILE:LINE)`, one line; the line is the last frame in the plugin's own `files`."""
    if isinstance(exc, SyntaxError):
        where = [(exc.filename, exc.lineno)] if exc.filename else []
        text = exc.msg
    else:
        frames = traceback.extract_tb(exc.__traceback__)
        where = [(f.filename, f.lineno) for f in frames if files and f.filename.startswith(files)]
        text = (str(exc).splitlines() or [""])[0]
    located = f" (at {where[-1][0]}:{where[-1][1]})" if where else ""
    return f"{type(exc).__name__}: {text}{located}"


def _hook_names() -> list[str]:
    return [name for name, function in vars(hookspecs).items() if hasattr(function, "medformer_spec")]


def _unknown_hooks(pm: pluggy.PluginManager, plugin: object) -> str:
    """Why `plugin` fails `check_pending`: each function it marks `@hookimpl` that is no medformer hook."""
    reasons = []
    for caller in pm.get_hookcallers(plugin) or []:
        if caller.has_spec():
            continue
        for impl in caller.get_hookimpls():
            if impl.plugin is not plugin or impl.optionalhook:
                continue
            function = inspect.unwrap(getattr(impl.function, "__func__", impl.function))
            lines, start = inspect.getsourcelines(function)
            start += next((i for i, line in enumerate(lines) if line.lstrip().startswith(("def ", "async def "))), 0)
            message = f"{caller.name} at {inspect.getsourcefile(function)}:{start} is not a medformer hook"
            reasons.append(str(unknown_name(message, caller.name, _hook_names(), cutoff=0.8)))  # hooks share a prefix
    return "; ".join(reasons)


def _register(pm: pluggy.PluginManager, provider: Provider, load, module_name: str) -> BrokenPlugin | None:
    """Import the plugin with `load()` and register it; on failure it stays out and is returned as broken."""
    files = _plugin_files(module_name)
    try:
        plugin = load()
        pm.register(plugin, name=provider.plugin)
    except Exception as exc:  # a third party's error must not take the CLI down
        return BrokenPlugin(provider.plugin, provider.distribution, provider.version, _failure(exc, files))
    try:
        pm.check_pending()
    except pluggy.PluginValidationError:
        reason = _unknown_hooks(pm, plugin)
        pm.unregister(name=provider.plugin)
        return BrokenPlugin(provider.plugin, provider.distribution, provider.version, reason)
    return None


@cache
def plugin_manager() -> tuple[pluggy.PluginManager, tuple[Provider, ...], tuple[BrokenPlugin, ...]]:
    """Load built-ins, then allowed entry points; a plugin that fails to load is recorded as broken."""
    pm = pluggy.PluginManager("medformer")
    pm.add_hookspecs(hookspecs)
    candidates = [(_builtin_provider(name), lambda name=name: importlib.import_module(name), name)
                  for name in BUILTIN_PLUGINS]
    allowed = _allowed_external()
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = ep.dist.name if ep.dist else "unknown"
        if allowed is None or ep.name in allowed or dist in allowed:
            candidates.append((Provider(ep.name, dist, ep.dist.version if ep.dist else "?"), ep.load, ep.module))
    providers, broken = [], []
    for provider, load, module_name in candidates:
        failed = _register(pm, provider, load, module_name)
        if failed:
            broken.append(failed)
        else:
            providers.append(provider)
    return pm, tuple(providers), tuple(broken)


def _plugin_module(plugin: object) -> str:
    return plugin.__name__ if inspect.ismodule(plugin) else type(plugin).__module__


def _call_register_hook(hook, registry_for, providers, broken) -> None:
    by_plugin = {p.plugin: p for p in providers}
    for impl in hook.get_hookimpls():  # registration order: built-ins first
        provider = by_plugin.get(impl.plugin_name) or Provider(impl.plugin_name, "(registered at runtime)", "-")

        def register(obj, provider=provider):
            registry_for(obj).add(obj, provider)

        try:
            impl.function(register=register)
        except Exception as exc:
            broken.append(BrokenPlugin(provider.plugin, provider.distribution, provider.version,
                                       _failure(exc, _plugin_files(_plugin_module(impl.plugin)))))


def load_registries() -> Registries:
    """Build registries from every loaded plugin. A name registered twice stays a `Conflict` here (the
    listings show both sides); `registries()` refuses it."""
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


@cache
def registries() -> Registries:
    """The registries, built once per process; a name two plugins register is an error."""
    result = load_registries()
    conflicts = result.conflicts()
    if conflicts:
        raise conflicts[0].error()
    return result


def reset() -> None:
    """Forget loaded plugins (tests change MEDFORMER_LOAD_PLUGINS or sys.path and reload)."""
    registries.cache_clear()
    plugin_manager.cache_clear()
