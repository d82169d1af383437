"""A real third-party plugin, installed with pip, found through its entry point."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow  # pip install, then a fresh interpreter per command


@pytest.fixture(scope="module")
def installed_example(tmp_path_factory):
    """`pip install` the example plugin into a temporary target folder."""
    target = tmp_path_factory.mktemp("site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--target", str(target), str(REPO_ROOT / "tests" / "example_plugin")],
        check=True, capture_output=True,
    )
    return target


def medformer(site, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(site))
    env.pop("MEDFORMER_LOAD_PLUGINS")
    return subprocess.run([sys.executable, "-m", "medformer_cli.app", *args], env=env,
                          capture_output=True, text=True)


def test_installed_plugin_is_listed_and_resolved(installed_example):
    listing = medformer(installed_example, "plugins", "list", "--json")
    assert listing.returncode == 0, listing.stderr
    rows = {row["name"]: row for row in json.loads(listing.stdout)}
    for name, kind in (("example-noise", "dataset"), ("example-denoise", "pretext-task")):
        assert rows[name]["kind"] == kind
        assert (rows[name]["distribution"], rows[name]["version"]) == ("medformer-example", "0.3.0")
    shown = medformer(installed_example, "plugins", "show", "example-noise")
    assert shown.returncode == 0, shown.stderr
    assert "medformer-example 0.3.0" in shown.stdout


def test_disabling_external_plugins_hides_it(installed_example):
    env = dict(os.environ, PYTHONPATH=str(installed_example), MEDFORMER_LOAD_PLUGINS="none")
    listing = subprocess.run([sys.executable, "-m", "medformer_cli.app", "plugins", "list", "--json"],
                             env=env, capture_output=True, text=True)
    assert "example-noise" not in {row["name"] for row in json.loads(listing.stdout)}


def test_installed_plugin_trains_through_the_cli(installed_example, tmp_path):
    trained = medformer(installed_example, "train", "--plugin", "example-denoise", "--task-option",
                        "example-denoise.noise=0.2", "--dataset", "example-noise", "--steps", "2", "--batch-size", "8",
                        "--model-option", "embed_dim=32", "--model-option", "heads=2", "--model-option", "depth=1",
                        "--quiet", "--out", str(tmp_path / "run"))
    assert trained.returncode == 0, trained.stderr
    assert "example-denoise" in trained.stdout
