"""Dataset references: `NAME`, `NAME:ARG`, or a directory path (the folder plugin), to a factory.

The data root (where MedMNIST files live) is, first found: the `data_root` argument, the
environment variable MEDFORMER_DATA_ROOT, then `~/.medmnist` (the medmnist package's default).
"""

import os
from pathlib import Path

from medformer_core.api.data import DatasetOptions
from medformer_core.api.errors import UsageError
from medformer_core.api.interfaces import DatasetFactory
from medformer_core.api.plugins import registries

DATA_ROOT_ENV = "MEDFORMER_DATA_ROOT"
DEFAULT_DATA_ROOT = "~/.medmnist"
FOLDER_DATASET = "folder"


def default_data_root(data_root: str | Path | None = None) -> Path:
    """The data root in effect: `data_root`, else $MEDFORMER_DATA_ROOT, else ~/.medmnist."""
    chosen = data_root if data_root not in (None, "") else os.environ.get(DATA_ROOT_ENV) or DEFAULT_DATA_ROOT
    return Path(chosen).expanduser()


def split_reference(ref: str) -> tuple[str, str | None]:
    """`NAME:ARG` -> (NAME, ARG); a path (holds "/", starts with "~" or ".") -> ("folder", PATH).
    Dataset names never contain "/"."""
    ref = ref.strip()
    if not ref:
        raise UsageError("empty dataset reference", hint="pass a name such as retinamnist, or a directory")
    name, sep, arg = ref.partition(":")
    if "/" in name or ref.startswith(("~", ".")):
        return FOLDER_DATASET, ref
    return name.strip(), (arg if sep else None)


def resolve_dataset(ref: str, *, data_root: str | Path | None = None,
                    **options) -> tuple[DatasetFactory, DatasetOptions]:
    """Find the factory for `ref` and the options to build it with.

    `options` are further `DatasetOptions` fields (size, seed, labeled, label_fraction, ...).
    Raises UnknownNameError (with close matches) for a name no plugin registered.
    """
    name, argument = split_reference(ref)
    datasets = registries().datasets
    if name not in datasets and argument is None and Path(ref).expanduser().is_dir():
        name, argument = FOLDER_DATASET, ref.strip()  # a bare directory name; registered names win
    hint = "see all with `medformer datasets list`; a directory path selects the folder plugin"
    if argument is not None and name == FOLDER_DATASET:
        hint = "the folder plugin is not loaded; check `medformer plugins list`"
    factory = datasets.entry(name, hint).obj
    if argument is not None and not factory.takes_argument:
        raise UsageError(f"dataset '{name}' takes no argument, got '{ref}'", hint=f"use --dataset {name}")
    return factory, DatasetOptions(data_root=default_data_root(data_root), argument=argument, **options)
