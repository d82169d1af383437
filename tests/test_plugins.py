"""The plugin system as a user meets it: listing, lookup, conflicts, broken and restricted plugins."""

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest

from medformer_cli.console import out as console
from medformer_core import UnknownNameError, hookimpl
from medformer_core.api.plugins import plugin_manager, registries
from medformer_plugins.medmnist_files import Variant, all_variants
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
    code, out, err = run_cli("plugins", "list", "--json")
    sides = [row for row in json.loads(out) if row["name"] == "phantoms2d"]
    assert code == 0
    assert [(row["distribution"], row["status"]) for row in sides] == [("medformer", "conflict"),
                                                                       ("medformer-copycat", "conflict")]
    assert "dataset 'phantoms2d' is registered twice" in err
    code, out, err = run_cli("plugins", "list")
    assert code == 0 and "medformer-copycat 1.2.3" in out
    code, out, err = run_cli("plugins", "show", "phantoms3d")  # every other command refuses the conflict
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
    assert rows["broken_plugin"]["description"] == (
        f"ModuleNotFoundError: No module named 'no_such_module' (at {tmp_path / 'broken_plugin.py'}:1)")
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
    assert broken["raising_plugin"].error == f"RuntimeError: no licence file (at {tmp_path / 'raising_plugin.py'}:6)"
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


def test_show_lists_a_tasks_options_with_type_and_default(run_cli):
    code, out, _ = run_cli("plugins", "show", "mae")
    lines = [line.split() for line in out.splitlines()]
    assert code == 0
    assert ["option", "type", "default"] in lines
    assert ["mask_ratio", "float", "0.75"] in lines and ["norm_pix_loss", "bool", "true"] in lines


def test_show_lists_a_heads_options_and_prediction(run_cli):
    code, out, _ = run_cli("plugins", "show", "label")
    lines = [line.split() for line in out.splitlines()]
    assert code == 0
    assert ["num_outputs", "int", "required"] in lines and ["ordinal", "bool", "false"] in lines
    assert "prediction:  logits [B, num_outputs]" in out
    code, out, _ = run_cli("plugins", "show", "dense")
    assert re.search(r"patch_size +tuple\[int, \.\.\.\] +required", out)
    assert "prediction:  patches [B, Q, channels * prod(patch_size)]" in out


MISSPELLED_HOOK = """
    from medformer_core import PretextTask, hookimpl

    class Denoise(PretextTask):
        name = "denoise"

    @hookimpl
    def register_pretext_task(register):
        register(Denoise())
"""


@pytest.fixture
def misspelled(tmp_path, fresh_plugins):
    """An installed plugin `denoise` whose hook is misspelled (register_pretext_task)."""
    make_distribution(tmp_path, "medformer-denoise", "denoise_plugin", MISSPELLED_HOOK, entry_point="denoise")
    fresh_plugins.syspath_prepend(str(tmp_path))
    fresh_plugins.delenv("MEDFORMER_LOAD_PLUGINS")
    fresh_plugins.delitem(sys.modules, "denoise_plugin", raising=False)  # an earlier test's copy
    return tmp_path / "denoise_plugin.py"


def test_a_misspelled_hook_makes_only_its_plugin_broken(misspelled):
    (broken,) = registries().broken
    assert (broken.plugin, broken.distribution) == ("denoise", "medformer-denoise")
    assert broken.error == (f"register_pretext_task at {misspelled}:8 is not a medformer hook; "
                            "did you mean 'register_pretext_tasks'?")
    assert "denoise" not in [name for name, _ in plugin_manager()[0].list_name_plugin()]
    assert "rotation" in registries().tasks and "phantoms2d" in registries().datasets


def test_a_task_of_a_broken_plugin_points_at_it(misspelled, run_cli):
    with pytest.raises(UnknownNameError, match="pretext-task 'denoise' comes from plugin 'denoise' "
                                               r"\(medformer-denoise 1.2.3\), which is broken: register_pretext_task"):
        registries().tasks.get("denoise")
    with pytest.raises(UnknownNameError, match="plugin 'denoise' .* is broken and may provide it"):
        registries().tasks.get("denoising")
    code, out, err = run_cli("train", "--plugin", "denoise", "--dataset", "phantoms2d", "--steps", "1")
    assert code == 2
    assert "comes from plugin 'denoise'" in err and "did you mean 'register_pretext_tasks'" in err
    assert "Traceback" not in err


def test_show_and_list_explain_a_broken_plugin(misspelled, run_cli):
    code, out, _ = run_cli("plugins", "show", "denoise")
    assert code == 0
    assert "broken plugin" in out and f"{misspelled}:8 is not a medformer hook" in out
    for kind in ("dataset", "input-adapter", "output-head", "pretext-task", "broken"):
        code, out, _ = run_cli("plugins", "list", "--kind", kind, "--json")
        rows = {row["name"]: row["kind"] for row in json.loads(out)}
        assert code == 0 and rows["denoise"] == "broken"
        assert set(rows.values()) == ({kind, "broken"} if kind != "broken" else {"broken"})
    code, _, err = run_cli("plugins", "list", "--kind", "brokn")
    assert code == 2 and "did you mean 'broken'" in err


def test_list_groups_medmnist_sizes_and_fits_100_columns(run_cli, monkeypatch):
    monkeypatch.setattr(console, "width", 200)
    code, out, _ = run_cli("plugins", "list")
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.strip()}
    assert code == 0
    assert rows["retinamnist"][1:6] == ["28", "64", "128", "224", "2D"]
    assert rows["adrenalmnist3d"][1:4] == ["28", "64", "3D"]
    assert "retinamnist_64" not in rows
    assert max(len(line.rstrip()) for line in out.splitlines()) <= 100
    code, out, _ = run_cli("plugins", "list", "--all")
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.strip()}
    assert rows["retinamnist_64"][1:3] == ["64", "2D"]
    assert max(len(line.rstrip()) for line in out.splitlines()) <= 100


def test_medmnist_names_without_the_package_say_how_to_install_it(fresh_plugins, run_cli):
    fresh_plugins.setitem(sys.modules, "medmnist", None)  # `import medmnist` now fails
    fresh_plugins.setitem(sys.modules, "medmnist.info", None)
    install = "pip install --no-deps medmnist==3.0.2"
    code, out, err = run_cli("datasets", "info", "retinamnist_64")
    assert code == 1
    assert (f"dataset 'retinamnist_64' needs the medmnist package, which is not installed "
            f"(install it with `{install}`") in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli("datasets", "download", "retinamnist")
    assert code == 1 and install in err
    code, out, _ = run_cli("plugins", "list", "--json")
    rows = {row["name"]: row for row in json.loads(out)}
    assert install in rows["adrenalmnist3d_64"]["description"]
    assert registries().broken == []


def test_the_cli_starts_without_the_medmnist_package():
    script = ("import sys; sys.modules['medmnist'] = None; sys.modules['medmnist.info'] = None; "
              "from medformer_cli.app import main; main(['datasets', 'info', 'retinamnist'])")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "300"})
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "Error: dataset 'retinamnist' needs the medmnist package, which is not installed (install it with "
        "`pip install --no-deps medmnist==3.0.2`; --no-deps keeps its torchvision dependency from installing a "
        "second torch)"]


def test_the_known_medmnist_names_match_the_package():
    from medmnist.info import INFO

    offered = [Variant(flag, size) for flag, meta in INFO.items()
               for size in (28, *(int(key[4:]) for key in meta if key.startswith("url_")))]
    assert all_variants() == offered
