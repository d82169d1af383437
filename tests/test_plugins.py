"""The plugin system as a user meets it: listing, lookup, conflicts, broken and restricted plugins."""

import json
import textwrap

from medformer_core import hookimpl
from medformer_core.api.plugins import plugin_manager, registries
from medformer_plugins.phantoms import Phantoms


def make_distribution(site, dist: str, module: str, source: str, entry_point: str | None = None) -> None:
    """Write an installed distribution (dist-info with a `medformer` entry point) into `site`."""
    info = site / f"{dist.replace('-', '_')}-1.2.3.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.2.3\n")
    (info / "entry_points.txt").write_text(f"[medformer]\n{entry_point or module} = {module}\n")
    (site / f"{module}.py").write_text(textwrap.dedent(source))


def test_builtins_are_listed_with_their_distribution(run_cli):
    code, out, _ = run_cli("plugins", "list", "--json")
    rows = {row["name"]: row for row in json.loads(out)}
    assert code == 0
    assert rows["phantoms3d"]["kind"] == "dataset"
    assert rows["phantoms3d"]["distribution"] == "medformer"
    assert rows["phantoms2d"]["accepts"] == "2D, any channels"


def test_list_filters_by_kind(run_cli):
    code, out, _ = run_cli("plugins", "list", "--kind", "dataset", "--json")
    assert code == 0
    assert {row["kind"] for row in json.loads(out)} == {"dataset"}


def test_unknown_name_suggests_close_matches(run_cli):
    code, out, err = run_cli("plugins", "show", "phantom3d")
    assert code == 2
    assert "unknown plugin 'phantom3d'" in err
    assert "'phantoms3d'" in err
    assert "medformer plugins list" in err
    assert "Traceback" not in err + out


def test_show_describes_a_dataset(run_cli):
    code, out, _ = run_cli("plugins", "show", "phantoms3d")
    assert code == 0
    assert "multi-class" in out and "28x28x28" in out


def test_throwaway_plugin_registers_through_the_hooks(fresh_plugins):
    class Extra:
        @hookimpl
        def register_datasets(self, register):
            register(Phantoms(2, {"size": 8, "channels": 1, "count": 4, "classes": 2}).renamed("tiny-phantoms"))

    pm, _, _ = plugin_manager()
    pm.register(Extra(), name="extra")
    registries.cache_clear()
    try:
        entry = registries().datasets.entry("tiny-phantoms")
        assert entry.provider.plugin == "extra"
    finally:
        pm.unregister(name="extra")


def test_conflicting_names_name_both_distributions(tmp_path, fresh_plugins, run_cli):
    make_distribution(tmp_path, "medformer-copycat", "copycat", """
        from medformer_core import hookimpl
        from medformer_plugins.phantoms import Phantoms

        @hookimpl
        def register_datasets(register):
            register(Phantoms(2, {"size": 8, "channels": 1, "count": 4, "classes": 2}))
    """)
    fresh_plugins.syspath_prepend(str(tmp_path))
    fresh_plugins.delenv("MEDFORMER_LOAD_PLUGINS")
    code, out, err = run_cli("plugins", "list")
    assert code == 1
    assert "dataset 'phantoms2d' is registered twice" in err
    assert "medformer 0.1.0" in err and "medformer-copycat 1.2.3" in err
    assert "Traceback" not in err


def test_broken_plugin_is_reported_and_the_cli_still_works(tmp_path, fresh_plugins, run_cli):
    make_distribution(tmp_path, "medformer-broken", "broken_plugin", "import no_such_module\n")
    fresh_plugins.syspath_prepend(str(tmp_path))
    fresh_plugins.delenv("MEDFORMER_LOAD_PLUGINS")
    code, out, _ = run_cli("plugins", "list", "--json")
    rows = {row["name"]: row for row in json.loads(out)}
    assert code == 0
    assert rows["broken_plugin"]["status"] == "broken"
    assert rows["broken_plugin"]["distribution"] == "medformer-broken"
    assert "ModuleNotFoundError" in rows["broken_plugin"]["description"]
    assert rows["phantoms2d"]["status"] == "ok"
    code, out, _ = run_cli("plugins", "show", "phantoms2d")
    assert code == 0


def test_plugin_failing_inside_its_hook_is_reported(tmp_path, fresh_plugins):
    make_distribution(tmp_path, "medformer-raises", "raising_plugin", """
        from medformer_core import hookimpl

        @hookimpl
        def register_datasets(register):
            raise RuntimeError("no licence file")
    """)
    fresh_plugins.syspath_prepend(str(tmp_path))
    fresh_plugins.delenv("MEDFORMER_LOAD_PLUGINS")
    broken = {b.plugin: b for b in registries().broken}
    assert "no licence file" in broken["raising_plugin"].error
    assert "phantoms3d" in registries().datasets


def test_environment_variable_restricts_external_plugins(tmp_path, fresh_plugins):
    make_distribution(tmp_path, "medformer-broken", "broken_plugin", "import no_such_module\n")
    fresh_plugins.syspath_prepend(str(tmp_path))
    fresh_plugins.setenv("MEDFORMER_LOAD_PLUGINS", "some_other_plugin")
    assert registries().broken == []
    fresh_plugins.setenv("MEDFORMER_LOAD_PLUGINS", "medformer-broken")  # a distribution name works too
    from medformer_core.api import plugins

    plugins.reset()
    assert [b.plugin for b in registries().broken] == ["broken_plugin"]


def test_plugins_add_commands(tmp_path, fresh_plugins, run_cli):
    make_distribution(tmp_path, "medformer-hello", "hello_plugin", """
        from medformer_core import hookimpl

        @hookimpl
        def register_commands(app):
            @app.command()
            def hello(name: str):
                "Say hello."
                print(f"hello {name}")
    """)
    fresh_plugins.syspath_prepend(str(tmp_path))
    fresh_plugins.delenv("MEDFORMER_LOAD_PLUGINS")
    code, out, _ = run_cli("hello", "world")
    assert (code, out.strip()) == (0, "hello world")


def test_version(run_cli):
    code, out, _ = run_cli("--version")
    assert code == 0 and out.startswith("medformer ")


def test_show_lists_a_tasks_options(run_cli):
    code, out, _ = run_cli("plugins", "show", "mae")
    assert code == 0
    assert "mask_ratio=0.75" in out.replace("\n", "")
