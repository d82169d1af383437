"""medformer_core's folders are its layers: no import cycle, and no layer imports one above it."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

CORE = Path(__file__).resolve().parent.parent / "medformer_core"
LAYERS = ["api", "reporting", "model", "engine", "downstream"]  # bottom to top


def module_name(path: Path) -> str:
    parts = path.relative_to(CORE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(CORE.rglob("*.py"))}


def core_imports(path: Path) -> set[str]:
    """The medformer_core modules `path` imports anywhere in it (at the top, in functions, for typing)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                found.add(submodule if submodule in MODULES else node.module)
    return {name for name in found if name in MODULES and name != "medformer_core"}


GRAPH = {name: core_imports(path) for name, path in MODULES.items() if name != "medformer_core"}


def layer(module: str) -> int:
    return LAYERS.index(module.split(".")[1])


def test_every_core_module_lives_in_a_layer():
    assert {name.split(".")[1] for name in GRAPH} == set(LAYERS)


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_no_module_imports_a_layer_above_its_own(module):
    above = sorted(name for name in GRAPH[module] if layer(name) > layer(module))
    assert not above, f"{module} ({LAYERS[layer(module)]}) imports {above}"


def test_the_import_graph_has_no_cycle():
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for name in sorted(GRAPH[module]):
            if state.get(name) == "open":
                pytest.fail("import cycle: " + " -> ".join(path[path.index(name):] + [name]))
            if name not in state:
                visit(name, path + [name])
        state[module] = "done"

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [module])


def test_the_package_surface_is_the_plugin_api():
    assert {layer(name) for name in core_imports(CORE / "__init__.py")} == {LAYERS.index("api")}


def test_plugins_written_for_the_flat_layout_still_import():
    """Plugins once imported `medformer_core.data` and `medformer_core.interfaces`; those paths still work."""
    code = ("from medformer_core.data import DatasetInfo\n"
            "from medformer_core.interfaces import PretextTask\n"
            "from medformer_core.errors import DataError\n"
            "import medformer_core, medformer_core.hookspecs\n"
            "assert (DatasetInfo, PretextTask, DataError) == "
            "(medformer_core.DatasetInfo, medformer_core.PretextTask, medformer_core.DataError)\n"
            "assert medformer_core.hookspecs.hookimpl is medformer_core.hookimpl\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
