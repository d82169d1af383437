"""Whether each task learned: chance levels, verdicts from the logged history, the warning, the table.

The rules are checked on hand-made histories, then end to end: the built-in rotation and a
deliberately dead task (its target is a coin flip the image cannot tell) trained side by side.
"""

import json
import math

import numpy as np
import pytest

from medformer_core import Chance, OutputSpec, PretextTask, View, classification_chance, classification_result
from medformer_core.api.data import ImageSplit
from medformer_core.api.draws import integers
from medformer_core.api.plugins import registries
from medformer_core.reporting.verdicts import (
    AT_CHANCE,
    DIVERGING,
    FLAT,
    LEARNING,
    TOO_SHORT,
    Window,
    chance_record,
    read_history,
    verdict,
)
from medformer_plugins.task_supervised import label_prior_chance

ROTATION = classification_chance(4)


def history(losses: list[float], accuracies: list[float] | None = None, batches: int = 10) -> list[Window]:
    """One logged record every 10 steps of `batches` batches each."""
    accuracies = accuracies or [None] * len(losses)
    return [Window(10 * (i + 1), batches, loss, {} if acc is None else {"accuracy": acc})
            for i, (loss, acc) in enumerate(zip(losses, accuracies))]


# -- the rules on hand-made histories --------------------------------------------------------------


def test_a_classifier_that_learned_is_learning():
    judged = verdict(history([1.39, 1.2, 0.8, 0.5], [0.25, 0.4, 0.7, 0.9]), ROTATION, batch_size=32)
    assert judged.status == LEARNING and judged.detail() == "accuracy 0.9 (chance 0.25)"


def test_a_classifier_at_its_chance_loss_and_accuracy_is_at_chance():
    judged = verdict(history([1.40, 1.387, 1.386, 1.388], [0.26, 0.24, 0.25, 0.255]), ROTATION, batch_size=32)
    assert judged.status == AT_CHANCE


def test_an_accuracy_above_chance_by_more_than_the_noise_is_learning_even_at_a_small_loss_drop():
    level = classification_chance(63)  # contrastive at batch 32: accuracy 1/63
    judged = verdict(history([4.2, 4.1, 4.0, 3.95], [0.02, 0.04, 0.06, 0.07]), level, batch_size=32)
    assert judged.status == LEARNING
    noise = verdict(history([4.2, 4.15, 4.14, 4.14], [0.02, 0.02, 0.02, 0.021]), level, batch_size=32)
    assert noise.status == AT_CHANCE  # 0.021 against 0.016 is within four standard errors of 320 samples


def test_a_better_accuracy_with_a_loss_above_chance_is_not_learning():
    judged = verdict(history([1.5, 1.6, 1.7, 1.7], [0.25, 0.3, 0.33, 0.33]), ROTATION, batch_size=32)
    assert judged.status == AT_CHANCE


def test_the_label_prior_counts_as_chance_for_the_supervised_task():
    labels = np.array([[0]] * 75 + [[1]] * 25)
    level = label_prior_chance(labels, "binary-class", 2)
    assert level.loss == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    assert level.value == 0.75
    judged = verdict(history([0.69, 0.58, 0.565, 0.563], [0.6, 0.75, 0.75, 0.75]), level, batch_size=64)
    assert judged.status == AT_CHANCE  # always "class 0": the prior, not the image


def test_rising_and_non_finite_losses_are_diverging():
    assert verdict(history([1.39, 0.6, 0.9, 1.3]), ROTATION, 32).status == DIVERGING
    assert verdict(history([0.5, 0.4, 0.9, 1.2]), None, 32).status == DIVERGING
    assert verdict(history([1.0, math.nan]), None, 32).status == DIVERGING


def test_tasks_without_a_chance_level_are_judged_on_their_trend():
    assert verdict(history([0.6, 0.5, 0.45, 0.41]), None, 32).status == LEARNING
    assert verdict(history([0.6, 0.59, 0.6, 0.58]), None, 32).status == FLAT
    assert verdict(history([0.6]), None, 32).status == TOO_SHORT


def test_the_verdict_reads_the_last_quarter_of_the_batches():
    judged = verdict(history([1.39] * 6 + [0.3, 0.2]), ROTATION, 32)  # at chance for most of the run, then learned
    assert judged.status == LEARNING and judged.loss == pytest.approx(0.25)


def test_chance_levels_survive_the_metrics_file():
    levels = {("rotation", "phantoms2d"): ROTATION, ("mae", "x"): Chance(1.0)}
    record = json.loads(json.dumps(chance_record(levels)))
    assert read_history([record])[1] == levels


@pytest.mark.parametrize(("kind", "labels", "loss", "accuracy"), [
    ("multi-class", [[0], [1], [2], [2]], -(2 * 0.25 * math.log(0.25) + 0.5 * math.log(0.5)), 0.5),
    ("multi-label, binary-class", [[1, 0], [1, 1], [1, 0], [1, 0]],
     -(0.25 * math.log(0.25) + 0.75 * math.log(0.75)) / 2, (1.0 + 0.75) / 2),
    ("ordinal-regression", [[0], [1], [2], [2]], (-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)) + math.log(2)) / 2,
     0.5),
])
def test_label_prior_chance_of_every_task_type(kind, labels, loss, accuracy):
    level = label_prior_chance(np.array(labels), kind, 3)
    assert level.loss == pytest.approx(loss) and level.value == pytest.approx(accuracy)


def test_unlabeled_rows_are_left_out_of_the_prior():
    assert label_prior_chance(np.array([[0], [1], [-1], [-1]]), "binary-class", 2).value == 0.5


def test_every_builtin_chance_names_a_metric_its_task_logs(phantom_info, phantom_batch, tiny_model):
    """A declared chance metric must be one the task reports, or the verdict could never read it."""
    import torch

    for entry in registries().tasks:
        task = entry.obj
        model = tiny_model([task], latents=8)
        for info in model.dataset_infos:
            if task not in model.tasks_for(info.name):
                continue
            batch = phantom_batch(info, count=4)
            split = ImageSplit(info, batch["image"].numpy(), batch["label"].numpy())
            level = task.chance(split, 4)
            if level is None:
                continue
            result = model(batch, torch.Generator().manual_seed(0))[task.name]
            assert level.loss > 0, task.name
            assert level.metric is None or level.metric in result.metrics, (task.name, level.metric)


# -- end to end: a task that learns beside one that cannot ----------------------------------------


class CoinFlip(PretextTask):
    """Predict a fair coin flipped independently of the image: it can never leave chance."""

    name = "coin-flip"
    description = "a deliberately dead task"

    def output_spec(self, info, run):
        return OutputSpec("label", options={"num_outputs": 2})

    def make_view(self, ctx, batch, generator):
        image = batch["image"]
        return View(image, target=integers(2, (image.shape[0],), generator, image.device))

    def loss(self, ctx, prediction, view):
        return classification_result(prediction, view.target)

    def chance(self, data, batch_size):
        return classification_chance(2)


@pytest.fixture
def coin_flip_task(register_task):
    register_task(CoinFlip())


@pytest.mark.slow
def test_a_run_tells_the_learning_task_from_the_dead_one(tmp_path, run_cli, coin_flip_task):
    run = tmp_path / "run"
    code, out, err = run_cli("train", "--plugin", "rotation", "--plugin", "coin-flip", "--dataset",
                             "phantoms2d:count=256", "--steps", "60", "--batch-size", "16",
                             "--chance-patience", "30", "--knn-every", "0", "--out", str(run))
    assert code == 0, err
    rows = {line.split("│")[1].strip(): line for line in out.splitlines() if line.count("│") > 5}
    assert "learning" in rows["rotation"], out
    assert "at chance" in rows["coin-flip"], out
    assert "warning: task 'coin-flip' is still at chance on 'phantoms2d' after 30 batches" in err
    assert "task 'rotation'" not in err
    records = [json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} in metrics.jsonl"))
               for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["chance"]["coin-flip"]["phantoms2d"]["value"] == 0.5
    warnings = [r["warning"] for r in records if "warning" in r]
    assert len(warnings) == 1 and warnings[0].startswith("task 'coin-flip' is still at chance on 'phantoms2d'")
    assert (run / "plots" / "loss_coin-flip.png").is_file()
