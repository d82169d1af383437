"""The fit check: the label prior's entropy per task type, and a short run that prints its JSON line."""

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from fit_check import main, prior_entropy  # noqa: E402


def test_prior_entropy_per_task_type():
    assert prior_entropy(np.array([[0], [1], [1], [1]]), "binary-class", 2) == pytest.approx(
        -(0.25 * math.log(0.25) + 0.75 * math.log(0.75)))
    assert prior_entropy(np.array([[0], [1], [2]]), "multi-class", 3) == pytest.approx(math.log(3))
    # CORAL thresholds y > 0 (p = 2/3) and y > 1 (p = 1/3): the same binary entropy each
    assert prior_entropy(np.array([[0], [1], [2]]), "ordinal-regression", 3) == pytest.approx(
        -(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3)))
    assert prior_entropy(np.array([[1, 0], [1, 1]]), "multi-label, binary-class", 2) == pytest.approx(
        math.log(2) / 2, abs=1e-6)


@pytest.mark.parametrize("flags", [[], ["--head-batch-norm"]])
def test_a_short_run_prints_the_losses_and_the_encoder_gradient(flags, tmp_path, write_npz, capsys):
    write_npz(tmp_path, "breastmnist")
    main(["--dataset", "breastmnist", "--data-root", str(tmp_path), "--samples", "8", "--steps", "3", *flags])
    line = json.loads(capsys.readouterr().out)
    assert line["samples"] == 8 and line["head_batch_norm"] == bool(flags)
    assert 0 < line["prior_entropy"] <= math.log(2) and math.isfinite(line["final_loss"])
    assert set(line["encoder_gradient"]) == {"0", "2"} and line["encoder_gradient"]["0"] > 0


def test_an_unknown_dataset_is_a_one_line_error(tmp_path):
    with pytest.raises(SystemExit, match="error: .*nosuchmnist"):
        main(["--dataset", "nosuchmnist", "--data-root", str(tmp_path)])
