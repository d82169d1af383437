"""Tiny MedMNIST-layout files and the real-data location, shared by the dataset tests."""

import os
from pathlib import Path

import numpy as np
import pytest

from medformer_plugins.medmnist_files import SPLITS, Variant, label_columns, sample_shape

REPO_ROOT = Path(__file__).resolve().parent.parent
COUNTS = {"train": 12, "val": 4, "test": 4}


def real_root() -> Path:
    """The shared real MedMNIST files, or skip the test with the reason."""
    root = Path(os.environ.get("MEDFORMER_DATA_ROOT") or REPO_ROOT.parent / "shared" / "data" / "medmnist")
    if not (root / "retinamnist.npz").is_file():
        pytest.skip(f"real MedMNIST files not found in {root} (set MEDFORMER_DATA_ROOT to the folder of the official .npz files)")
    return root


def fake_arrays(name: str, seed: int = 0, counts=None) -> dict[str, np.ndarray]:
    """Arrays in the official layout for registered `name` (e.g. chestmnist, adrenalmnist3d_64)."""
    flag, _, size = name.partition("_")
    variant = Variant(flag, int(size or 28))
    rng = np.random.default_rng(seed)
    arrays = {}
    for split in SPLITS:
        n = (counts or COUNTS)[split]
        arrays[f"{split}_images"] = rng.integers(0, 256, (n,) + sample_shape(variant), dtype=np.uint8)
        columns = label_columns(variant)
        high = 2 if columns > 1 else len(variant.meta["label"])
        labels = rng.integers(0, high, (n, columns))
        labels[: min(n, high), 0] = np.arange(min(n, high))  # every class present
        arrays[f"{split}_labels"] = labels.astype(np.uint8)
    return arrays


def write_npz(root: Path, name: str, compressed: bool = True, **changes) -> Path:
    """Write a tiny `name.npz` into `root`; `changes` replace or (None) drop arrays."""
    arrays = fake_arrays(name)
    for key, value in changes.items():
        if value is None:
            arrays.pop(key)
        else:
            arrays[key] = value
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"{name}.npz"
    (np.savez_compressed if compressed else np.savez)(path, **arrays)
    return path
