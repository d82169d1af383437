"""The MedMNIST benchmark recipe end to end, on tiny files in the official layout (smoke recipe)."""

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
COUNTS = {"train": 30, "val": 10, "test": 10}


def run_recipe(data_root, work, results, *extra):
    command = [sys.executable, str(BENCHMARKS / "medmnist_recipe.py"), "--recipe", "smoke",
               "--data-root", str(data_root), "--work", str(work), "--results", str(results), "--device", "cpu",
               *extra]
    return subprocess.run(command, capture_output=True, text=True, timeout=600)


def smoke_data(data_root: Path, fake_arrays) -> Path:
    """The two required MedMNIST files, tiny, in the official layout."""
    data_root.mkdir()
    for name in ("retinamnist", "adrenalmnist3d"):
        np.savez_compressed(data_root / f"{name}.npz", **fake_arrays(name, counts=COUNTS))
    return data_root


@pytest.mark.slow
def test_smoke_recipe_writes_table_json_and_plot_and_resumes(tmp_path, fake_arrays):
    data_root = smoke_data(tmp_path / "data", fake_arrays)
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
    assert "ResNet-18 + 3D: 0.827" in table and "compute time" in table and "4 pretraining steps" in table
    assert (results / "label_efficiency_smoke.png").stat().st_size > 0
    assert (work / "smoke" / "pretrain-seed0" / "seconds.json").is_file()

    second = run_recipe(data_root, work, results)  # every run is found on disk: same numbers
    assert second.returncode == 0, second.stderr[-2000:]
    assert (results / "medmnist_smoke.md").read_text() == table

    reused = [work / "smoke" / "pretrain-seed0" / "seconds.json",
              work / "smoke" / "retinamnist-scratch-1-seed0" / "results.json"]
    written = [path.stat().st_mtime_ns for path in reused]
    decayed = run_recipe(data_root, work, results, "--layer-decay", "0.5")  # new fine-tune runs, the rest reused
    assert decayed.returncode == 0, decayed.stderr[-2000:]
    report = json.loads((results / "medmnist_smoke.json").read_text())
    assert report["layer_decay"] == 0.5 and len(report["runs"]) == 24 and 0 <= report["selection_score"] <= 1
    assert len(list((work / "smoke").glob("*-finetune-*-decay0.5"))) == 8
    assert [path.stat().st_mtime_ns for path in reused] == written

    longer = run_recipe(data_root, work, results, "--pretrain-steps", "5")  # must not reuse a 4-step encoder
    assert longer.returncode != 0
    assert "holds a 4-step pretraining, not 5" in longer.stderr and "--work" in longer.stderr

    other_tasks = run_recipe(data_root, work, results, "--plugin", "mae")  # must not reuse a mae + mae3d encoder
    assert other_tasks.returncode != 0
    assert "pretrained with tasks mae, mae3d, not mae" in other_tasks.stderr and "--work" in other_tasks.stderr

    other_model = run_recipe(data_root, work, results, "--model-option", "latent_pool=true")
    assert other_model.returncode != 0
    assert "model options {}, not {'latent_pool': True}" in other_model.stderr and "--work" in other_model.stderr
    unknown = run_recipe(data_root, work, results, "--model-option", "latnts=8")
    assert unknown.returncode != 0 and "unknown setting 'latnts'" in unknown.stderr


@pytest.mark.slow
def test_runs_trained_two_at_a_time_fill_every_cell(tmp_path, fake_arrays):
    data_root = smoke_data(tmp_path / "data", fake_arrays)
    work, results = tmp_path / "work", tmp_path / "results"
    parallel = run_recipe(data_root, work, results, "--jobs", "2")
    assert parallel.returncode == 0, parallel.stderr[-2000:]
    report = json.loads((results / "medmnist_smoke.json").read_text())
    assert report["jobs"] == 2 and report["wall_minutes"] > 0
    cells = {(r["dataset"], r["mode"], r["label_fraction"], r["seed"]) for r in report["runs"]}
    assert len(cells) == len(report["runs"]) == 24
    assert "2 runs at a time" in (results / "medmnist_smoke.md").read_text()
    assert len(list((work / "smoke").glob("*/results.json"))) == 24
    zero = run_recipe(data_root, work, results, "--jobs", "-1")
    assert zero.returncode != 0 and "--jobs must be >= 1, got -1" in zero.stderr
    longer = run_recipe(data_root, work, results, "--jobs", "2", "--pretrain-steps", "5")  # stops before any run
    assert longer.returncode != 0 and "Traceback" not in longer.stderr
    assert "holds a 4-step pretraining, not 5" in longer.stderr


def test_a_run_of_other_epochs_is_not_reused(tmp_path):
    sys.path.insert(0, str(BENCHMARKS))
    import medmnist_recipe

    from medformer_core.downstream.finetune import FinetuneConfig, write_finetune_config

    recipe = replace(medmnist_recipe.RECIPES["smoke"], epochs={1.0: 5, 0.1: 3})
    run_dir = tmp_path / "work" / "adrenalmnist3d-scratch-1-seed0"
    run_dir.mkdir(parents=True)
    write_finetune_config(FinetuneConfig(dataset="adrenalmnist3d", epochs=2), run_dir / "finetune.toml")
    with pytest.raises(SystemExit, match="holds a 2-epoch run, not 5; pass another --work"):
        medmnist_recipe.finetune(recipe, "adrenalmnist3d", "scratch", 1.0, 0, None, tmp_path, tmp_path / "work",
                                 "cpu")


@pytest.mark.slow
def test_recipe_names_the_missing_required_file(tmp_path):
    (tmp_path / "data").mkdir()
    result = run_recipe(tmp_path / "data", tmp_path / "work", tmp_path / "results")
    assert result.returncode != 0
    assert "retinamnist, adrenalmnist3d not found" in result.stderr and "datasets download" in result.stderr


def test_goals_compare_with_the_resnet_of_the_same_table(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import medmnist_recipe

    summary = {
        ("adrenalmnist3d", "finetune", 1.0): {"auc": (0.84, 0.01)},
        ("adrenalmnist3d", "resnet18", 1.0): {"auc": (0.85, 0.02)},
        ("adrenalmnist3d", "finetune", 0.1): {"auc": (0.80, 0.01)},
        ("adrenalmnist3d", "resnet18", 0.1): {"auc": (0.77, 0.02)},
        ("adrenalmnist3d", "scratch", 0.1): {"auc": (0.79, 0.02)},
        ("retinamnist", "finetune", 1.0): {"auc": (0.72, 0.01)},
    }
    lines = medmnist_recipe.goal_lines(summary, "adrenalmnist3d", (1.0, 0.1))
    assert lines[0].startswith("- adrenalmnist3d, 100% labels: fine-tuned AUC 0.840 vs ResNet-18 (this machine) 0.850")
    assert lines[0].endswith("missed")
    assert "(+0.030, spread 0.020): met" in lines[1]  # 10%: beats the ResNet-18 by more than the spread
    assert "pretrained - scratch = +0.010 AUC vs seed spread 0.020: missed" in lines[2]
    published = medmnist_recipe.goal_lines(summary, "retinamnist", (1.0, 0.1))
    assert published == ["- retinamnist, 100% labels: fine-tuned AUC 0.720 vs ResNet-18 (28) (published) 0.717 "
                         "(+0.003): met"]


def test_the_baseline_can_run_on_some_cells_only(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import medmnist_recipe

    cpu = medmnist_recipe.RECIPES["cpu"]  # ResNet-18 on RetinaMNIST at 10% and 1% labels only
    assert [cpu.runs_baseline(d, f) for d, f in [("retinamnist", 0.1), ("retinamnist", 1.0),
                                                   ("adrenalmnist3d", 0.1)]] == [True, False, False]
    assert cpu.baseline_text() == "100 epochs (retinamnist; 10%, 1% labels)"
    every = replace(cpu, baseline_datasets=medmnist_recipe.option_list("all", str),
                    baseline_fractions=medmnist_recipe.option_list("all", float))
    assert every.runs_baseline("adrenalmnist3d", 1.0) and every.baseline_text() == "100 epochs"
    off = replace(cpu, baseline_epochs=0)
    assert not off.runs_baseline("retinamnist", 0.1) and off.baseline_text() == "not run"
    assert medmnist_recipe.option_list("0.1,0.01", float) == (0.1, 0.01)


def test_a_stopped_pretraining_stops_the_recipe_and_is_not_reused(tmp_path, monkeypatch):
    """A signal ends the pretraining early: the recipe must not fine-tune that encoder, now or when rerun."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import medmnist_recipe

    from medformer_core.engine.loop import RunSummary

    class StoppedTrainer:
        def __init__(self, config, run_dir, **_):
            self.run_dir = run_dir

        def run(self):
            (self.run_dir / "encoder").mkdir(parents=True, exist_ok=True)
            (self.run_dir / "encoder" / "model.safetensors").write_bytes(b"")  # exported at the stop
            return RunSummary(self.run_dir, steps=2, samples=16, seconds=1.0, stopped_by="SIGTERM")

    monkeypatch.setattr(medmnist_recipe, "Trainer", StoppedTrainer)
    recipe = medmnist_recipe.RECIPES["smoke"]
    for _ in range(2):
        with pytest.raises(SystemExit, match="stopped by SIGTERM at step 2; run the same command again"):
            medmnist_recipe.pretrain(recipe, ["retinamnist"], tmp_path, 0, tmp_path / "work", "cpu")
    assert not (tmp_path / "work" / "pretrain-seed0" / "seconds.json").exists()


def test_the_table_header_names_the_model_options():
    import medmnist_recipe

    recipe = replace(medmnist_recipe.RECIPES["smoke"], model_options=(("adapter3d", "conv3d"), ("latent_pool", True)))
    assert recipe.options_text() == " (adapter3d=conv3d, latent_pool=True)"
    assert medmnist_recipe.RECIPES["smoke"].options_text() == ""
