"""`medformer train / finetune / eval` end to end on tiny phantoms: run directory, resume, faults."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
import torch

from medformer_plugins.task_rotation import Rotation

TINY_MODEL = ["--model-option", "embed_dim=32", "--model-option", "depth=1", "--model-option", "heads=2",
              "--model-option", "latents=8"]
TINY_DATA = ["--dataset", "phantoms2d:size=16,count=48", "--dataset", "phantoms3d:size=8,count=32"]
TINY = [*TINY_MODEL, *TINY_DATA, "--batch-size", "8", "--quiet"]


def write_config(path: Path, **values) -> Path:
    lines = [f"{k} = {json.dumps(v)}" for k, v in values.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def losses_by_step(run_dir: Path) -> dict[int, dict[str, float]]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["losses"] for r in records if "losses" in r}


def knn_by_step(run_dir: Path) -> dict[int, dict[str, dict]]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["knn"] for r in records if "knn" in r}


def test_train_writes_a_complete_run_directory(tmp_path, run_cli):
    run = tmp_path / "run"
    config = write_config(tmp_path / "run.toml", checkpoint_every=2, log_every=1, picture_every=4, knn_every=3)
    code, out, err = run_cli("train", *TINY, "--steps", "4", "--config", str(config), "--out", str(run))
    assert code == 0, err
    knn = knn_by_step(run)
    assert sorted(knn) == [3, 4] and sorted(knn[4]) == ["phantoms2d", "phantoms3d"]  # every 3 steps, and the last
    for scores in knn[4].values():  # 12 val phantoms may miss a class: AUC is then undefined (null)
        assert 0.0 <= scores["acc"] <= 1.0 and (scores["auc"] is None or 0.0 <= scores["auc"] <= 1.0)
    for line in (run / "metrics.jsonl").read_text().splitlines():  # strict JSON: no NaN or Infinity
        json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} in metrics.jsonl: {line}"))
    assert (run / "plots" / "knn.png").is_file()
    assert (run / "config.toml").read_text().count("steps = 4") == 1
    assert sorted(losses_by_step(run)) == [1, 2, 3, 4]
    assert set(losses_by_step(run)[4]) <= {"mae", "mae3d", "rotation", "contrastive"}
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if "losses" in r]
    for r in logged:  # one step a record: each task's loss and metrics on the step's dataset, and over all
        assert set(r["per_dataset"]["rotation"]) == {r["dataset"]}
        assert set(r["per_dataset"]["rotation"][r["dataset"]]) == {"loss", "accuracy"}
        assert set(r["losses"]) == set(r["per_dataset"]) and "accuracy" in r["metrics"]["rotation"]
    assert [p.name for p in sorted((run / "checkpoints").iterdir())] == ["step_000002", "step_000004"]
    assert (run / "encoder" / "config.json").is_file() and (run / "encoder" / "model.safetensors").is_file()
    assert (run / "plots" / "losses.png").is_file()
    assert any(p.name.startswith("mae3d-phantoms3d") for p in (run / "pictures").iterdir())
    assert "4 steps" in out
    assert "phantoms3d" in out and "accuracy" in out  # the summary: a row per task and dataset, with metrics


@pytest.mark.slow
def test_resumed_run_matches_an_uninterrupted_one(tmp_path, run_cli):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    config = write_config(tmp_path / "run.toml", checkpoint_every=3, log_every=1, picture_every=100)
    code, _, err = run_cli("train", *TINY, "--steps", "6", "--config", str(config), "--out", str(full))
    assert code == 0, err
    # The state a run killed right after step 3 would leave: its step-3 checkpoint and logs.
    shutil.copytree(full, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_000006")
    lines = (resumed / "metrics.jsonl").read_text().splitlines()[:4]  # the chance levels, steps 1 to 3
    (resumed / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    code, _, err = run_cli("train", *TINY, "--steps", "6", "--out", str(resumed), "--resume")
    assert code == 0, err
    expected, got = losses_by_step(full), losses_by_step(resumed)
    assert sorted(got) == [1, 2, 3, 4, 5, 6]
    for step in (4, 5, 6):
        assert got[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6)


# Far more steps than a fast machine runs before the test stops the process.
UNREACHABLE_STEPS = 1_000_000


def _start_training(tmp_path: Path, run: Path, steps: int) -> subprocess.Popen:
    config = write_config(tmp_path / "slow.toml", checkpoint_every=2, log_every=1, picture_every=1000)
    args = [sys.executable, "-m", "medformer_cli.app", "train", *TINY, "--steps", str(steps),
            "--config", str(config), "--out", str(run)]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_checkpoint(run: Path, process: subprocess.Popen, timeout: float = 120.0) -> None:
    """Wait until the run has written any checkpoint (old ones are pruned, so no fixed step)."""
    deadline = time.monotonic() + timeout
    while not any((run / "checkpoints").glob("step_*")):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.2)


@pytest.mark.slow
def test_sigkill_leaves_a_resumable_checkpoint(tmp_path, run_cli):
    run = tmp_path / "run"
    process = _start_training(tmp_path, run, steps=UNREACHABLE_STEPS)
    _wait_for_checkpoint(run, process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    last = max(int(p.name.removeprefix("step_")) for p in (run / "checkpoints").glob("step_*"))
    target = last + 2
    code, out, err = run_cli("train", *TINY, "--steps", str(target), "--out", str(run), "--resume")
    assert code == 0, err
    assert (run / "checkpoints" / f"step_{target:06d}").is_dir()


@pytest.mark.slow
def test_sigterm_finishes_the_step_and_checkpoints(tmp_path, run_cli):
    run = tmp_path / "run"
    process = _start_training(tmp_path, run, steps=UNREACHABLE_STEPS)
    _wait_for_checkpoint(run, process)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 143
    assert "Stopped by SIGTERM" in err and "--resume" in err and "Traceback" not in err
    reached = max(losses_by_step(run))
    assert (run / "checkpoints" / f"step_{reached:06d}").is_dir()


class NaNAfterTwoCalls(Rotation):
    """The rotation task, but its loss turns NaN on the third call."""

    name = "nan-rotation"

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.calls = 0

    def loss(self, ctx, prediction, view):
        self.calls += 1
        result = super().loss(ctx, prediction, view)
        if self.calls > 2:
            result.loss = result.loss * float("nan")
        return result


@pytest.fixture
def nan_task(register_task):
    register_task(NaNAfterTwoCalls())


def test_nan_loss_stops_with_task_and_step_and_keeps_the_checkpoint(tmp_path, run_cli, nan_task):
    run = tmp_path / "run"
    config = write_config(tmp_path / "run.toml", checkpoint_every=1, log_every=1)
    code, _, err = run_cli("train", *TINY_MODEL, "--dataset", "phantoms2d:size=16,count=48", "--batch-size", "8",
                           "--quiet", "--plugin", "nan-rotation", "--steps", "5", "--config", str(config),
                           "--out", str(run))
    assert code == 1
    assert "task 'nan-rotation' gave a non-finite loss (nan) at step 3" in err
    assert "step_000002" in err and "Traceback" not in err
    assert [p.name for p in sorted((run / "checkpoints").iterdir())] == ["step_000001", "step_000002"]


def test_corrupt_checkpoint_is_an_error_not_a_fresh_start(tmp_path, run_cli):
    run = tmp_path / "run"
    code, _, err = run_cli("train", *TINY, "--steps", "2", "--out", str(run))
    assert code == 0, err
    weights = run / "checkpoints" / "step_000002" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    code, _, err = run_cli("train", *TINY, "--steps", "4", "--out", str(run), "--resume")
    assert code == 1
    assert f"cannot read {weights}" in err and "Traceback" not in err


@pytest.mark.parametrize("args, message", [
    (["--plugin", "rotatoin"], "unknown pretext-task 'rotatoin'; did you mean 'rotation'"),
    (["--plugin", "mae3d", "--dataset", "phantoms2d"], "task 'mae3d' accepts none of the run's datasets"),
    (["--dataset", "phantom2d"], "unknown dataset 'phantom2d'; did you mean 'phantoms2d'"),
    (["--task-option", "mae.mask_ration=0.5"], "task 'mae' has no option 'mask_ration'"),
    (["--task-weight", "jigsaw=2"], "options given for task 'jigsaw', which is not in this run"),
    (["--task-option", "mea.mask_ratio=0.5"], "options given for unknown task 'mea'; did you mean 'mae'"),
    (["--plugin", "jigsaw", "--task-option", "jigsaw.permutations=2.5"],
     "task 'jigsaw': option 'permutations' must be an integer, got '2.5'"),
    (["--task-option", "mae.norm_pix_loss=maybe"], "task 'mae': option 'norm_pix_loss' must be true or false"),
    (["--task-option", "contrastive.temperature=0"], "task 'contrastive': temperature must be > 0, got 0.0"),
    (["--dataset", "phantoms2d:size=16,count=16", "--task-option", "mae3d.mask_ratio=0.9"],
     "options given for task 'mae3d', which accepts none of the run's datasets: phantoms2d (2D"),
    (["--model", "huge"], "unknown model preset 'huge'"),
])
def test_bad_choices_are_one_line_errors(tmp_path, run_cli, args, message):
    code, out, err = run_cli("train", "--steps", "1", "--quiet", "--out", str(tmp_path / "run"), *args)
    assert code == 2
    assert message in err
    assert "Traceback" not in err + out


def test_config_file_task_options_are_checked_like_the_command_line(tmp_path, run_cli):
    (tmp_path / "run.toml").write_text('[tasks.mae]\nmask_ratio = "most"\n')
    code, out, err = run_cli("train", "--config", str(tmp_path / "run.toml"), "--quiet", "--out", str(tmp_path / "run"))
    assert code == 2 and "task 'mae': option 'mask_ratio' must be a number, got 'most'" in err
    assert "Traceback" not in err + out


def test_typed_task_options_are_written_to_the_run_config(tmp_path, run_cli):
    run = tmp_path / "run"
    code, _, err = run_cli("train", *TINY, "--steps", "1", "--task-option", "mae.mask_ratio=0.6",
                           "--task-option", "mae.norm_pix_loss=false", "--out", str(run))
    assert code == 0, err
    config = tomllib.loads((run / "config.toml").read_text())
    assert config["tasks"] == {"mae": {"mask_ratio": 0.6, "norm_pix_loss": False}}
    assert config["plugins"] == ["mae", "mae3d", "rotation", "contrastive"]
    assert "Tasks: mae, mae3d, rotation, contrastive (the defaults" in err


@pytest.mark.parametrize("dataset, chosen, left_out", [
    ("phantoms2d:size=16,count=48", ["mae", "rotation", "contrastive"], "mae3d (phantoms2d: 2D, mae3d needs 3D input)"),
    ("phantoms3d:size=8,count=32", ["mae3d", "rotation", "contrastive"], "mae (phantoms3d: 3D, mae needs 2D input)"),
])
def test_default_tasks_adapt_to_the_datasets(tmp_path, run_cli, dataset, chosen, left_out):
    run = tmp_path / "run"
    code, _, err = run_cli("train", *TINY_MODEL, "--dataset", dataset, "--batch-size", "8", "--quiet",
                           "--steps", "1", "--out", str(run))
    assert code == 0, err
    note = [line for line in err.splitlines() if line.startswith("Tasks:")]
    assert note == [f"Tasks: {', '.join(chosen)}, the defaults that accept the run's datasets, without {left_out}. "
                    "Choose others with --plugin."]
    assert sorted(losses_by_step(run)[1]) == sorted(chosen)
    assert tomllib.loads((run / "config.toml").read_text())["plugins"] == chosen  # what --resume runs


def test_default_tasks_adapt_to_medmnist_files(tmp_path, run_cli, write_npz):
    write_npz(tmp_path / "data", "retinamnist")
    run = tmp_path / "run"
    code, _, err = run_cli("train", *TINY_MODEL, "--dataset", "retinamnist", "--data-root", str(tmp_path / "data"),
                           "--batch-size", "8", "--quiet", "--steps", "1", "--knn-every", "0", "--out", str(run))
    assert code == 0, err
    assert "without mae3d (retinamnist: 2D, mae3d needs 3D input)" in err
    assert sorted(losses_by_step(run)[1]) == ["contrastive", "mae", "rotation"]


def test_bad_option_values_are_typer_errors(tmp_path, run_cli):
    code, _, err = run_cli("train", "--batch-size", "0", "--out", str(tmp_path / "run"))
    assert code == 2 and "--batch-size" in err


def test_existing_run_is_not_overwritten(tmp_path, run_cli):
    run = tmp_path / "run"
    assert run_cli("train", *TINY, "--steps", "1", "--out", str(run))[0] == 0
    code, _, err = run_cli("train", *TINY, "--steps", "1", "--out", str(run))
    assert code == 2 and "already holds checkpoints" in err and "--resume" in err


@pytest.mark.slow
def test_finetune_linear_probe_and_eval(tmp_path, run_cli):
    pretrain, tuned, probe = tmp_path / "pretrain", tmp_path / "tuned", tmp_path / "probe"
    assert run_cli("train", *TINY, "--steps", "2", "--out", str(pretrain))[0] == 0
    data = ["--dataset", "phantoms2d:size=16,count=48", "--epochs", "2", "--batch-size", "8", "--quiet"]
    code, out, err = run_cli("finetune", *data, "--from", str(pretrain), "--out", str(tuned))
    assert code == 0, err
    results = json.loads((tuned / "results.json").read_text())
    assert results["mode"] == "finetune" and results["best_epoch"] in (1, 2)
    assert 0.0 <= results["test"]["auc"] <= 1.0 and 0.0 <= results["test"]["acc"] <= 1.0
    code, out, err = run_cli("eval", str(tuned))
    assert code == 0, err
    evaluated = json.loads((tuned / "eval_test.json").read_text())
    assert evaluated["auc"] == pytest.approx(results["test"]["auc"])  # the saved best model, re-evaluated
    code, _, err = run_cli("finetune", *data, "--from", str(pretrain), "--linear-probe", "--out", str(probe))
    assert code == 0, err
    assert json.loads((probe / "results.json").read_text())["mode"] == "linear-probe"


def test_linear_probe_needs_a_source(tmp_path, run_cli):
    code, _, err = run_cli("finetune", "--dataset", "phantoms2d", "--linear-probe", "--out", str(tmp_path / "x"))
    assert code == 2 and "--linear-probe needs --from" in err


def run_two_processes(*args: str) -> subprocess.CompletedProcess:
    """`medformer *args` as 2 DDP processes (torch.distributed.run, gloo on the CPU)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))}
    env["OMP_NUM_THREADS"] = "1"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "medformer_cli.app", *args, "--device", "cpu"]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


needs_distributed = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")


@pytest.mark.slow
@needs_distributed
def test_two_process_ddp_run(tmp_path):
    run = tmp_path / "ddp"
    result = run_two_processes("train", *TINY, "--steps", "3", "--out", str(run))
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(losses_by_step(run)) == [3]  # one writer: rank 0
    assert (run / "checkpoints" / "step_000003").is_dir()
    state = torch.load(run / "checkpoints" / "step_000003" / "state.pt", weights_only=True)
    assert state["samples"] == 3 * 8 * 2  # each of 2 ranks saw its own batch of 8 per step


@pytest.mark.slow
@needs_distributed
def test_two_process_ddp_finetune(tmp_path):
    run = tmp_path / "ddp"
    result = run_two_processes("finetune", *TINY_MODEL, "--dataset", "phantoms2d:size=16,count=48", "--epochs", "2",
                               "--batch-size", "8", "--quiet", "--out", str(run))
    assert result.returncode == 0, result.stderr[-2000:]
    results = json.loads((run / "results.json").read_text())
    assert results["epochs"] == 2 and results["train_samples"] == 48 and results["best_epoch"] in (1, 2)
    assert [h["epoch"] for h in results["history"]] == [1, 2]
    assert all(math.isfinite(h["train_loss"]) for h in results["history"])
    assert all(0.0 <= results[split][metric] <= 1.0 for split in ("val", "test") for metric in ("auc", "acc"))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    # 48 samples in 2 shards of 24, batches of 8: 3 steps an epoch; one writer (rank 0), one record per epoch
    assert [(r["step"], r["samples"]) for r in records if "losses" in r] == [(3, 48), (6, 96)]
    assert [r["epoch"] for r in records if "val" in r] == [1, 2]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_000003", "step_000006"]
