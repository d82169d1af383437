"""Dataset references: names, NAME:ARG, directory paths, data root precedence, unknown names."""

from pathlib import Path

import pytest

from medformer_core.api.datasets import DATA_ROOT_ENV, default_data_root, resolve_dataset, split_reference
from medformer_core.api.errors import UnknownNameError, UsageError


def test_data_root_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv(DATA_ROOT_ENV, raising=False)
    assert default_data_root() == Path("~/.medmnist").expanduser()
    monkeypatch.setenv(DATA_ROOT_ENV, str(tmp_path / "env"))
    assert default_data_root() == tmp_path / "env"
    assert default_data_root(tmp_path / "arg") == tmp_path / "arg"


def test_split_reference(tmp_path):
    assert split_reference("retinamnist") == ("retinamnist", None)
    assert split_reference("phantoms3d:size=16,count=8") == ("phantoms3d", "size=16,count=8")
    assert split_reference(str(tmp_path)) == ("folder", str(tmp_path))
    assert split_reference("scans") == ("scans", None)  # resolve_dataset checks for a directory
    assert split_reference("./does/not/exist") == ("folder", "./does/not/exist")
    assert split_reference("folder:scans") == ("folder", "scans")
    assert split_reference("data/scans") == ("folder", "data/scans")  # a relative path, even a missing one
    assert split_reference("/srv/a:b") == ("folder", "/srv/a:b")


def test_resolve_name_with_argument_and_options(tmp_path):
    factory, options = resolve_dataset("phantoms2d:size=16,count=8", data_root=tmp_path, seed=3, labeled=False)
    assert factory.name == "phantoms2d"
    got = (options.argument, options.data_root, options.seed, options.labeled)
    assert got == ("size=16,count=8", tmp_path, 3, False)
    assert factory.info(options).size == (16, 16)


def test_bare_directory_names_and_registered_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "scans").mkdir()
    (tmp_path / "phantoms2d").mkdir()
    factory, options = resolve_dataset("scans")
    assert (factory.name, options.argument) == ("folder", "scans")
    assert resolve_dataset("phantoms2d")[0].name == "phantoms2d"  # a registered name wins over a directory


def test_unknown_name_suggests_close_matches():
    with pytest.raises(UnknownNameError, match="did you mean 'phantoms3d'") as info:
        resolve_dataset("phantom3d")
    assert "medformer datasets list" in str(info.value)


def test_argument_for_a_dataset_that_takes_none(monkeypatch):
    from medformer_core.api.plugins import registries

    factory = registries().datasets.get("phantoms2d")
    monkeypatch.setattr(type(factory), "takes_argument", False)
    with pytest.raises(UsageError, match="takes no argument"):
        resolve_dataset("phantoms2d:size=16")


def test_empty_reference():
    with pytest.raises(UsageError, match="empty dataset reference"):
        resolve_dataset("  ")
