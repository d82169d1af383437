"""The MedMNIST benchmark recipe end to end, on tiny files in the official layout (smoke recipe)."""

import json
import subprocess
import sys

from datasets_fakes import REPO_ROOT, fake_arrays

import numpy as np

COUNTS = {"train": 30, "val": 10, "test": 10}


def run_recipe(data_root, work, results):
    command = [sys.executable, str(REPO_ROOT / "benchmarks" / "medmnist_recipe.py"), "--recipe", "smoke",
               "--data-root", str(data_root), "--work", str(work), "--results", str(results), "--device", "cpu"]
    return subprocess.run(command, capture_output=True, text=True, timeout=600)


def test_smoke_recipe_writes_table_json_and_plot_and_resumes(tmp_path):
    data_root = tmp_path / "data"
    data_root.mkdir()
    for name in ("retinamnist", "adrenalmnist3d"):
        np.savez_compressed(data_root / f"{name}.npz", **fake_arrays(name, counts=COUNTS))
    work, results = tmp_path / "work", tmp_path / "results"
    first = run_recipe(data_root, work, results)
    assert first.returncode == 0, first.stderr[-2000:]
    runs = json.loads((results / "medmnist_smoke.json").read_text())["runs"]
    # 2 datasets x 2 label fractions x 3 modes x 2 seeds
    assert len(runs) == 24
    assert {(r["dataset"], r["mode"]) for r in runs} >= {("retinamnist", "finetune"), ("adrenalmnist3d", "scratch")}
    assert all(r["test"]["acc"] >= 0 for r in runs)
    table = (results / "medmnist_smoke.md").read_text()
    assert "| retinamnist | 100% |" in table and "| adrenalmnist3d | 10% |" in table
    assert "ResNet-18 + 3D: 0.827" in table and "compute time" in table
    assert (results / "label_efficiency_smoke.png").stat().st_size > 0
    assert (work / "smoke" / "pretrain-seed0" / "seconds.json").is_file()

    second = run_recipe(data_root, work, results)  # every run is found on disk: same numbers
    assert second.returncode == 0, second.stderr[-2000:]
    assert (results / "medmnist_smoke.md").read_text() == table


def test_recipe_names_the_missing_required_file(tmp_path):
    (tmp_path / "data").mkdir()
    result = run_recipe(tmp_path / "data", tmp_path / "work", tmp_path / "results")
    assert result.returncode != 0
    assert "retinamnist, adrenalmnist3d not found" in result.stderr and "datasets download" in result.stderr
