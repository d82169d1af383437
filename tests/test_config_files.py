"""Values read from a run config file are checked like the command line's: each bad value is one
line naming the option, exit 2, and no run folder is left behind."""

import pytest

BAD_VALUES = [
    ('steps = "abc"', "option 'steps' must be a whole number"),
    ("lr = nan", "option 'lr' must be a finite number"),
    ("batch_size = 1.5", "option 'batch_size' must be a whole number"),
    ('augment = "no"', "option 'augment' must be true or false"),
    ("grad_clip = nan", "option 'grad_clip' must be a finite number"),
    ("min_lr_ratio = 5.0", "option 'min_lr_ratio' must be in [0, 1]"),
    ("warmup_steps = -3", "option 'warmup_steps' must be >= 0"),
    ("epochs = inf", "option 'epochs' must be a finite number"),
    ('datasets = "phantoms2d"', "option 'datasets' must be a list of names"),
    ("keep_checkpoints = 0", "option 'keep_checkpoints' must be >= 1"),
]


@pytest.mark.parametrize(("line", "message"), BAD_VALUES, ids=[line for line, _ in BAD_VALUES])
def test_a_bad_value_in_a_config_file_is_one_line(tmp_path, run_cli, line, message):
    config = tmp_path / "run.toml"
    config.write_text(line + "\n")
    run = tmp_path / "run"
    code, _, err = run_cli("train", "--config", str(config), "--out", str(run), "--quiet")
    assert code == 2 and message in err, err
    assert len(err.strip().splitlines()) <= 2 and "Traceback" not in err
    assert not run.exists()
