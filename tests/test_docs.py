"""The documentation as a user meets it: every relative link resolves, the quick-start commands
stay as they are, and the code of the plugin guide (docs/writing-a-plugin.md) runs: its module is
registered as a throw-away plugin, each task trains forward and backward on 2D and 3D phantoms and
on the guide's own dataset, and the guide's own tests pass."""

import math
import re
import sys
import tomllib
import types
from pathlib import Path

import pytest
import torch

from medformer_core import DatasetOptions
from medformer_core.api.plugins import plugin_manager, registries

REPO_ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted((REPO_ROOT / "docs").glob("*.md"))
GUIDE = REPO_ROOT / "docs" / "writing-a-plugin.md"
PLUGIN_FILE, TEST_FILE = "medformer_guide/plugin.py", "tests/test_plugin.py"
GUIDE_TASKS = ("flip", "deblur", "pair-match")
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def fenced_blocks(path: Path, language: str) -> list[str]:
    return [body for lang, body in FENCE.findall(path.read_text()) if lang == language]


def guide_files() -> dict[str, str]:
    """The guide's python blocks joined per file, named by each block's first-line comment."""
    files: dict[str, list[str]] = {}
    for block in fenced_blocks(GUIDE, "python"):
        first, _, body = block.partition("\n")
        files.setdefault(first.removeprefix("# ").strip(), []).append(body)
    return {name: "\n\n".join(bodies) for name, bodies in files.items()}


# -- links and commands ------------------------------------------------------------------------------


@pytest.mark.parametrize("page", [REPO_ROOT / "README.md", *DOCS], ids=lambda p: p.name)
def test_every_relative_link_points_at_a_file(page):
    text = FENCE.sub("", page.read_text())  # links inside code blocks are not links
    targets = [t for t in LINK.findall(text) if not re.match(r"[a-z]+:", t) and not t.startswith("#")]
    missing = [t for t in targets if not (page.parent / t.split("#")[0]).exists()]
    assert not missing, f"{page.name}: links to missing files: {missing}"


def test_docs_folder_holds_the_pages_the_readme_links():
    readme = REPO_ROOT / "README.md"
    linked = {(readme.parent / t).resolve() for t in LINK.findall(readme.read_text()) if t.startswith("docs/")}
    assert {p.resolve() for p in DOCS} <= linked, "every page of docs/ is linked from README.md"


def test_quick_start_commands_are_unchanged():
    lines = (REPO_ROOT / "README.md").read_text().splitlines()
    assert "bash scripts/install.sh && .venv/bin/medformer train" in lines
    assert "bash scripts/install.sh --test && .venv/bin/python -m pytest -q" in lines


# -- the plugin guide --------------------------------------------------------------------------------


def test_guide_python_blocks_name_their_file():
    assert set(guide_files()) == {PLUGIN_FILE, TEST_FILE}


def test_guide_pyproject_declares_the_entry_point():
    pyproject = tomllib.loads(next(b for b in fenced_blocks(GUIDE, "toml") if b.startswith("# pyproject.toml")))
    assert pyproject["project"]["entry-points"]["medformer"] == {"guide": "medformer_guide.plugin"}


@pytest.fixture(scope="module")
def guide_module():
    """The guide's `medformer_guide/plugin.py`, importable as `medformer_guide.plugin`."""
    package, module = types.ModuleType("medformer_guide"), types.ModuleType("medformer_guide.plugin")
    package.__path__, package.plugin = [], module
    saved = {name: sys.modules.get(name) for name in (package.__name__, module.__name__)}
    sys.modules.update({package.__name__: package, module.__name__: module})
    try:
        exec(compile(guide_files()[PLUGIN_FILE], f"{GUIDE}:{PLUGIN_FILE}", "exec"), module.__dict__)
        yield module
    finally:
        for name, old in saved.items():
            if old is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = old


@pytest.fixture
def guide_plugin(guide_module):
    """The guide's module registered through the hooks, as an installed plugin would be."""
    pm, _, _ = plugin_manager()
    pm.register(guide_module, name="guide")
    registries.cache_clear()
    yield guide_module
    pm.unregister(name="guide")
    registries.cache_clear()


def test_guide_plugin_registers_through_the_hooks(guide_plugin, run_cli):
    assert set(GUIDE_TASKS) <= set(registries().tasks.names())
    assert registries().datasets.entry("stripes").provider.plugin == "guide"
    code, out, err = run_cli("plugins", "show", "flip")
    assert code == 0, err
    assert "probability" in out


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("name", GUIDE_TASKS)
def test_guide_task_trains_on_phantoms(name, spatial_dims, guide_plugin, tiny_model, phantom_batch):
    task = registries().tasks.get(name)
    model = tiny_model([task])
    info = next(i for i in model.dataset_infos if i.spatial_dims == spatial_dims)
    result = model(phantom_batch(info), torch.Generator().manual_seed(0))[name]
    assert result.loss.ndim == 0 and torch.isfinite(result.loss)
    assert all(isinstance(v, float) and math.isfinite(v) for v in result.metrics.values())
    result.loss.backward()
    for part in (model.encoder.body, model.output_for(task, info)):
        grads = [p.grad for p in part.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads), f"{name}: a parameter lacks a gradient"


@pytest.mark.slow
@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_guide_flip_task_leaves_chance_as_written(spatial_dims, guide_plugin, unseen_accuracy):
    accuracy = unseen_accuracy("flip", spatial_dims)
    assert accuracy > 0.6, accuracy  # chance: 0.5, always "not mirrored" (probability 0.5)


@pytest.mark.slow
def test_guide_flip_task_gets_a_learning_verdict_as_written(guide_plugin, run_cli, tmp_path):
    code, out, err = run_cli("train", "--plugin", "flip", "--dataset", "phantoms2d:count=512", "--knn-every", "0",
                             "--out", str(tmp_path / "run"))
    assert code == 0, err
    row = next(line for line in out.splitlines() if line.count("│") > 5 and "flip" in line)
    assert "learning" in row and "(0.500)" in out, out  # chance: always "not mirrored"
    assert "warning" not in err


def test_guide_dataset_builds_labeled_splits(guide_plugin):
    factory = registries().datasets.get("stripes")
    options = DatasetOptions(argument="size=16,count=12", seed=3)
    info = factory.info(options)
    for split in ("train", "val", "test"):
        data = factory.build(split, options)
        assert len(data) == info.split_sizes[split]
        batch = data.batch(range(len(data)))
        assert batch["image"].shape == (len(data), 1, 16, 16)
        assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0
        assert batch["label"].shape == (len(data), 1) and int(batch["label"].max()) < info.num_classes
    again = factory.build("train", options).batch(range(4))["image"]
    assert torch.equal(again, factory.build("train", options).batch(range(4))["image"])


def test_guide_tests_pass(guide_module):
    namespace = {"__name__": "guide_tests"}
    exec(compile(guide_files()[TEST_FILE], f"{GUIDE}:{TEST_FILE}", "exec"), namespace)
    tests = [fn for name, fn in namespace.items() if name.startswith("test_") and callable(fn)]
    assert tests
    for test in tests:
        test()
