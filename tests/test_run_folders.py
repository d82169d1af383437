"""Run folders are never lost or corrupted by a user's mistake: a failed start leaves no folder, a
failed resume leaves the run as it was, a folder that is not a run is refused, two runs never
write one folder, and what a killed write left behind is tidied."""

import fcntl
import os

import pytest

from medformer_core.api.files import clean_interrupted_writes

TINY = ["--model-option", "embed_dim=32", "--model-option", "depth=1", "--model-option", "heads=2",
        "--model-option", "latents=8", "--batch-size", "8", "--quiet", "--knn-every", "0"]
DATA = ["--dataset", "phantoms2d:size=16,count=48"]
FINETUNE = ["finetune", "--dataset", "phantoms2d:size=16,count=48", "--epochs", "1", "--batch-size", "8",
            "--quiet", "--model-option", "embed_dim=32", "--model-option", "depth=1", "--model-option", "heads=2",
            "--model-option", "latents=8"]


def one_line_error(code: int, err: str, text: str) -> None:
    assert code == 2, err
    assert text in err and len(err.strip().splitlines()) <= 2 and "Traceback" not in err, err


# A bad start, and what it must leave: no run folder at all.
BAD_STARTS = [
    (["--dataset", "no-such-set"], "unknown dataset"),
    ([*DATA, "--plugin", "no-such-task"], "no-such-task"),
    ([*DATA, "--task-option", "mae.mask_ratio=abc"], "mask_ratio"),
    ([*DATA, "--plugin", "mae3d"], "accepts none of the run's datasets"),
]


@pytest.mark.parametrize(("args", "message"), BAD_STARTS, ids=[m for _, m in BAD_STARTS])
def test_a_failed_start_leaves_no_run_folder(tmp_path, run_cli, args, message):
    run = tmp_path / "run"
    code, _, err = run_cli("train", *TINY, *args, "--steps", "2", "--out", str(run))
    assert code == 2 and message in err, err
    assert not run.exists()


@pytest.fixture
def tiny_run(tmp_path, run_cli):
    run = tmp_path / "run"
    code, _, err = run_cli("train", *TINY, *DATA, "--plugin", "rotation", "--steps", "2", "--out", str(run))
    assert code == 0, err
    return run


@pytest.mark.parametrize(("args", "message"), [
    (["--dataset", "phantoms3d:size=8,count=32"], "--datasets"),
    (["--plugin", "mae"], "--plugins (mae; the run has rotation)"),
    (["--batch-size", "4"], "--batch-size (4; the run has 8)"),
])
def test_a_failed_resume_leaves_the_run_as_it_was(tiny_run, run_cli, args, message):
    config = (tiny_run / "config.toml").read_bytes()
    code, _, err = run_cli("train", "--out", str(tiny_run), "--resume", "--quiet", *args)
    one_line_error(code, err, message)
    assert (tiny_run / "config.toml").read_bytes() == config
    code, _, err = run_cli("train", "--out", str(tiny_run), "--resume", "--quiet", "--steps", "3")
    assert code == 0, err


def test_a_failed_finetune_resume_leaves_the_finished_run_usable(tmp_path, run_cli):
    run = tmp_path / "ft"
    code, _, err = run_cli(*FINETUNE, "--out", str(run))
    assert code == 0, err
    config = (run / "finetune.toml").read_bytes()
    code, _, err = run_cli("finetune", "--out", str(run), "--resume", "--dataset", "phantoms3d", "--quiet")
    one_line_error(code, err, "--dataset (phantoms3d; the run has phantoms2d:size=16,count=48)")
    assert (run / "finetune.toml").read_bytes() == config
    code, _, err = run_cli("eval", str(run), "--split", "val", "--device", "cpu")
    assert code == 0, err


def test_a_folder_that_is_not_a_run_is_refused(tmp_path, run_cli):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("my notes")
    (folder / "config.toml").write_text("mine = 1\n")
    code, _, err = run_cli("train", *TINY, *DATA, "--steps", "2", "--out", str(folder))
    one_line_error(code, err, "is a folder that is not a medformer run (it holds notes.txt)")
    assert sorted(p.name for p in folder.iterdir()) == ["config.toml", "notes.txt"]
    assert (folder / "config.toml").read_text() == "mine = 1\n"


def test_a_second_run_on_a_folder_in_use_is_refused(tmp_path, run_cli):
    run = tmp_path / "run"
    run.mkdir()
    with open(run / ".lock", "a") as held:  # as a run in progress holds it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        code, _, err = run_cli("train", *TINY, *DATA, "--steps", "2", "--out", str(run))
    one_line_error(code, err, "is in use by another medformer run")
    assert not (run / "metrics.jsonl").exists() and not (run / "config.toml").exists()
    code, _, err = run_cli("train", *TINY, *DATA, "--steps", "2", "--out", str(run))
    assert code == 0, err  # once the other run is gone


def test_what_a_killed_write_left_is_tidied(tmp_path):
    (tmp_path / ".step_000006.tmp-123-456").mkdir()  # a checkpoint killed while being written
    (tmp_path / ".metrics.jsonl.tmp-9-9").write_text("torn")
    (tmp_path / ".encoder.old-77").mkdir()  # killed between the two renames: the old export is all there is
    (tmp_path / ".encoder.old-77" / "config.json").write_text("{}")
    (tmp_path / "pictures").mkdir()
    (tmp_path / ".pictures.old-78").mkdir()  # the new folder is in place: the old one is stale
    clean_interrupted_writes(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["encoder", "pictures"]
    assert (tmp_path / "encoder" / "config.json").is_file()


def test_a_resume_tidies_a_killed_checkpoint_write(tiny_run, run_cli):
    leftover = tiny_run / "checkpoints" / ".step_000003.tmp-1-2"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"\0" * 100)
    code, _, err = run_cli("train", "--out", str(tiny_run), "--resume", "--quiet", "--steps", "3")
    assert code == 0, err
    assert not leftover.exists()
